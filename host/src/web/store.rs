//! The dashboard's way into the queue: a few open connections, lent to one
//! request at a time off the async runtime (every queue call blocks).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::queue::{Queue, QueueError, QueueOptions};

/// Connections kept open between requests; more are opened under load and
/// closed again when returned past this many.
const IDLE_CONNECTIONS: usize = 4;
/// Most connections in use at once: however many browsers and scrapers
/// call, the dashboard never takes more of the database than this (on
/// PostgreSQL, connections the daemons need).
const MAX_CONNECTIONS: usize = 8;

pub struct Store {
    location: PathBuf,
    /// The SQLite file the first connection opened: later ones must open
    /// that one, not whatever was put at the path since.
    file: std::sync::OnceLock<Option<crate::queue::FileId>>,
    /// Who the dashboard acts as when no operator is named.
    actor: String,
    /// SQLite's durability (`--sync`), for every connection.
    sync: crate::queue::Sync,
    idle: Mutex<Vec<Queue>>,
    in_use: tokio::sync::Semaphore,
}

impl Store {
    /// Opens one connection now, so that a database that cannot be opened
    /// (or migrated) is reported at start, not at the first page.
    pub fn open(
        location: PathBuf,
        actor: String,
        sync: crate::queue::Sync,
    ) -> Result<Arc<Store>, QueueError> {
        let store = Store {
            location,
            sync,
            file: std::sync::OnceLock::new(),
            actor,
            idle: Mutex::new(Vec::new()),
            in_use: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
        };
        let first = store.connect(false)?;
        let _ = store.file.set(first.database_file());
        store.idle.lock().unwrap().push(first);
        Ok(Arc::new(store))
    }

    /// A connection; only the first may create the database (a later one
    /// would otherwise make a fresh empty file where the first was deleted,
    /// and requests would alternate between the two).
    fn connect(&self, must_exist: bool) -> Result<Queue, QueueError> {
        Queue::open_with(
            &self.location,
            QueueOptions {
                actor: self.actor.clone(),
                sync: self.sync,
                must_exist,
                same_file: self.file.get().copied().flatten(),
                ..QueueOptions::default()
            },
        )
    }

    /// Runs `f` on a connection, off the async runtime, acting as `actor`
    /// (the dashboard's own identity when `None`).
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        actor: Option<String>,
        f: impl FnOnce(&mut Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let _permit = self
            .in_use
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let taken = store.idle.lock().unwrap().pop();
            let mut queue = match taken {
                Some(queue) => queue,
                None => store.connect(true)?,
            };
            // A deleted file still takes writes on an open connection: an
            // acknowledged submit would be lost.
            queue.check_database_file()?;
            queue.set_actor(actor.as_deref().unwrap_or(&store.actor));
            let result = f(&mut queue);
            // A connection that failed may be broken: open a fresh one next time.
            if result.as_ref().is_err_and(|e| !e.is_bad_input()) {
                return result;
            }
            let mut idle = store.idle.lock().unwrap();
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(queue);
            }
            result
        })
        .await
        .unwrap_or_else(|joined| std::panic::resume_unwind(joined.into_panic()))
    }
}

#[cfg(test)]
mod tests {
    use super::Store;
    use crate::queue::Sync;

    /// `serve --sync full` reaches every connection of the dashboard's pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pools_connections_keep_the_sync_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        for (sync, level) in [(Sync::Full, 2), (Sync::Normal, 1)] {
            let store = Store::open(dir.path().join("q.db"), "test".into(), sync).unwrap();
            // More at once than the one connection opened first.
            let reads = (0..4).map(|_| store.run(None, |q| Ok(q.sqlite_synchronous())));
            for found in futures_util::future::join_all(reads).await {
                assert_eq!(found.unwrap(), Some(level), "{sync:?}");
            }
        }
    }
}
