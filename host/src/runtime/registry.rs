//! The agents directory: every `*.wasm` file is an agent named by its file
//! stem, with an optional `<name>.toml` manifest beside it. Rescanning picks
//! up new, replaced and removed components; a broken one is reported and
//! skipped while every other agent keeps working.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{Agent, Limits, Runtime, RuntimeError};

/// The most a manifest's `log_kb` may keep of each stream: 1 GiB.
const MAX_LOG_KB: u64 = 1 << 20;

/// An agent's manifest (`agents/<name>.toml`). Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Wall-clock budget per run, e.g. `"30s"` or `"5m"`.
    pub timeout: Option<String>,
    /// Memory cap per run, in MiB.
    pub memory_mb: Option<u64>,
    /// Fuel per run (roughly, wasm instructions).
    pub fuel: Option<u64>,
    /// Runs of this agent in flight at once.
    pub concurrency: Option<u32>,
    /// KiB of each of log lines, stdout and stderr kept per run.
    pub log_kb: Option<u64>,
    /// A host directory (relative to the agents directory) the agent may
    /// read, mounted at `/data`.
    pub read_only_dir: Option<PathBuf>,
    /// Model aliases (from the operator's `colony.toml`) the agent may call.
    pub models: Option<Vec<String>>,
    /// Tokens one task may spend on model calls (default: unlimited).
    pub token_budget: Option<u64>,
    /// Origins the agent may reach over HTTP, e.g. `"https://api.example.com"`,
    /// `"http://127.0.0.1:9000"`, `"https://*.example.com"` (default: none).
    pub allowed_hosts: Option<Vec<String>>,
    /// Headers the host adds to requests to an allowed origin, with values
    /// from the environment: `[secrets."https://api.example.com"]`.
    pub secrets: Option<BTreeMap<String, super::http::SecretSpec>>,
    /// Per HTTP request (default `"30s"`).
    pub http_timeout: Option<String>,
    /// KiB of one HTTP response body the agent may read (default 1024).
    pub http_max_response_kb: Option<u64>,
    /// HTTP requests per run (default 100).
    pub http_max_requests: Option<u32>,
    /// Delivery attempts of each effect before it is marked failed
    /// (default 5: 0.5 s, 1 s, 2 s, 4 s apart, doubling up to ten minutes).
    pub effect_attempts: Option<u32>,
}

/// The largest manifest read: a few dozen lines are plenty.
const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// A manifest that is not valid TOML, or names a key we do not know: what
/// is wrong and where on the first line (a table row shows only that),
/// then TOML's own report with the offending line.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map_or(String::new(), |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(":{line}:{column}")
    });
    format!(
        "{}{at}: {}\n{}",
        path.display(),
        e.message().trim_end(),
        e.to_string().trim_end()
    )
}

