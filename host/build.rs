// Builds the store agents (the guest workspace in `agents/`) into WebAssembly
// components and puts them at `agents/<name>.wasm`, where `colony demo` finds
// them; also builds the test guests that `colony bench` and `colony torture`
// embed. Runs on every fresh checkout and whenever an agent's sources, the
// guest workspace's manifests or the WIT contract change.

#[path = "build_guests.rs"]
mod build_guests;

use std::fs;
use std::path::{Path, PathBuf};

/// The agents `colony demo` runs; each is a crate of the `agents/` workspace.
const AGENTS: [&str; 4] = ["design", "code", "marketing", "ops"];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir
        .parent()
        .expect("the host crate lives inside the workspace");
    let agents_dir = workspace_root.join("agents");

    // Declaring any rerun-if-changed replaces cargo's default of rerunning on
    // every change in the host package; build_guests adds the agents' sources.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_guests.rs");
    println!("cargo:rerun-if-changed=../wit");

    let built =
        build_guests::build_guest_workspace(&agents_dir, &build_guests::guest_target_dir("agents"));
    for name in AGENTS {
        let (_, component) = built
            .iter()
            .find(|(stem, _)| stem == name)
            .unwrap_or_else(|| {
                panic!(
                    "the agents workspace built no {name}.wasm (built: {:?})",
                    built.iter().map(|(n, _)| n).collect::<Vec<_>>()
                )
            });
        install(component, &agents_dir.join(format!("{name}.wasm")));
        // `colony bench` measures loading these from the compile cache.
        println!(
            "cargo:rustc-env=COLONY_AGENT_{}={}",
            name.to_uppercase(),
            component.display()
        );
    }

    // The Rust example (agents/examples/rust), for the tests that run the
    // three languages' examples side by side.
    let (_, example) = built
        .iter()
        .find(|(stem, _)| stem == "wordcount")
        .expect("the agents workspace built the wordcount example");
    println!(
        "cargo:rustc-env=COLONY_EXAMPLE_WORDCOUNT={}",
        example.display()
    );

    // `colony bench` and `colony torture` carry their fixture guests inside
    // the binary, so they run anywhere without a separate build step.
    let fixtures = build_guests::build_guest_workspace(
        &workspace_root.join("tests").join("guests"),
        &build_guests::guest_target_dir("test-guests"),
    );
    for name in ["noop", "sleeper", "stateful", "thinker"] {
        let (_, component) = fixtures
            .iter()
            .find(|(stem, _)| *stem == format!("guest_{name}"))
            .unwrap_or_else(|| panic!("tests/guests built no guest_{name}.wasm"));
        println!(
            "cargo:rustc-env=COLONY_GUEST_{}={}",
            name.to_uppercase(),
            component.display()
        );
    }
}

/// Copies `component` to `dest` unless `dest` already holds the same bytes, so
/// an unchanged agent keeps its mtime and the host does not see a new version.
/// The copy goes through a temporary file and a rename, so a running host
/// never reads a half-written component.
fn install(component: &Path, dest: &Path) {
    let bytes =
        fs::read(component).unwrap_or_else(|e| panic!("reading {}: {e}", component.display()));
    if fs::read(dest).is_ok_and(|existing| existing == bytes) {
        return;
    }
    let file_name = dest
        .file_name()
        .expect("dest names a file")
        .to_string_lossy();
    let partial = dest.with_file_name(format!(".{file_name}.partial"));
    let result = fs::write(&partial, &bytes).and_then(|()| fs::rename(&partial, dest));
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        panic!(
            "installing {} as {}: {e}",
            component.display(),
            dest.display()
        );
    }
}
