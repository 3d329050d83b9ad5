// Shared by `host/build.rs` (builds `agents/`) and `tests/build.rs` (builds the
// test guests): compiles a guest cargo workspace for `wasm32-wasip2` and returns
// the components it produced. Kept in one file so both build scripts agree on
// how a guest is built.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const GUEST_TARGET: &str = "wasm32-wasip2";

/// Builds every `cdylib` of the guest workspace at `workspace_dir` in release
/// mode and returns `(crate_name_with_underscores, path_to_component)` pairs.
pub fn build_guest_workspace(workspace_dir: &Path, target_dir: &Path) -> Vec<(String, PathBuf)> {
    ensure_target_installed();
    watch_sources(workspace_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_dir)
        .args(["build", "--release", "--target", GUEST_TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    // The outer build's flags are for the host target, not for the guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo for {}: {e}", workspace_dir.display()));
    assert!(
        status.success(),
        "building the guest workspace {} failed (see the cargo output above)",
        workspace_dir.display()
    );

    let out_dir = target_dir.join(GUEST_TARGET).join("release");
    let mut built: Vec<(String, PathBuf)> = std::fs::read_dir(&out_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", out_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "wasm"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    built.sort();
    built
}

/// `RUSTUP_AUTO_INSTALL=0` means rustup does not install the target named in
/// rust-toolchain.toml by itself; fail with the fix instead of a cryptic error.
fn ensure_target_installed() {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        return; // no rustup: trust the toolchain to have the target
    };
    let installed = String::from_utf8_lossy(&out.stdout);
    if !installed.lines().any(|l| l.trim() == GUEST_TARGET) {
        panic!(
            "the Rust target {GUEST_TARGET} is not installed; run `rustup target add {GUEST_TARGET}` and build again"
        );
    }
}

/// Asks cargo to rerun the build script when a guest source changes. The guest
/// workspace's root folder itself is not watched: built `.wasm` files and
/// user-dropped components live there and must not trigger rebuilds.
fn watch_sources(workspace_dir: &Path) {
    for name in ["Cargo.toml", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_dir.join(name).display()
        );
    }
    let wit = workspace_dir.join("wit");
    if wit.exists() {
        println!("cargo:rerun-if-changed={}", wit.display());
    }
    for entry in std::fs::read_dir(workspace_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path.is_dir()
            && path
                .file_name()
                .is_some_and(|n| n != "target" && n != "wit")
        {
            watch_tree(&path);
        }
    }
}

fn watch_tree(dir: &Path) {
    // Build output and the other languages' toolchains (agents/examples)
    // are not Rust sources.
    if dir
        .file_name()
        .is_some_and(|n| n == "target" || n == "node_modules" || n == "__pycache__")
    {
        return;
    }
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            watch_tree(&path);
        } else if path.extension().is_none_or(|e| e != "wasm") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// A target folder for guest builds shared by every profile of the outer build
/// (`<outer target>/guests/<name>`), so dev, test and release builds compile
/// the guests once. Derived from `OUT_DIR` = `<target>/<profile>/build/<pkg>/out`.
pub fn guest_target_dir(name: &str) -> PathBuf {
    let out_dir =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    let outer_target = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent())
        .and_then(|profile| profile.parent())
        .map(Path::to_path_buf)
        .unwrap_or(out_dir);
    outer_target.join("guests").join(name)
}