impl Manifest {
    /// Reads and checks a manifest; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Manifest, String> {
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(format!(
                "{}: larger than a manifest may be ({} KiB)",
                path.display(),
                MAX_MANIFEST_BYTES >> 10
            ));
        }
        let document = toml::Deserializer::parse(&text).map_err(|e| toml_error(path, &text, &e))?;
        // A wrong type names its key (`models = "fast"`: key `models`), not
        // only its line and column.
        serde_path_to_error::deserialize(document).map_err(|e| {
            let key = e.path().to_string();
            let error = toml_error(path, &text, e.inner());
            match key.as_str() {
                "" | "." => error,
                // "unknown field `timout`" names it already.
                key if e.inner().message().contains(&format!("`{key}`")) => error,
                key => match error.split_once(": ") {
                    Some((at, why)) => format!("{at}: key `{key}`: {why}"),
                    None => error,
                },
            }
        })
    }

    /// The limits in force: the defaults, overridden by this manifest.
    pub fn limits(&self, path: &Path, agents_dir: &Path) -> Result<Limits, String> {
        let bad = |key: &str, why: String| format!("{}: key `{key}`: {why}", path.display());
        let mut limits = Limits::default();
        if let Some(timeout) = &self.timeout {
            limits.timeout = humantime::parse_duration(timeout)
                .map_err(|e| bad("timeout", format!("{e} (try \"30s\" or \"5m\")")))?;
            if limits.timeout < Duration::from_millis(1) {
                return Err(bad("timeout", "must be at least 1ms".into()));
            }
            if limits.timeout > super::MAX_TIMEOUT {
                return Err(bad(
                    "timeout",
                    format!("{timeout} is too long: at most a year"),
                ));
            }
        }
        if let Some(mb) = self.memory_mb {
            if !(1..=4096).contains(&mb) {
                return Err(bad("memory_mb", format!("{mb} is outside 1..=4096")));
            }
            limits.memory_bytes = (mb as usize) << 20;
        }
        if self.fuel == Some(0) {
            return Err(bad(
                "fuel",
                "must be at least 1 (leave the key out for no limit)".into(),
            ));
        }
        limits.fuel = self.fuel;
        if let Some(n) = self.concurrency {
            if n == 0 {
                return Err(bad("concurrency", "must be at least 1".into()));
            }
            limits.concurrency = n;
        }
        if let Some(kb) = self.log_kb {
            if kb > MAX_LOG_KB {
                return Err(bad(
                    "log_kb",
                    format!("{kb} is more than {MAX_LOG_KB} (1 GiB)"),
                ));
            }
            limits.log_bytes = (kb as usize) << 10;
        }
        if let Some(models) = &self.models {
            if let Some(bad_alias) = models.iter().find(|m| m.is_empty() || m.len() > 64) {
                return Err(bad("models", format!("{bad_alias:?} is not a model alias")));
            }
            limits.models = models.clone().into();
        }
        if self.token_budget == Some(0) {
            return Err(bad(
                "token_budget",
                "must be at least 1 (leave the key out for no limit)".into(),
            ));
        }
        limits.token_budget = self.token_budget;
        if let Some(n) = self.effect_attempts {
            let max = crate::effects::MAX_DELIVERY_ATTEMPTS;
            if !(1..=max).contains(&n) {
                return Err(bad("effect_attempts", format!("{n} is outside 1..={max}")));
            }
            limits.effect_attempts = n;
        }
        let http = super::http::ManifestHttp {
            allowed_hosts: self.allowed_hosts.as_deref(),
            secrets: self.secrets.as_ref(),
            http_timeout: self.http_timeout.as_deref(),
            http_max_response_kb: self.http_max_response_kb,
            http_max_requests: self.http_max_requests,
        };
        limits.http = Arc::new(
            super::HttpGrant::from_manifest(http, |var| std::env::var(var).ok())
                .map_err(|(key, why)| bad(&key, why))?,
        );
        if let Some(dir) = &self.read_only_dir {
            // Confined to the agents directory: a manifest shipped with a
            // third-party agent must not be able to mount `/` or a home folder.
            let full = agents_dir.join(dir);
            let resolved = full
                .canonicalize()
                .map_err(|e| bad("read_only_dir", format!("{}: {e}", full.display())))?;
            let root = agents_dir
                .canonicalize()
                .unwrap_or_else(|_| agents_dir.to_path_buf());
            if !resolved.is_dir() {
                return Err(bad(
                    "read_only_dir",
                    format!("{} is not a directory", full.display()),
                ));
            }
            if !resolved.starts_with(&root) {
                return Err(bad(
                    "read_only_dir",
                    format!(
                        "{} is outside the agents directory {}",
                        resolved.display(),
                        root.display()
                    ),
                ));
            }
            limits.read_only_dir = Some(resolved);
        }
        Ok(limits)
    }
}

/// Whether an agent is usable.
#[derive(Clone, Debug)]
pub enum AgentStatus {
    Loaded(Arc<Agent>),
    /// Why it is not loaded (names the file and the reason).
    Broken(String),
}

/// One `*.wasm` entry of the agents directory (a file, or anything else
/// so named, which is reported as broken).
#[derive(Clone, Debug)]
pub struct AgentEntry {
    pub name: String,
    pub path: PathBuf,
    pub status: AgentStatus,
    fingerprint: Fingerprint,
}

