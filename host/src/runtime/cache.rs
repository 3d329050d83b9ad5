//! The compile cache: a component compiled once is kept on disk, named by
//! its content hash and the engine's, and loaded again by the next process
//! (a Python component takes ~10 s to compile on two cores; loading it from
//! the cache 0.03 s). Deserializing compiled code runs it unchecked, so a
//! file is trusted only when this user wrote it into a folder no one else
//! may write to; otherwise the cache is not used.
//!
//! The checks and the read go through one open folder and one open file
//! (`openat`, no symbolic links followed), so nothing can be swapped in
//! between the look and the load.

use std::ffi::CString;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
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
    let name = format!("{hash}-{:016x}.cwasm", hasher.finish());
    let cached = dir.join(&name);
    match read_trusted(dir, &name) {
        Err(why) => {
            tracing::warn!(
                "not using the compile cache {}: {why}; compiling instead",
                dir.display()
            );
            let compiled = engine.precompile_component(bytes).map_err(&describe)?;
            // SAFETY: `compiled` was produced just now by this engine.
            return unsafe { Component::deserialize(engine, &compiled) }.map_err(&describe);
        }
        Ok(Cached::Trusted(compiled)) => {
            // SAFETY: read from a file this user owns, that no one else may
            // write to, through a folder likewise (checked on the open
            // descriptors it was read from); named by the content hash and
            // the engine's, and written by `precompile_component`.
            match unsafe { Component::deserialize(engine, &compiled) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("ignoring unusable cache file {}: {e}", cached.display()),
            }
        }
        Ok(Cached::Untrusted(why)) => {
            tracing::warn!("replacing the cache file {}: {why}", cached.display());
            let _ = std::fs::remove_file(&cached);
        }
        Ok(Cached::Missing) => {}
    }
    let compiled = engine.precompile_component(bytes).map_err(&describe)?;
    match write_atomically(dir, &cached, &compiled) {
        Ok(()) => prune(dir, &name, std::time::SystemTime::now()),
        Err(e) => tracing::warn!(
            "could not write the compile cache {}: {e}",
            cached.display()
        ),
    }
    // SAFETY: `compiled` was produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }.map_err(&describe)
}

/// What the cache folder holds under a name.
#[derive(Debug, PartialEq)]
enum Cached {
    Missing,
    /// The compiled bytes of a file this user wrote.
    Trusted(Vec<u8>),
    /// A file that could have been written by someone else: replaced.
    Untrusted(String),
}

/// Reads `name` from the cache folder `dir` if the folder and the file can
/// be trusted. `Err(why)` when the folder cannot (another user's, a link):
/// then the cache is not used at all. A folder of ours that others may
/// write to (a umask of 002) is made ours alone and emptied of compiled
/// files first: any of them could have been renamed by another user.
fn read_trusted(dir: &Path, name: &str) -> Result<Cached, String> {
    let folder = match open(dir, None, libc::O_DIRECTORY) {
        Ok(folder) => folder,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cached::Missing),
        Err(e) => return Err(format!("{}: {}", dir.display(), why_not_opened(&e))),
    };
    let meta = folder.metadata().map_err(|e| e.to_string())?;
    owned_by_this_user(&meta, "the folder", dir)?;
    if writable_by_others(&meta) {
        use std::os::unix::fs::PermissionsExt;
        let ours = std::fs::Permissions::from_mode(meta_mode(&meta) & 0o7755);
        folder
            .set_permissions(ours)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "cwasm") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        return Ok(Cached::Missing);
    }
    let mut file = match open(Path::new(name), Some(&folder), 0) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cached::Missing),
        Err(e) => return Ok(Cached::Untrusted(why_not_opened(&e))),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    use std::os::unix::fs::MetadataExt;
    if !meta.is_file() || meta.nlink() != 1 {
        return Ok(Cached::Untrusted("not a plain file of its own".into()));
    }
    if let Err(why) = owned_by_this_user(&meta, "the file", &dir.join(name)) {
        return Ok(Cached::Untrusted(why));
    }
    if writable_by_others(&meta) {
        return Ok(Cached::Untrusted(format!(
            "other users may write to it (mode {:o})",
            meta_mode(&meta) & 0o7777
        )));
    }
    let mut compiled = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut compiled).map_err(|e| e.to_string())?;
    // Marked as used, so that pruning keeps it (see `prune`).
    let _ = file.set_modified(std::time::SystemTime::now());
    Ok(Cached::Trusted(compiled))
}

/// A compiled file not used for this long is removed when another is
/// written (components change with every build; the folder only grew).
const UNUSED_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// Most bytes of compiled files kept; the least recently used go first.
const MAX_CACHE_BYTES: u64 = 1 << 30;

/// Removes from the cache folder the compiled files (and temporary files
/// of writes that never finished) not used for [`UNUSED_FOR`], then the
/// least recently used until the rest fit in [`MAX_CACHE_BYTES`]; never
/// `keep`, just written. Another process's file removed here is compiled
/// again when it next loads.
fn prune(dir: &Path, keep: &str, now: std::time::SystemTime) {
    prune_to(dir, keep, now, MAX_CACHE_BYTES)
}

