//! Compiles the guest fixtures in `guests/` to components and generates
//! `$OUT_DIR/guests.rs`, which maps each fixture name to its `.wasm` file so
//! tests never depend on where the guest build happens to put its output.

#[path = "../host/build_guests.rs"]
mod build_guests;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    // The fixtures generate their bindings from the shared contract, which
    // lives outside `guests/` and so is not watched by the helper.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../wit").display()
    );

    let built = build_guests::build_guest_workspace(
        &manifest_dir.join("guests"),
        &build_guests::guest_target_dir("test-guests"),
    );

    let mut src = String::from(
        "/// `(fixture name, absolute path of its component)` for every guest in `tests/guests/`.\n\
         pub const GUESTS: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &built {
        if let Some(name) = name.strip_prefix("guest_") {
            let path = path.to_str().expect("guest paths are UTF-8");
            src.push_str(&format!("    ({name:?}, {path:?}),\n"));
        }
    }
    src.push_str("];\n");

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("guests.rs");
    std::fs::write(&out, src).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