/// What a rescan looks at to decide whether a file changed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    wasm: FileStamp,
    manifest: Option<FileStamp>,
}

/// What tells a file's versions apart without reading it: its size and
/// modification time, and on Unix which file it is (device, inode) and
/// when that last changed. Size and modification time alone missed a
/// release folder of reproducible builds swapped in by a symlink: files
/// of other content with the same size and time, never read again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Device, inode, and the inode's change time (s, ns).
    file: (u64, u64, i64, i64),
}

impl FileStamp {
    /// The stamp of the file at `path`, if there is one.
    pub fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let file = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
        };
        #[cfg(not(unix))]
        let file = (0, 0, 0, 0);
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            file,
        })
    }
}

/// What a rescan changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub broken: Vec<(String, String)>,
    pub removed: Vec<String>,
}

impl ScanReport {
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty() && self.broken.is_empty() && self.removed.is_empty()
    }
}

/// The agents directory and what was loaded from it (cheap to clone: the
/// compiled agents are shared).
#[derive(Clone)]
pub struct AgentDir {
    dir: PathBuf,
    entries: BTreeMap<String, AgentEntry>,
    /// Manifests beside no component, already warned about.
    unmatched: BTreeSet<PathBuf>,
    /// Whether the folder was scanned before: the first scan's loads are
    /// what every command prints or the daemon's start line lists, so only
    /// later ones (an agent added or changed) are logged as news.
    scanned: bool,
    /// Why the folder could not be listed at the last scan, once said.
    unreadable: Option<String>,
}

/// Why a `*.toml` with no `<name>.wasm` beside it limits nothing.
const NO_AGENTS_MANIFEST: &str =
    "no agent's manifest: a manifest is <name>.toml beside <name>.wasm";

impl AgentDir {
    pub fn new(dir: impl Into<PathBuf>) -> AgentDir {
        AgentDir {
            dir: dir.into(),
            entries: BTreeMap::new(),
            unmatched: BTreeSet::new(),
            scanned: false,
            unreadable: None,
        }
    }

