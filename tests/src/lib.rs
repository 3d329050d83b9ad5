//! Helpers for Colony's component and end-to-end tests (in `tests/tests/`).
//!
//! `build.rs` compiles the guest fixtures in `tests/guests/` — small agents
//! with one behaviour each (`echo`, `flaky`, `spin`, `membomb`, ...) — and
//! these helpers hand them to tests by name.

pub mod model_server;
pub mod postgres;

use std::path::{Path, PathBuf};

use tempfile::TempDir;

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The compiled component of the fixture `name` (e.g. `"echo"`).
///
/// # Panics
/// If there is no such fixture: a typo should fail loudly here rather than
/// show up later as a confusing "unknown agent" error from the host.
pub fn guest_path(name: &str) -> PathBuf {
    match GUESTS.iter().find(|(known, _)| *known == name) {
        Some((_, path)) => PathBuf::from(path),
        None => {
            let known: Vec<&str> = GUESTS.iter().map(|(n, _)| *n).collect();
            panic!(
                "no guest fixture named {name:?} (known: {})",
                known.join(", ")
            )
        }
    }
}

/// A fresh agents directory holding each named fixture as `<name>.wasm`, the
/// layout the host loads agents from. The files are copies, so a test may
/// replace or delete them without touching the shared build output; the
/// directory is removed when the returned `TempDir` is dropped.
pub fn agents_dir_with(names: &[&str]) -> TempDir {
    let dir = tempfile::tempdir().expect("creating a temporary agents directory");
    for name in names {
        let (from, to) = (guest_path(name), dir.path().join(format!("{name}.wasm")));
        std::fs::copy(&from, &to)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
    dir
}

/// Writes `bytes` as the agent `name` (`<dir>/<name>.wasm`), for tests that
/// need a broken, empty or hand-made component, or swap one agent for another.
pub fn write_agent(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A compile cache shared by every test in one test binary: each component is
/// compiled once instead of once per test (compiling dominates on 2 cores).
/// Concurrent writers are safe: the runtime writes cache files atomically.
pub fn shared_compile_cache() -> &'static Path {
    static CACHE: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| tempfile::tempdir().expect("creating the shared compile cache"))
        .path()
}
