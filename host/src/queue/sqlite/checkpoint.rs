//! WAL checkpoints on a thread of their own, for the daemon's connections.
//!
//! By default SQLite checkpoints inside the commit that pushes the WAL past
//! 1,000 pages: the committing thread copies those pages into the database
//! file and syncs it while it still holds the write lock. For the daemon
//! that thread is the writer every run waits on, and the drain paid about a
//! fifth of its time there. Here the daemon's connections only signal, and
//! a thread with a connection of its own checkpoints `PASSIVE`ly (never
//! blocking the writer) as the WAL grows.
//!
//! A passive checkpoint cannot rewind the WAL while the writer keeps
//! appending to it, so under sustained load the file would grow without
//! end. From [`REWIND_PAGES`] the committing connection also checkpoints
//! itself, as SQLite would have (only the pages the thread has not copied
//! yet are left to it), at most once per [`CHECKPOINT_PAGES`] of growth
//! (a try that finds the thread checkpointing is repeated at the next
//! commit): the WAL starts over at the first write that finds it all copied and no
//! reader in it, which readers that come and go may put off for a while.
//!
//! One thread per database per process, shared by every connection that
//! asks, and stopped when the last of them closes. Other processes (the CLI)
//! keep SQLite's own checkpoints, and so does a connection whose thread is
//! gone.

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;

/// WAL size (pages) from which a commit asks for a checkpoint: SQLite's own
/// `wal_autocheckpoint` default.
const CHECKPOINT_PAGES: i32 = 1000;
/// WAL size (pages, about 16 MiB) from which a commit checkpoints itself,
/// so that the WAL starts over.
const REWIND_PAGES: i32 = 4096;
/// Least time between two checkpoints: under load every commit asks, and
/// each checkpoint syncs the database file.
const MIN_GAP: Duration = Duration::from_millis(10);

/// A database's checkpoint thread, alive while a connection holds it.
pub struct Checkpointer {
    wake: SyncSender<()>,
}

impl Checkpointer {
    /// The checkpoint thread of the database at `path`, started if this
    /// process has none running for it.
    pub fn for_database(path: &Path) -> std::io::Result<Arc<Checkpointer>> {
        static RUNNING: Mutex<Vec<(FileId, Weak<Checkpointer>)>> = Mutex::new(Vec::new());
        let path = std::fs::canonicalize(path)?;
        let file = FileId::of(&path)?;
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(_, c)| c.strong_count() > 0);
        if let Some(c) = running
            .iter()
            .find(|(f, _)| *f == file)
            .and_then(|(_, c)| c.upgrade())
        {
            return Ok(c);
        }
        // Opened here, so that a thread without a connection is an error
        // of the caller's rather than a thread that quietly ends.
        let conn = Connection::open(&path).map_err(std::io::Error::other)?;
        let (wake, woken) = sync_channel(1);
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("colony-wal-ckpt".into())
            .spawn(move || checkpoint_until_closed(&thread_path, conn, woken))?;
        let checkpointer = Arc::new(Checkpointer { wake });
        running.push((file, Arc::downgrade(&checkpointer)));
        Ok(checkpointer)
    }

    /// Makes `conn`'s commits wake the thread instead of checkpointing
    /// themselves, until the WAL is due to start over (the hook replaces
    /// SQLite's automatic checkpoints).
    pub fn attach(self: &Arc<Self>, conn: &mut Connection) -> rusqlite::Result<()> {
        let wake = self.wake.clone();
        // The WAL's size at this connection's last own checkpoint.
        let mut checkpointed_at = 0;
        let mut thread_gone = false;
        conn.wal_hook(Some(move |wal: &mut Wal, pages: i32| {
            if pages < checkpointed_at {
                checkpointed_at = 0; // the WAL started over
            }
            let own = pages >= REWIND_PAGES && pages >= checkpointed_at + CHECKPOINT_PAGES;
            if own || (thread_gone && pages >= CHECKPOINT_PAGES) {
                // Busy (at once: passive) while another connection, most
                // often the thread, is checkpointing: the next commit tries
                // again. Counting a busy try as done let the WAL grow by
                // another CHECKPOINT_PAGES each time the two collided.
                // Another error is not retried before that growth: this is
                // the writer's thread.
                let busy = matches!(
                    wal.checkpoint_v2(CheckpointMode::PASSIVE),
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::DatabaseBusy
                );
                if !busy {
                    checkpointed_at = pages;
                }
            } else if pages >= CHECKPOINT_PAGES {
                // Full: a checkpoint is already due, this commit joins it.
                if let Err(TrySendError::Disconnected(_)) = wake.try_send(()) {
                    tracing::warn!("the WAL checkpoint thread stopped; commits checkpoint");
                    thread_gone = true;
                }
            }
            // Never an error: the commit has happened, and an error here
            // would report it as failed.
            Ok(())
        }))
    }
}

