//! `colony new NAME --lang rust|python|js`: a working agent project, made
//! from the `wordcount` example of that language (agents/examples), renamed,
//! with the WIT this binary speaks and a README naming its one build command.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::BadInput;
use super::builtin::WIT_FILES;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The agent's name: the component becomes agents/NAME.wasm (letters,
    /// digits, '-' and '_').
    pub name: String,
    /// The language: rust (wasm32-wasip2 + wit-bindgen), python
    /// (componentize-py) or js (componentize-js).
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// Where to create the project (default: ./NAME); it must not exist or
    /// be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A file of a template: its path in the project, and its text with
/// `wordcount` still in it.
type Template = (&'static str, &'static str);

const RUST: &[Template] = &[
    (
        "src/lib.rs",
        include_str!("../../../agents/examples/rust/src/lib.rs"),
    ),
    ("Cargo.toml", RUST_MANIFEST),
];

const RUST_MANIFEST: &str = r#"[package]
name = "wordcount"
version = "0.1.0"
edition = "2024"
publish = false

# Not part of any enclosing workspace.
[workspace]

[lib]
# cdylib: the component; rlib: `cargo test` runs the logic natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
serde_json = "1"

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = { version = "=0.63.0", default-features = false, features = ["macros", "realloc"] }

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = "debuginfo"
"#;

const PYTHON: &[Template] = &[
    (
        "app.py",
        include_str!("../../../agents/examples/python/app.py"),
    ),
    (
        "logic.py",
        include_str!("../../../agents/examples/python/wordcount.py"),
    ),
    (
        "test_logic.py",
        include_str!("../../../agents/examples/python/test_wordcount.py"),
    ),
    (
        "requirements.txt",
        include_str!("../../../agents/examples/python/requirements.txt"),
    ),
];

const JS: &[Template] = &[
    ("app.js", include_str!("../../../agents/examples/js/app.js")),
    (
        "logic.js",
        include_str!("../../../agents/examples/js/wordcount.js"),
    ),
    (
        "logic.test.js",
        include_str!("../../../agents/examples/js/wordcount.test.js"),
    ),
    (
        "build.mjs",
        include_str!("../../../agents/examples/js/build.mjs"),
    ),
    (
        "package.json",
        include_str!("../../../agents/examples/js/package.json"),
    ),
];

