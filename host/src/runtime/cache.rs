//! The compile cache: a component compiled once is kept on disk, named by
//! its content hash and the engine's, and loaded again by the next process
//! (a Python component takes ~10 s to compile on two cores; loading it from
//! the cache 0.03 s). Deserializing compiled code runs it unchecked, so a
//! file is trusted only when this user wrote it into a folder no one else
//! may write to; otherwise the cache is not used.

use std::hash::{Hash, Hasher};
use std::path::Path;

use wasmtime::Engine;
use wasmtime::component::Component;

/// The component of `bytes` (whose content hash is `hash`), from the cache
/// in `dir` when a trusted copy is there, else compiled (and written there).
/// `describe` words a compile error for the agent's author.
pub(super) fn load_or_compile(
    engine: &Engine,
    bytes: &[u8],
    hash: &str,
    dir: &Path,
    describe: impl Fn(wasmtime::Error) -> String,
) -> Result<Component, String> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let cached = dir.join(format!("{hash}-{:016x}.cwasm", hasher.finish()));
    // Deserializing compiled code runs it unchecked: only a file this
    // user wrote, in a folder no one else may write to, is trusted.
    let trusted = match trusted_cache_file(dir, &cached) {
        Ok(trusted) => trusted,
        Err(why) => {
            tracing::warn!(
                "not using the compile cache {}: {why}; compiling instead",
                dir.display()
            );
            let compiled = engine.precompile_component(bytes).map_err(&describe)?;
            // SAFETY: `compiled` was produced just now by this engine.
            return unsafe { Component::deserialize(engine, &compiled) }.map_err(&describe);
        }
    };
    if trusted {
        // SAFETY: the file is in a cache folder only this user may write
        // to, owned by this user, named by the content hash and engine
        // hash, and written by `precompile_component`.
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(component) => return Ok(component),
            Err(e) => tracing::warn!("ignoring unusable cache file {}: {e}", cached.display()),
        }
    }
    let compiled = engine.precompile_component(bytes).map_err(&describe)?;
    if let Err(e) = write_atomically(dir, &cached, &compiled) {
        tracing::warn!(
            "could not write the compile cache {}: {e}",
            cached.display()
        );
    }
    // SAFETY: `compiled` was produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }.map_err(&describe)
}

/// Whether the compile cache file `cached` may be deserialized: `Ok(true)`
/// when it is there and trusted, `Ok(false)` when it is not there (compile
/// and write it), `Err(why)` when the folder or the file could have been
/// written by someone else (another user, a symbolic link): then the cache
/// is not used at all.
fn trusted_cache_file(dir: &Path, cached: &Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let check = |path: &Path, what: &str| -> Result<bool, String> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if meta.file_type().is_symlink() {
            return Err(format!("{what} {} is a symbolic link", path.display()));
        }
        if meta.uid() != me {
            return Err(format!(
                "{what} {} belongs to uid {}, not to this user ({me})",
                path.display(),
                meta.uid()
            ));
        }
        // A folder of ours that others may write to (a umask of 002): made
        // ours alone first; files others put there fail the owner check.
        if meta.is_dir() && meta.mode() & 0o022 != 0 {
            use std::os::unix::fs::PermissionsExt;
            let tightened = std::fs::Permissions::from_mode(meta.mode() & 0o7755);
            std::fs::set_permissions(path, tightened)
                .map_err(|e| format!("{what} {}: {e}", path.display()))?;
            return Ok(true);
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{what} {} may be written by other users (mode {:o})",
                path.display(),
                meta.mode() & 0o7777
            ));
        }
        Ok(true)
    };
    if !check(dir, "the folder")? {
        return Ok(false); // created when the first file is written
    }
    check(cached, "the file")
}

/// Writes through a temporary file in the same directory and renames it
/// into place, so a reader never sees a half-written file.
fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    // This user's alone: only its own files are ever loaded from it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(target).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_cache_folder_others_may_write_to_is_made_ours_and_its_files_judged() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let file = cache.join("x.cwasm");
        assert_eq!(trusted_cache_file(&cache, &file), Ok(false), "no file yet");
        assert_eq!(mode(&cache), 0o755, "others may no longer write to it");

        std::fs::write(&file, b"compiled").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(trusted_cache_file(&cache, &file), Ok(true));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o620)).unwrap();
        let why = trusted_cache_file(&cache, &file).unwrap_err();
        assert!(
            why.contains("may be written by other users (mode 620)"),
            "{why}"
        );

        let link = cache.join("link.cwasm");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let why = trusted_cache_file(&cache, &link).unwrap_err();
        assert!(why.contains("is a symbolic link"), "{why}");

        write_atomically(
            &dir.path().join("new"),
            &dir.path().join("new/y.cwasm"),
            b"y",
        )
        .unwrap();
        assert_eq!(mode(&dir.path().join("new")), 0o700);
    }
}