/// Which file a database is: the same through any path to it, and another
/// once it was deleted and created again (whose WAL the old thread would
/// never checkpoint).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    device: u64,
    inode: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileId {
            device: meta.dev(),
            inode: meta.ino(),
        })
    }

    /// Elsewhere, the canonical path stands for the file.
    #[cfg(not(unix))]
    fn of(path: &Path) -> std::io::Result<FileId> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut hasher);
        Ok(FileId {
            device: 0,
            inode: hasher.finish(),
        })
    }
}

/// The thread: a checkpoint per wake-up, until every connection that could
/// wake it is closed (then SQLite's own checkpoint on close takes over).
/// A failing checkpoint is reported once, not at every wake-up.
fn checkpoint_until_closed(path: &Path, conn: Connection, woken: Receiver<()>) {
    let mut failing = false;
    while woken.recv().is_ok() {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) if failing => {
                tracing::info!("checkpointing {} works again", path.display());
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!("checkpointing {} failed, will retry: {e}", path.display());
                failing = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(MIN_GAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with the hook attached to a checkpointer whose wake-ups
    /// the test receives instead of a thread.
    fn attached(path: &Path) -> (Connection, Arc<Checkpointer>, Receiver<()>) {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute("CREATE TABLE filler (data BLOB)", []).unwrap();
        let (wake, woken) = sync_channel(1);
        let checkpointer = Arc::new(Checkpointer { wake });
        checkpointer.attach(&mut conn).unwrap();
        (conn, checkpointer, woken)
    }

    /// One transaction of about 100 pages.
    fn write_100_pages(conn: &Connection) {
        let tx = conn.unchecked_transaction().unwrap();
        for _ in 0..100 {
            tx.execute("INSERT INTO filler VALUES (zeroblob(4000))", [])
                .unwrap();
        }
        tx.commit().unwrap();
    }

    /// Frames in the WAL, counted from its file's length (header 32 bytes,
    /// each frame a 24-byte header and a page).
    fn wal_frames(path: &Path) -> i32 {
        let len = std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
        (len.saturating_sub(32) / (24 + 4096)) as i32
    }

    fn wal_pages(path: &Path) -> i64 {
        let other = Connection::open(path).unwrap();
        other
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap()
    }

    #[test]
    fn commits_wake_the_thread_instead_of_checkpointing_until_the_wal_must_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.db");
        let (conn, _checkpointer, woken) = attached(&path);
        let db_len = || std::fs::metadata(&path).unwrap().len();
        let empty = db_len();

        for _ in 0..9 {
            write_100_pages(&conn);
        }
        assert!(woken.try_recv().is_err(), "woken before 1,000 pages");
        write_100_pages(&conn);
        assert!(woken.try_recv().is_ok(), "not woken at 1,000 pages");
        assert_eq!(db_len(), empty, "a commit checkpointed by itself");

        while db_len() == empty {
            write_100_pages(&conn);
            let _ = woken.try_recv();
            let pages = std::fs::metadata(path.with_extension("db-wal"))
                .unwrap()
                .len()
                / 4096;
            assert!(
                pages < REWIND_PAGES as u64 + 200,
                "no commit checkpointed by itself"
            );
        }
        // That checkpoint copied every page, so the next write starts over.
        write_100_pages(&conn);
        assert!(wal_pages(&path) < 200, "the WAL did not start over");

        // A reader in the WAL keeps it from starting over: from REWIND_PAGES
        // a commit checkpoints itself once per CHECKPOINT_PAGES of growth
        // and wakes the thread in between, not checkpoint at every commit.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        // The WAL holds ~100 pages now and grows ~100 per commit: count from
        // the 45th commit, well past REWIND_PAGES, to the 65th.
        let (mut own, mut woke) = (0, 0);
        for commit in 0..65 {
            write_100_pages(&conn);
            match (commit >= 45, woken.try_recv().is_ok()) {
                (true, true) => woke += 1,
                (true, false) => own += 1,
                (false, _) => {}
            }
        }
        assert!(
            (1..=3).contains(&own),
            "{own} own checkpoints, {woke} wake-ups"
        );
        assert!(woke >= 15, "{own} own checkpoints, {woke} wake-ups");
        reader.execute_batch("COMMIT").unwrap();

        // Without the thread, commits checkpoint themselves as SQLite would.
        drop(woken);
        for _ in 0..3 {
            write_100_pages(&conn);
        }
        assert!(
            wal_pages(&path) < 200,
            "no commit checkpointed for the gone thread"
        );
    }

    /// An own checkpoint that finds another connection checkpointing (the
    /// thread, most often) is tried again at the next commit: counted as
    /// done, it let the WAL grow another CHECKPOINT_PAGES at every collision
    /// (seen as a WAL three times REWIND_PAGES on a loaded machine).
    #[test]
    fn an_own_checkpoint_found_busy_is_tried_again_at_the_next_commit() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static WAITING: AtomicBool = AtomicBool::new(false);
        static RELEASED: AtomicBool = AtomicBool::new(false);
        // The other checkpoint's busy handler: it holds the checkpoint lock
        // for as long as this returns true.
        fn hold_until_released(_: i32) -> bool {
            WAITING.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            !RELEASED.load(Ordering::SeqCst)
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.db");
        let (conn, _checkpointer, woken) = attached(&path);
        // A reader keeps the WAL from starting over, so that it keeps
        // growing past REWIND_PAGES.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
            .unwrap();
        while wal_frames(&path) + 110 < REWIND_PAGES {
            write_100_pages(&conn);
        }
        while woken.try_recv().is_ok() {}

        // ~300 pages that take the WAL past REWIND_PAGES, committed while
        // another connection's FULL checkpoint holds the checkpoint lock
        // (it waits in its busy handler for this transaction's write lock).
        let tx = conn.unchecked_transaction().unwrap();
        for _ in 0..300 {
            tx.execute("INSERT INTO filler VALUES (zeroblob(4000))", [])
                .unwrap();
        }
        let other_path = path.clone();
        let other = std::thread::spawn(move || {
            let mut other = Connection::open(&other_path).unwrap();
            other.busy_handler(Some(hold_until_released)).unwrap();
            let _ = other.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()));
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !WAITING.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "no checkpoint waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        tx.commit().unwrap();
        let busy_at = wal_frames(&path);
        assert!(busy_at >= REWIND_PAGES, "only {busy_at} frames");
        assert!(
            woken.try_recv().is_err(),
            "woke the thread at {busy_at} frames"
        );
        RELEASED.store(true, Ordering::SeqCst);
        other.join().unwrap();

        // Well short of CHECKPOINT_PAGES later, the next commit checkpoints
        // itself rather than waking the thread.
        write_100_pages(&conn);
        assert!(
            woken.try_recv().is_err(),
            "the commit after the busy checkpoint at {busy_at} frames only woke the thread"
        );
        reader.execute_batch("COMMIT").unwrap();
    }
}