/// The build command, the component it writes, and the test command.
fn commands(lang: Lang, name: &str) -> (String, String, &'static str) {
    match lang {
        Lang::Rust => (
            "cargo build --release --target wasm32-wasip2".into(),
            format!(
                "target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            ),
            "cargo test",
        ),
        Lang::Python => (
            format!("componentize-py -d wit -w agent componentize app -o {name}.wasm"),
            format!("{name}.wasm"),
            "python3 -m unittest",
        ),
        Lang::Js => (
            "npm install && npm run build".into(),
            format!("{name}.wasm"),
            "npm test",
        ),
    }
}

/// The examples' hooks for the repository's tests (`raise`, `spin`): a
/// new agent leaves them out, or any submitter could crash it or hold a
/// slot until its deadline.
const TEST_HOOKS: &[&str] = &[
    ", \"raise\": bool, \"spin\": bool",
    "\n        if payload.get(\"raise\"):\n            raise RuntimeError(\"asked to raise\")\n        if payload.get(\"spin\"):\n            while True:\n                pass",
    "\n    if (payload.raise) throw new TypeError(\"asked to raise\");\n    if (payload.spin) for (;;) {}",
    "\n            if payload[\"raise\"] == true {\n                panic!(\"asked to raise\");\n            }\n            if payload[\"spin\"] == true {\n                #[allow(clippy::empty_loop)]\n                loop {}\n            }",
];

/// The template's text for an agent called `name`.
fn render(text: &str, name: &str) -> String {
    let mut text = text.to_string();
    for hook in TEST_HOOKS {
        text = text.replace(hook, "");
    }
    // What is true of the examples side by side, not of a project alone.
    for (example, project) in [
        (
            " The Python and\n//! JavaScript examples beside it do the same job, so they can be compared.",
            " Made by `colony new`.",
        ),
        (
            " The Rust and\nJavaScript examples beside it do the same job, so they can be compared.",
            " Made by `colony new`.",
        ),
        (
            " The Rust\n// and Python examples beside it do the same job, so they can be compared.",
            " Made by `colony new`.",
        ),
        ("../../../wit, the repository's", "wit"),
        ("colony-example-", "colony-agent-"),
        ("Colony example agent", "Colony agent"),
    ] {
        text = text.replace(example, project);
    }
    text.replace("../../../wit", "wit")
        .replace("from wordcount import", "from logic import")
        .replace("./wordcount.js", "./logic.js")
        .replace("(`agents/examples`)", "")
        .replace("wordcount", name)
}

/// What a Python agent's author must know about imports: componentize-py
/// bundles the modules imported when the component is built, and a run
/// has no file system to find others in.
const PYTHON_IMPORTS: &str = "\nImport every module at the top of a file, not inside a function:\n\
     componentize-py bundles the modules imported when it builds the component, and\n\
     a run has no file system to find others in (an import inside `run` fails with\n\
     `ModuleNotFoundError`).\n";

fn readme(lang: Lang, name: &str) -> String {
    let (build, output, test) = commands(lang, name);
    let toolchain = match lang {
        Lang::Rust => "Rust with the target: `rustup target add wasm32-wasip2`",
        Lang::Python => {
            "componentize-py, pinned in requirements.txt: `pip install -r requirements.txt`"
        }
        Lang::Js => "Node.js and npm; componentize-js is pinned in package.json",
    };
    let note = match lang {
        Lang::Python => PYTHON_IMPORTS,
        _ => "",
    };
    format!(
        "# {name}\n\nA Colony agent, made by `colony new`. It counts the words of\n\
         `payload.text`; change the handler to do your agent's job.\n\n\
         Toolchain: {toolchain}.\n\n\
         Build (one command):\n\n    {build}\n\n\
         Then copy `{output}` to your colony's `agents/{name}.wasm` and run it:\n\n\
         \x20   colony submit {name} '{{\"text\": \"the quick brown fox\"}}'\n\
         \x20   colony daemon --until-idle\n\n\
         Unit tests: `{test}`. The WIT it is built against is in `wit/`\n\
         (`colony wit --out wit` refreshes it).\n{note}"
    )
}

/// What the language's toolchain lacks on this machine, with the command
/// that installs it (`None`: it looks ready).
pub fn missing_toolchain(lang: Lang) -> Option<String> {
    let runs = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match lang {
        Lang::Rust => {
            let installed = std::process::Command::new("rustup")
                .args(["target", "list", "--installed"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2"));
            match installed {
                Ok(true) => None,
                Ok(false) => Some("the Rust target wasm32-wasip2: rustup target add wasm32-wasip2".into()),
                Err(_) => Some("Rust (rustup, https://rustup.rs), then: rustup target add wasm32-wasip2".into()),
            }
        }
        Lang::Python => (!runs("componentize-py", &["--version"])).then(|| {
            "componentize-py (PyPI): pip install -r requirements.txt (componentize-py==0.25.1)".into()
        }),
        Lang::Js => (!runs("npm", &["--version"])).then(|| {
            "Node.js and npm (Debian: apt-get install nodejs npm); componentize-js then comes with npm install".into()
        }),
    }
}

/// A Rust agent's name is its crate's: cargo refuses one that starts with a
/// digit, or is a keyword or the name of a built-in crate, and the project
/// would be written only to fail at its first build.
fn check_crate_name(name: &str) -> Result<(), String> {
    const RESERVED: [&str; 44] = [
        "as",
        "async",
        "await",
        "break",
        "const",
        "continue",
        "crate",
        "dyn",
        "else",
        "enum",
        "extern",
        "false",
        "fn",
        "for",
        "if",
        "impl",
        "in",
        "let",
        "loop",
        "match",
        "mod",
        "move",
        "mut",
        "pub",
        "ref",
        "return",
        "self",
        "static",
        "struct",
        "super",
        "trait",
        "true",
        "type",
        "unsafe",
        "use",
        "where",
        "while",
        "abstract",
        "alloc",
        "core",
        "proc_macro",
        "std",
        "test",
        "try",
    ];
    let crate_name = name.replace('-', "_");
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!(
            "a Rust agent's name is its crate's, which must start with a letter: {name:?} does not (try \"agent-{name}\")"
        ));
    }
    if RESERVED.contains(&crate_name.as_str()) {
        return Err(format!(
            "a Rust agent's name is its crate's, and cargo refuses {name:?} (a keyword or a built-in crate's name)"
        ));
    }
    Ok(())
}

/// Writes the project; returns its directory and the README's build command.
pub fn scaffold(args: &NewArgs) -> Result<(PathBuf, String)> {
    crate::task::check_agent_name(&args.name).map_err(BadInput)?;
    if args.lang == Lang::Rust {
        check_crate_name(&args.name).map_err(BadInput)?;
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && !dir.is_dir() {
        return Err(BadInput(format!(
            "{} is a file: colony new writes a project into a new or empty directory (give one with --dir)",
            dir.display()
        ))
        .into());
    }
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(BadInput(format!(
            "{} already exists and is not empty: colony new writes only into a new or empty directory (give another with --dir)",
            dir.display()
        ))
        .into());
    }
    let templates = match args.lang {
        Lang::Rust => RUST,
        Lang::Python => PYTHON,
        Lang::Js => JS,
    };
    let mut files: Vec<(PathBuf, String)> = templates
        .iter()
        .map(|(path, text)| (dir.join(path), render(text, &args.name)))
        .collect();
    files.push((dir.join("README.md"), readme(args.lang, &args.name)));
    for (path, text) in WIT_FILES {
        files.push((dir.join("wit").join(path), text.to_string()));
    }
    for (path, text) in &files {
        write(path, text)?;
    }
    Ok((dir, commands(args.lang, &args.name).0))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new agent has none of the examples' test hooks, whichever its
    /// language; each hook is found in a template (a stale list would
    /// remove nothing and say nothing).
    #[test]
    fn a_new_agent_leaves_out_the_test_hooks() {
        for hook in TEST_HOOKS {
            let found = [RUST, PYTHON, JS]
                .iter()
                .any(|templates| templates.iter().any(|(_, text)| text.contains(hook)));
            assert!(found, "no template holds {hook:?}");
        }
        for templates in [RUST, PYTHON, JS] {
            for (path, text) in templates {
                let made = render(text, "hello");
                for word in ["raise\"", "spin", "asked to raise"] {
                    assert!(!made.contains(word), "{path} keeps {word:?}:\n{made}");
                }
            }
        }
    }
}