    /// The `*.toml` files of the folder with no `<name>.wasm` beside them:
    /// a manifest named `echo.wasm.toml` or `Echo.toml` limits nothing,
    /// and without a word its author would think it did.
    pub fn unmatched_manifests(&self) -> Vec<PathBuf> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut unmatched: Vec<PathBuf> = read
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension().is_some_and(|e| e == "toml")
                    && !path.with_extension("wasm").exists()
                    // The operator's configuration, in an agents folder that
                    // is also the working directory.
                    && path.file_name().is_some_and(|n| n != "colony.toml")
            })
            .collect();
        unmatched.sort();
        unmatched
    }

    /// Files of the folder meant for it that are no agent, with why:
    /// manifests with no component beside them, and components whose name
    /// does not end in `.wasm` in lower case (`colony agents` lists them;
    /// it said nothing of them, though its help says every file).
    pub fn stray_files(&self) -> Vec<(PathBuf, String)> {
        let mut stray: Vec<(PathBuf, String)> = self
            .unmatched_manifests()
            .into_iter()
            .map(|path| (path, NO_AGENTS_MANIFEST.to_string()))
            .collect();
        if let Ok(read) = std::fs::read_dir(&self.dir) {
            for path in read.flatten().map(|entry| entry.path()) {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if ext != "wasm" && ext.eq_ignore_ascii_case("wasm") {
                    let why = "not loaded: an agent's file name ends in .wasm, in lower case";
                    stray.push((path, why.to_string()));
                }
            }
        }
        stray.sort();
        stray
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every agent file seen, loaded or not, by name.
    pub fn entries(&self) -> impl Iterator<Item = &AgentEntry> {
        self.entries.values()
    }

    /// The loaded agent of that name, if it is usable.
    pub fn loaded(&self, name: &str) -> Option<Arc<Agent>> {
        match self.entries.get(name).map(|e| &e.status) {
            Some(AgentStatus::Loaded(agent)) => Some(agent.clone()),
            _ => None,
        }
    }

    pub fn loaded_names(&self) -> Vec<String> {
        self.entries
            .values()
            .filter(|e| matches!(e.status, AgentStatus::Loaded(_)))
            .map(|e| e.name.clone())
            .collect()
    }

    /// Looks at the directory again and loads what is new or changed (by
    /// [`FileStamp`], then by content hash). A replaced agent's
    /// runs already in flight keep the version they started with: they hold
    /// their own `Arc<Agent>`.
    pub async fn rescan(&mut self, runtime: &Runtime) -> ScanReport {
        let mut report = ScanReport::default();
        let first_scan = !std::mem::replace(&mut self.scanned, true);
        // A folder that cannot be listed now (too many open files, a
        // permission or network file system hiccup) is not an empty one:
        // its agents stay loaded rather than all being removed.
        let found = match self.list_wasm_files() {
            Ok(found) => found,
            Err(e) => {
                let why = e.to_string();
                if self.unreadable.as_ref() != Some(&why) {
                    tracing::warn!(
                        "cannot list the agents folder {} ({why}); the agents loaded stay loaded until it can be read again",
                        self.dir.display()
                    );
                    self.unreadable = Some(why);
                }
                return report;
            }
        };
        self.unreadable = None;
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|name| !found.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.entries.remove(&name);
            tracing::info!(agent = %name, "agent removed");
            report.removed.push(name);
        }
        let unmatched: BTreeSet<PathBuf> = self.unmatched_manifests().into_iter().collect();
        for path in unmatched.difference(&self.unmatched) {
            tracing::warn!("{} is {NO_AGENTS_MANIFEST}", path.display());
        }
        self.unmatched = unmatched;
        for (name, path) in found {
            let manifest_path = self.dir.join(format!("{name}.toml"));
            let fingerprint = Fingerprint {
                wasm: FileStamp::of(&path).unwrap_or_default(),
                manifest: FileStamp::of(&manifest_path),
            };
            if self
                .entries
                .get(&name)
                .is_some_and(|e| e.fingerprint == fingerprint)
            {
                continue;
            }
            let status = self
                .load(
                    runtime,
                    &name,
                    &path,
                    &manifest_path,
                    fingerprint.manifest.is_some(),
                )
                .await;
            let unchanged = match (self.loaded(&name), &status) {
                (Some(old), AgentStatus::Loaded(new)) => Arc::ptr_eq(&old, new),
                _ => false,
            };
            match &status {
                _ if unchanged => {}
                AgentStatus::Loaded(_) if first_scan => {
                    tracing::debug!(agent = %name, path = %path.display(), "agent loaded");
                    report.loaded.push(name.clone());
                }
                AgentStatus::Loaded(agent) => {
                    tracing::info!(agent = %name, path = %path.display(), "agent loaded");
                    // Said at start for the agents found then; a manifest
                    // changed later grants as it likes.
                    for alias in runtime.unconfigured_models(&agent.limits.models) {
                        tracing::warn!(
                            agent = %name,
                            "granted the model alias {alias:?}, which this host's configuration (read at start) does not declare; its calls will be refused"
                        );
                    }
                    report.loaded.push(name.clone());
                }
                AgentStatus::Broken(reason) => {
                    tracing::warn!(agent = %name, "agent not loaded: {reason}");
                    report.broken.push((name.clone(), reason.clone()));
                }
            }
            self.entries.insert(
                name.clone(),
                AgentEntry {
                    name,
                    path,
                    status,
                    fingerprint,
                },
            );
        }
        report
    }

    /// The `*.wasm` entries of the folder by name; none when the folder is
    /// not there (removed: its agents go with it).
    fn list_wasm_files(&self) -> std::io::Result<BTreeMap<String, PathBuf>> {
        let mut found = BTreeMap::new();
        let read = match std::fs::read_dir(&self.dir) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        // Every entry so named, whatever it is: `load` says why a dangling
        // link, a directory or an unreadable name cannot be an agent.
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wasm")
                && let Some(stem) = path.file_stem()
            {
                found.insert(stem.to_string_lossy().into_owned(), path);
            }
        }
        Ok(found)
    }

    async fn load(
        &self,
        runtime: &Runtime,
        name: &str,
        path: &Path,
        manifest_path: &Path,
        has_manifest: bool,
    ) -> AgentStatus {
        if let Err(why) = crate::task::check_agent_name(name) {
            return AgentStatus::Broken(format!("{}: invalid file name: {why}", path.display()));
        }
        if let Some(reason) = not_a_file(path) {
            return AgentStatus::Broken(reason);
        }
        let limits = if has_manifest {
            // Checked before reading: a FIFO would block the rescan (and the
            // daemon with it), and a link to a file outside the folder (say
            // /proc/self/environ) would be quoted in the TOML error, on the
            // dashboard and in logs.
            if let Some(reason) =
                not_a_file(manifest_path).or_else(|| outside_folder(manifest_path, &self.dir))
            {
                return AgentStatus::Broken(reason);
            }
            match Manifest::load(manifest_path).and_then(|m| m.limits(manifest_path, &self.dir)) {
                Ok(limits) => limits,
                Err(reason) => return AgentStatus::Broken(reason),
            }
        } else {
            Limits::default()
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => return AgentStatus::Broken(format!("{}: {e}", path.display())),
        };
        // Unchanged content (a touched file): keep the compiled agent.
        if let Some(AgentStatus::Loaded(old)) = self.entries.get(name).map(|e| &e.status) {
            let hash = super::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if old.hash == hash && old.limits == limits {
                return AgentStatus::Loaded(old.clone());
            }
        }
        match runtime.load_agent(name, path, &bytes, limits).await {
            Ok(agent) => AgentStatus::Loaded(Arc::new(agent)),
            Err(RuntimeError::Load { path, reason }) => {
                AgentStatus::Broken(format!("{}: {reason}", path.display()))
            }
            Err(e) => AgentStatus::Broken(e.to_string()),
        }
    }
}