fn prune_to(dir: &Path, keep: &str, now: std::time::SystemTime, max_bytes: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept = Vec::new();
    let (mut removed, mut freed) = (0u32, 0u64);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let compiled = name.ends_with(".cwasm");
        if name == keep || !(compiled || name.starts_with(".tmp")) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let used = meta.modified().unwrap_or(now);
        let idle = now.duration_since(used).unwrap_or_default();
        if idle > UNUSED_FOR || (!compiled && idle > std::time::Duration::from_secs(24 * 3600)) {
            if std::fs::remove_file(entry.path()).is_ok() {
                (removed, freed) = (removed + 1, freed + meta.len());
            }
        } else if compiled {
            kept.push((used, meta.len(), entry.path()));
        }
    }
    let keep_len = std::fs::metadata(dir.join(keep)).map_or(0, |m| m.len());
    let mut total: u64 = keep_len + kept.iter().map(|(_, len, _)| len).sum::<u64>();
    kept.sort_by_key(|(used, _, _)| *used);
    for (_, len, path) in kept {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            (removed, freed) = (removed + 1, freed + len);
        }
    }
    if removed > 0 {
        tracing::info!(
            "compile cache {}: removed {removed} file(s), {} MiB, unused for 30 days or the least \
             recently used beyond {} MiB",
            dir.display(),
            freed >> 20,
            max_bytes >> 20
        );
    }
}

/// Opens `path` read-only without following a symbolic link at its last
/// step, relative to `folder` when given (`openat`).
fn open(path: &Path, folder: Option<&File>, flags: libc::c_int) -> std::io::Result<File> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let flags = flags | libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let at = folder.map_or(libc::AT_FDCWD, |f| f.as_raw_fd());
    // SAFETY: a valid C string and descriptor; the result is checked.
    let fd = unsafe { libc::openat(at, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn why_not_opened(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => "it is a symbolic link".into(),
        _ => e.to_string(),
    }
}

fn owned_by_this_user(meta: &std::fs::Metadata, what: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match meta.uid() == me {
        true => Ok(()),
        false => Err(format!(
            "{what} {} belongs to uid {}, not to this user ({me})",
            path.display(),
            meta.uid()
        )),
    }
}

fn meta_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    meta.mode()
}

fn writable_by_others(meta: &std::fs::Metadata) -> bool {
    meta_mode(meta) & 0o022 != 0
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
    fn only_a_plain_file_of_ours_in_a_folder_of_ours_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(
            read_trusted(&cache, "x.cwasm"),
            Ok(Cached::Missing),
            "no folder yet"
        );
        write_atomically(&cache, &cache.join("x.cwasm"), b"compiled").unwrap();
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(
            read_trusted(&cache, "x.cwasm"),
            Ok(Cached::Trusted(b"compiled".to_vec()))
        );
        assert_eq!(read_trusted(&cache, "y.cwasm"), Ok(Cached::Missing));

        std::fs::set_permissions(
            cache.join("x.cwasm"),
            std::fs::Permissions::from_mode(0o620),
        )
        .unwrap();
        assert_eq!(
            read_trusted(&cache, "x.cwasm"),
            Ok(Cached::Untrusted(
                "other users may write to it (mode 620)".into()
            ))
        );
        std::os::unix::fs::symlink(cache.join("x.cwasm"), cache.join("link.cwasm")).unwrap();
        assert_eq!(
            read_trusted(&cache, "link.cwasm"),
            Ok(Cached::Untrusted("it is a symbolic link".into()))
        );
        std::fs::hard_link(cache.join("x.cwasm"), cache.join("hard.cwasm")).unwrap();
        assert_eq!(
            read_trusted(&cache, "hard.cwasm"),
            Ok(Cached::Untrusted("not a plain file of its own".into()))
        );

        // A folder that is a link is not used at all.
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&cache, &linked).unwrap();
        let why = read_trusted(&linked, "x.cwasm").unwrap_err();
        assert!(why.contains("is a symbolic link"), "{why}");

        // A folder others may write to is made ours and emptied: any file
        // in it could have been renamed by someone else.
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(read_trusted(&cache, "x.cwasm"), Ok(Cached::Missing));
        assert_eq!(mode(&cache), 0o755);
        assert!(!cache.join("x.cwasm").exists() && !cache.join("hard.cwasm").exists());
    }

    #[test]
    fn files_unused_for_a_month_are_pruned_and_a_read_counts_as_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let day = std::time::Duration::from_secs(24 * 3600);
        let now = std::time::SystemTime::now();
        let aged = |name: &str, age: std::time::Duration| {
            write_atomically(&cache, &cache.join(name), b"compiled").unwrap();
            File::options()
                .write(true)
                .open(cache.join(name))
                .unwrap()
                .set_modified(now - age)
                .unwrap();
        };
        aged("old.cwasm", 40 * day);
        aged("read.cwasm", 40 * day);
        aged("recent.cwasm", 2 * day);
        aged(".tmpAbC123", 2 * day);
        aged("notes.txt", 400 * day);
        aged("new.cwasm", 40 * day);
        assert!(matches!(
            read_trusted(&cache, "read.cwasm"),
            Ok(Cached::Trusted(_))
        ));
        prune(&cache, "new.cwasm", now);
        let mut left: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["new.cwasm", "notes.txt", "read.cwasm", "recent.cwasm"]
        );

        // Over the size cap, the least recently used go first ("compiled"
        // is 8 bytes: room for one file besides the new one).
        aged("older.cwasm", 3 * day);
        prune_to(&cache, "new.cwasm", now, 16);
        assert!(!cache.join("older.cwasm").exists() && !cache.join("recent.cwasm").exists());
        assert!(cache.join("read.cwasm").exists() && cache.join("new.cwasm").exists());
    }
}
