//! Text the CLI reads from files and stdin (payloads, `--next` chains,
//! state values, `--batch` files), bounded: `yes | colony submit echo -`
//! or a payload `@/dev/zero` is refused once it passes its limit, where it
//! was read whole first (gigabytes, for a refusal at 1 MiB).

use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::Result;

use super::bad;

/// The most a `--next` chain or a `--batch` line is read to: each of its
/// payloads is bounded (1 MiB), their number is not.
pub(super) const CHAIN_LIMIT: usize = 16 << 20;

/// Room past a limit, so that text a little over it reaches the check that
/// says by how much (a payload's own, with its exact size), and a file's
/// byte-order mark or last line break does not count.
const SLACK: u64 = 64;

/// Where text comes from: a file, or stdin as `-`.
pub(super) fn open(file: &Path) -> std::io::Result<Box<dyn BufRead>> {
    Ok(match file == Path::new("-") {
        true => Box::new(std::io::stdin().lock()),
        false => Box::new(std::io::BufReader::new(std::fs::File::open(file)?)),
    })
}

/// All of `file` (`-`: stdin) as text, `what` naming it in errors (with
/// the limit's reason, `limit_of`), refused past `limit` bytes.
pub(super) fn read_text(file: &Path, what: &str, limit: usize, limit_of: &str) -> Result<String> {
    let reader = open(file).map_err(|e| bad(format!("{what}: {e}")))?;
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + SLACK + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("{what}: {e}")))?;
    if bytes.len() as u64 > limit as u64 + SLACK {
        return Err(too_long(what, limit, limit_of));
    }
    String::from_utf8(bytes).map_err(|e| bad(format!("{what}: not UTF-8 text ({e})")))
}

/// The next line of `reader` (without its line break), `None` at the end,
/// refused past `limit` bytes: a line without end is not read whole.
pub(super) fn read_line(
    reader: &mut dyn BufRead,
    what: &str,
    limit: usize,
    limit_of: &str,
) -> Result<Option<String>> {
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + SLACK + 1)
        .read_until(b'\n', &mut bytes)
        .map_err(|e| bad(format!("{what}: {e}")))?;
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() as u64 > limit as u64 + SLACK {
        return Err(too_long(what, limit, limit_of));
    }
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| bad(format!("{what}: not UTF-8 text ({e})")))
}

fn too_long(what: &str, limit: usize, limit_of: &str) -> anyhow::Error {
    bad(format!(
        "{what}: longer than {limit_of} limit of {limit} bytes; nothing was read further or stored"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_past_its_limit_is_refused_without_reading_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.json");
        std::fs::write(&file, vec![b' '; 10_000]).unwrap();
        let err = read_text(&file, "payload @big.json", 1000, "a payload's").unwrap_err();
        assert!(
            err.to_string()
                .contains("longer than a payload's limit of 1000 bytes"),
            "{err}"
        );
        // Within the slack: read, for the check that says the exact size.
        assert_eq!(
            read_text(&file, "x", 10_000 - 10, "x").unwrap().len(),
            10_000
        );
        // /dev/zero has no end: refused all the same.
        let err = read_text(Path::new("/dev/zero"), "payload @/dev/zero", 1000, "x").unwrap_err();
        assert!(err.to_string().contains("limit of 1000 bytes"), "{err}");
    }

    #[test]
    fn lines_are_read_one_at_a_time_and_bounded() {
        let mut reader: &[u8] = b"one\r\ntwo\n\nthree";
        let mut lines = Vec::new();
        while let Some(line) = read_line(&mut reader, "x", 100, "x").unwrap() {
            lines.push(line);
        }
        assert_eq!(lines, ["one", "two", "", "three"]);
        let long = vec![b'a'; 1000];
        let err = read_line(&mut long.as_slice(), "--batch f line 1", 100, "x").unwrap_err();
        assert!(
            err.to_string().starts_with("--batch f line 1: longer than"),
            "{err}"
        );
    }
}