/// Why a manifest that is a symbolic link may not be read: it leads out
/// of the agents folder `dir`.
fn outside_folder(path: &Path, dir: &Path) -> Option<String> {
    let target = path.canonicalize().ok()?;
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    (!target.starts_with(&root)).then(|| {
        format!(
            "{}: a symbolic link to {}, outside the agents folder; a manifest must be a file in it",
            path.display(),
            target.display()
        )
    })
}

/// Why a `*.wasm` or `*.toml` entry cannot be read, if it cannot.
fn not_a_file(path: &Path) -> Option<String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(meta) if meta.is_dir() => Some(format!("{shown}: a directory, not a component file")),
        Ok(_) => Some(format!(
            "{shown}: not a regular file (a component or manifest must be one)"
        )),
        Err(e) => Some(match std::fs::read_link(path) {
            Ok(target) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "{shown}: a symbolic link to {}, which does not exist",
                target.display()
            ),
            Ok(target) => format!("{shown}: a symbolic link to {}: {e}", target.display()),
            Err(_) => format!("{shown}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits_of(manifest: &str) -> Result<Limits, String> {
        let manifest: Manifest = toml::from_str(manifest).unwrap();
        manifest.limits(Path::new("agents/a.toml"), Path::new("agents"))
    }

    #[test]
    fn a_timeout_is_a_millisecond_to_a_year() {
        assert_eq!(
            limits_of("timeout = \"1ms\"").unwrap().timeout,
            Duration::from_millis(1)
        );
        assert_eq!(
            limits_of("timeout = \"365days\"")
                .unwrap()
                .timeout
                .as_secs(),
            365 * 86_400
        );
        let short = limits_of("timeout = \"1ns\"").unwrap_err();
        assert_eq!(short, "agents/a.toml: key `timeout`: must be at least 1ms");
        let long = limits_of("timeout = \"1000000d\"").unwrap_err();
        assert!(
            long.contains("key `timeout`: 1000000d is too long: at most a year"),
            "{long}"
        );
    }
}
