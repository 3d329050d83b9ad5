//! What the binary carries so that it works from any folder: the four
//! store agents (built from `agents/` by build.rs) with their manifests, a
//! commented `colony.toml`, and the WIT it speaks. `colony init` and
//! `colony wit` write them out; `colony demo` uses them when the agents
//! directory lacks them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::BadInput;

/// The store agents: name, component, manifest (if it has one).
pub const STORE_AGENTS: [(&str, &[u8], Option<&str>); 4] = [
    ("design", include_bytes!(env!("COLONY_AGENT_DESIGN")), None),
    ("code", include_bytes!(env!("COLONY_AGENT_CODE")), None),
    (
        "marketing",
        include_bytes!(env!("COLONY_AGENT_MARKETING")),
        Some(include_str!("../../../agents/marketing.toml")),
    ),
    ("ops", include_bytes!(env!("COLONY_AGENT_OPS")), None),
];

/// The WIT this binary speaks, every supported version, with its
/// dependencies: (path under the WIT directory, text).
pub const WIT_FILES: [(&str, &str); 9] = [
    ("agent.wit", include_str!("../../../wit/agent.wit")),
    (
        "v0.1.0/agent.wit",
        include_str!("../../../wit/v0.1.0/agent.wit"),
    ),
    ("deps/cli.wit", include_str!("../../../wit/deps/cli.wit")),
    (
        "deps/clocks.wit",
        include_str!("../../../wit/deps/clocks.wit"),
    ),
    (
        "deps/filesystem.wit",
        include_str!("../../../wit/deps/filesystem.wit"),
    ),
    ("deps/http.wit", include_str!("../../../wit/deps/http.wit")),
    ("deps/io.wit", include_str!("../../../wit/deps/io.wit")),
    (
        "deps/random.wit",
        include_str!("../../../wit/deps/random.wit"),
    ),
    (
        "deps/sockets.wit",
        include_str!("../../../wit/deps/sockets.wit"),
    ),
];

/// The `colony.toml` `colony init` writes: every setting commented out, so
/// that it changes nothing until the operator opts in.
pub const CONFIG_TEMPLATE: &str = r#"# Colony's operator configuration (`--config PATH`, env COLONY_CONFIG).
# Nothing here is required: without models, agents that can use one fall
# back to what they do without (the store agents use templates).
#
# Model aliases an agent's manifest may grant (`models = ["copy"]` in
# agents/marketing.toml). The guest never sees a key or a URL.
#
# [models.copy]
# api = "openai"                        # any OpenAI-compatible chat-completions server
# base_url = "http://127.0.0.1:11434/v1"  # e.g. a local Ollama
# model = "llama3.2"
# timeout = "120s"                      # per call, retries included
# max_tokens = 1024                     # when a request names none
#
# [models.smart]
# api = "anthropic"                     # the Anthropic Messages API
# base_url = "https://api.anthropic.com"
# model = "claude-sonnet-4-5"
# api_key_env = "ANTHROPIC_API_KEY"     # read by the host at start
# requests_per_minute = 50
# tokens_per_minute = 40000
# input_usd_per_mtok = 3.0              # cost is recorded when prices are given
# output_usd_per_mtok = 15.0
# cache_read_usd_per_mtok = 0.3         # prompt tokens read from its cache (default: the input price)
# cache_write_usd_per_mtok = 3.75       # and written to it (default: the input price)
"#;

/// The files `colony init DIR` writes, with their contents: the agents
/// into `agents` and the configuration into `config`, each taken relative
/// to DIR (where the user will run colony), as the global options name them.
fn init_files(dir: &Path, agents: &Path, config: &Path) -> Vec<(PathBuf, &'static [u8])> {
    let agents = dir.join(agents);
    let mut files = Vec::new();
    for (name, component, manifest) in STORE_AGENTS {
        files.push((agents.join(format!("{name}.wasm")), component));
        if let Some(manifest) = manifest {
            files.push((agents.join(format!("{name}.toml")), manifest.as_bytes()));
        }
    }
    files.push((dir.join(config), CONFIG_TEMPLATE.as_bytes()));
    files
}

/// `colony init DIR`: the store agents and a commented configuration.
/// Refuses, writing nothing, when any of its files exists.
pub fn init(dir: &Path, agents: &Path, config: &Path) -> Result<Vec<PathBuf>> {
    refuse_a_file(dir, "colony init")?;
    let files = init_files(dir, agents, config);
    let existing: Vec<String> = files
        .iter()
        .filter(|(path, _)| path.exists())
        .map(|(path, _)| path.display().to_string())
        .collect();
    if !existing.is_empty() {
        return Err(BadInput(format!(
            "{} already exist{}: colony init writes nothing over existing files (move them away, or init another directory): {}",
            if existing.len() == 1 { "a file" } else { "files" },
            if existing.len() == 1 { "s" } else { "" },
            existing.join(", ")
        ))
        .into());
    }
    for (path, contents) in &files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

/// Refuses a folder argument (`what` names it) that is a file.
pub(super) fn refuse_a_file(dir: &Path, what: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(BadInput(format!(
            "{what} {}: that is a file; give a directory (created if missing)",
            dir.display()
        ))
        .into());
    }
    Ok(())
}

/// `colony wit --out DIR`: the WIT this binary speaks. Files of the same
/// name are replaced (a stale copy is what this is for); others are left.
pub fn write_wit(out: &Path) -> Result<Vec<PathBuf>> {
    refuse_a_file(out, "--out")?;
    let mut written = Vec::new();
    for (name, text) in WIT_FILES {
        let path = out.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A store agent's files, from `from` when built there, else the copy
/// this binary carries: written into `to` for the demo.
pub fn copy_store_agent(name: &str, from: &Path, to: &Path) -> Result<()> {
    let (_, component, manifest) = STORE_AGENTS
        .iter()
        .find(|(n, _, _)| *n == name)
        .with_context(|| format!("{name} is not a store agent"))?;
    let built = from.join(format!("{name}.wasm"));
    let target = to.join(format!("{name}.wasm"));
    if built.is_file() {
        std::fs::copy(&built, &target).with_context(|| format!("copying {}", built.display()))?;
    } else {
        std::fs::write(&target, component)
            .with_context(|| format!("writing {}", target.display()))?;
    }
    let manifest_file = from.join(format!("{name}.toml"));
    let target = to.join(format!("{name}.toml"));
    if manifest_file.is_file() {
        std::fs::copy(&manifest_file, &target)
            .with_context(|| format!("copying {}", manifest_file.display()))?;
    } else if let Some(manifest) = manifest {
        std::fs::write(&target, manifest)
            .with_context(|| format!("writing {}", target.display()))?;
    } else if target.exists() {
        // A copy made earlier (a demo run before this one) must not
        // outlive a source that has no manifest.
        std::fs::remove_file(&target)
            .with_context(|| format!("removing the stale {}", target.display()))?;
    }
    Ok(())
}
