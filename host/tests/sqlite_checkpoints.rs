//! WAL checkpoints on a thread of their own (the daemon's SQLite
//! connections, `Queue::checkpoint_in_background`): what the writer no
//! longer copies still reaches the database file, the WAL stays bounded
//! under writes that never pause, and the thread ends with the last
//! connection that used it.
//!
//! One test in its own binary: it counts this process's checkpoint threads
//! (by name, in `/proc`).
#![cfg(target_os = "linux")]

use std::path::Path;
use std::time::{Duration, Instant};

use colony::queue::{Queue, QueueOptions};
use colony::task::NewTask;

const PAGE: u64 = 4096;
/// `checkpoint::REWIND_PAGES`: from there a commit checkpoints itself.
const REWIND_PAGES: u64 = 4096;

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn checkpoint_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "colony-wal-ckpt")
        })
        .count()
}

/// Waits (up to a minute: debug builds on a loaded machine) for `done`.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// About 100 pages per transaction: 50 tasks of 8 KB payloads.
fn write_pages(q: &mut Queue, transactions: usize) {
    let payload = serde_json::json!({ "filler": "x".repeat(8000) }).to_string();
    let batch: Vec<NewTask> = (0..50).map(|_| NewTask::new("noop", &payload)).collect();
    for _ in 0..transactions {
        q.submit_batch(&batch).unwrap();
    }
}

#[test]
fn the_checkpoint_thread_copies_the_wal_bounds_it_and_stops_with_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let wal = dir.path().join("queue.db-wal");
    let opts = QueueOptions {
        background_checkpoints: true,
        ..QueueOptions::default()
    };
    let mut q = Queue::open_with(&db, opts.clone()).unwrap();
    let mut second = q.reopener()().unwrap();
    // A new thread takes its name from inside, a moment after it starts.
    eventually("the checkpoint thread is named", || {
        checkpoint_threads() >= 1
    });
    assert_eq!(
        checkpoint_threads(),
        1,
        "one thread per database, however many connections"
    );
    let db_before = file_len(&db);

    // ~2,000 pages: past the 1,000 at which a commit asks for a checkpoint,
    // short of a rewind. Nothing else checkpoints this WAL (the hook turned
    // SQLite's own checkpoints off), so the database file only grows if
    // the thread copied the pages.
    write_pages(&mut q, 20);
    eventually(
        "the checkpoint thread copied the WAL into the database",
        || file_len(&db) > db_before + 1000 * PAGE,
    );

    // Writes that never pause: a passive checkpoint cannot rewind the WAL
    // under them, so without those checkpoints it would grow to ~30,000
    // pages (120 MB).
    for _ in 0..15 {
        write_pages(&mut q, 10);
        write_pages(&mut second, 10);
    }
    let wal_pages = file_len(&wal) / PAGE;
    assert!(
        wal_pages < 3 * REWIND_PAGES,
        "the WAL grew to {wal_pages} pages under sustained writes"
    );

    drop(q);
    assert_eq!(
        checkpoint_threads(),
        1,
        "a connection still uses the thread"
    );
    drop(second);
    eventually(
        "the checkpoint thread ended with the last connection",
        || checkpoint_threads() == 0,
    );
    // The data is all there, read through a connection of SQLite's own checkpoints.
    let q = Queue::open(&db).unwrap();
    assert_eq!(q.list(&Default::default()).unwrap().len(), 50 * (20 + 300));
    drop(q);

    // A database deleted and created again at the same path under a live
    // connection is another file, whose WAL the old thread would never
    // checkpoint: it gets a thread of its own.
    let again = dir.path().join("again.db");
    let old = Queue::open_with(&again, opts.clone()).unwrap();
    eventually("the first file's thread is named", || {
        checkpoint_threads() == 1
    });
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", again.display())).unwrap();
    }
    let new = Queue::open_with(&again, opts).unwrap();
    eventually("the new file has a thread of its own", || {
        checkpoint_threads() == 2
    });
    drop((old, new));
    eventually("both threads ended", || checkpoint_threads() == 0);
}
