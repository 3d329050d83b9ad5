//! The daemon's side of runs in flight: what a run asks of the queue while
//! it executes (state reads, the model journal, audit events) and what the
//! daemon collects from it (progress texts, time spent running).
//!
//! None of it goes through the daemon loop: a run waiting on the loop would
//! wait for every transaction the loop is running. Reads go to a pool of
//! connections of their own, journal writes to one connection of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::models::{Budget, ModelCall, ModelContext};
use crate::queue::{Applied, Lease, Queue, QueueError};
use crate::runtime::RunHooks;
use crate::state::{Entry, Scope};

/// Most connections open for the runs' state reads. On SQLite reads run on
/// the runtime's worker threads, which are fewer; on PostgreSQL each is a
/// server connection, and a server allows about a hundred by default.
const MAX_READERS: usize = 4;

/// Opens another connection to the daemon's database.
pub(super) type Reopen = Arc<dyn Fn() -> Result<Queue, QueueError> + Send + Sync>;

pub(super) struct RunSide {
    /// The latest progress text of each run, by its lease, written at the
    /// next heartbeat if the run still holds it.
    pub progress: Mutex<HashMap<Lease, Option<String>>>,
    /// Nanoseconds spent in runs (instantiate + call + tear down), summed.
    pub run_nanos: AtomicU64,
    /// A connection of the journal's own, opened at the first model call:
    /// model calls are slow and rare, and neither they nor the daemon loop
    /// should wait for the other.
    journal: Arc<Mutex<Option<Queue>>>,
    /// Connections for the runs' state reads, each taken by one read at a
    /// time: opened as reads overlap, at most [`MAX_READERS`].
    readers: Arc<Mutex<Vec<Queue>>>,
    /// A read holds one while it holds a connection.
    reader_permits: Arc<tokio::sync::Semaphore>,
    /// Whether a read runs on the run's own thread (SQLite) or is sent to a
    /// blocking thread (PostgreSQL): see [`RunSide::with_reader`].
    reads_inline: bool,
    /// Opens those connections.
    pub reopen: Reopen,
    /// When the daemon last renewed its leases.
    pub renewals: Renewals,
    /// The runs the daemon stopped, and when: their requests waiting on a
    /// renewal never go out (see [`RunHooks::wait_while_lease_in_doubt`]).
    stopped: Mutex<HashMap<Lease, Instant>>,
    /// The token reservations on their way to the journal, by run and call,
    /// each true once its run asked for it back: a run dropped while its
    /// reservation waits for the journal's lock must not have its release
    /// go first, delete nothing, and leave the reservation, written after,
    /// counted for good. See [`RunSide::reserve_tokens`].
    reserving: Arc<Mutex<HashMap<(Lease, u32), bool>>>,
    /// The journal writes of runs cut off: reservation releases and calls
    /// cut off on the wire (see [`RunHooks::release_reservation_later`]),
    /// awaited at shutdown.
    releases: Mutex<tokio::task::JoinSet<()>>,
}

/// When the daemon last renewed its leases, read by its runs as well as
/// by its loop: the loop can be held up in the very heartbeat that does not
/// come back (a database that stopped answering without an error), and a
/// run must not go on sending requests and model calls while another
/// daemon may already have taken its task over.
pub(super) struct Renewals {
    base: Instant,
    /// Milliseconds from `base` to the last renewal (or the daemon's start).
    renewed_ms: AtomicU64,
    /// How long one renewal vouches for the leases: `stale_after` less a
    /// heartbeat, since the next renewal may come a heartbeat later.
    vouches_for: Duration,
}

impl Renewals {
    pub fn new(stale_after: Duration, heartbeat: Duration) -> Renewals {
        let now = Instant::now();
        // Set back, so that a renewal dated before the daemon started (by a
        // test) is still kept as it is.
        let base = now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now);
        let renewals = Renewals {
            base,
            renewed_ms: AtomicU64::new(0),
            vouches_for: stale_after.saturating_sub(heartbeat),
        };
        renewals.renewed(now);
        renewals
    }

    /// The leases were renewed as of `at`.
    pub fn renewed(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.base).as_millis() as u64;
        self.renewed_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the leases were last renewed.
    pub fn unrenewed_for(&self) -> Duration {
        let at = self.base + Duration::from_millis(self.renewed_ms.load(Ordering::Relaxed));
        at.elapsed()
    }

    /// Whether the leases have gone unrenewed so long that the next
    /// heartbeat would come after `stale_after`, the time the claims
    /// promised to renew them within: another daemon may soon reset them.
    pub fn may_soon_be_reset(&self) -> bool {
        self.unrenewed_for() >= self.vouches_for
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the journal connection in `journal`, opening it first if
/// need be.
fn on_journal<T>(
    journal: &Mutex<Option<Queue>>,
    open: &Reopen,
    f: impl FnOnce(&mut Queue) -> Result<T, QueueError>,
) -> Result<T, QueueError> {
    let mut slot = journal.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(open()?);
    }
    f(slot.as_mut().expect("opened above"))
}

impl RunSide {
    pub fn new(reopen: Reopen, reads_inline: bool, renewals: Renewals) -> RunSide {
        RunSide {
            renewals,
            stopped: Mutex::default(),
            progress: Mutex::default(),
            run_nanos: AtomicU64::new(0),
            journal: Arc::default(),
            readers: Arc::default(),
            reader_permits: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            reads_inline,
            reopen,
            reserving: Arc::default(),
            releases: Mutex::default(),
        }
    }

    /// The daemon stopped the run under `lease` (its abort may land later).
    pub fn stopped(&self, lease: Lease) {
        lock(&self.stopped).insert(lease, Instant::now());
    }

    /// Forgets runs stopped longer ago than `after`: long gone.
    pub fn forget_stopped(&self, after: Duration) {
        lock(&self.stopped).retain(|_, at| at.elapsed() < after);
    }

    fn was_stopped(&self, lease: Lease) -> bool {
        lock(&self.stopped).contains_key(&lease)
    }

    /// Runs `f` on the journal connection, on a blocking thread.
    async fn with_journal<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, String> {
        let (journal, open) = (self.journal.clone(), self.reopen.clone());
        tokio::task::spawn_blocking(move || on_journal(&journal, &open, f))
            .await
            .map_err(|e| format!("the journal writer stopped: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// Writes `f` on the journal connection once the run that asks is
    /// dropped (from its `Drop`, which cannot wait), saying `f`'s error.
    /// Without a runtime the process is going down: nothing is written, and
    /// the call's reservation stays counted, as for a daemon killed.
    fn on_journal_later(
        &self,
        lease: Lease,
        failed: &'static str,
        f: impl FnOnce(&mut Queue) -> Result<(), QueueError> + Send + 'static,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (journal, open) = (self.journal.clone(), self.reopen.clone());
        let mut pending = self.releases.lock().unwrap_or_else(|e| e.into_inner());
        while pending.try_join_next().is_some() {}
        pending.spawn_blocking_on(
            move || {
                if let Err(e) = on_journal(&journal, &open, f) {
                    tracing::warn!(task = lease.task_id, "{failed}: {e}");
                }
            },
            &runtime,
        );
    }

    /// Waits (until `by` at the latest) for the reservation releases of
    /// runs dropped so far: the shutdown's last step, as the process ends
    /// with the runtime, and an unfinished release with it, the budget then
    /// counting the call for good.
    pub async fn settle_releases(&self, by: tokio::time::Instant) {
        let mut pending =
            std::mem::take(&mut *self.releases.lock().unwrap_or_else(|e| e.into_inner()));
        let settled =
            tokio::time::timeout_at(by, async { while pending.join_next().await.is_some() {} });
        if settled.await.is_err() {
            tracing::warn!(
                "{} journal write(s) of cut-off model calls (reservation releases, calls cut off at the provider) were still being written at shutdown; their reservations stay counted against the budgets",
                pending.len()
            );
        }
    }

    /// Runs the read `f` on a reader connection of its own. On SQLite it
    /// runs right here, on the run's worker thread: a read of a row or two by
    /// key takes a few µs, in WAL mode it never waits for the writer, and a
    /// hop to a blocking thread and back costs more than the read (measured:
    /// one `state.get` per task took the drain from 1.0 to 0.64 through the
    /// hop and one shared connection). On PostgreSQL a read is a round trip
    /// to the server, which must not hold a worker thread, so it goes to a
    /// blocking thread.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, String> {
        let permit = self
            .reader_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| format!("the state readers were closed: {e}"))?;
        let (readers, open) = (self.readers.clone(), self.reopen.clone());
        let read = move || {
            let _permit = permit;
            let popped = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let reader = match popped {
                Some(reader) => reader,
                None => open()?,
            };
            let result = f(&reader);
            readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(reader);
            result
        };
        let result = if self.reads_inline {
            read()
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| format!("the state reader stopped: {e}"))?
        };
        result.map_err(|e| e.to_string())
    }
}

#[wasmtime_wasi::async_trait]
impl RunHooks for RunSide {
    fn progress(&self, lease: Lease, progress: Option<String>) {
        self.progress.lock().unwrap().insert(lease, progress);
    }

    async fn wait_while_lease_in_doubt(&self, lease: Lease) {
        // Stopped first: a run stopped at the heartbeat that renews the
        // others sees the renewal before its abort lands.
        if !self.was_stopped(lease) && !self.renewals.may_soon_be_reset() {
            return;
        }
        tracing::warn!(
            task = lease.task_id,
            unrenewed_for = ?self.renewals.unrenewed_for(),
            "a run's model call or HTTP request waits: this daemon has not renewed its leases for nearly --stale-after, and another daemon may take the task over; it goes out once a heartbeat goes through, or the run is stopped"
        );
        loop {
            if self.was_stopped(lease) {
                return std::future::pending().await;
            }
            if !self.renewals.may_soon_be_reset() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn model_context(&self, lease: Lease) -> Result<ModelContext, String> {
        self.with_journal(move |q| q.model_context(lease)).await
    }

    async fn reserve_tokens(
        &self,
        lease: Lease,
        seq: u32,
        need: u64,
        manifest_budget: Option<u64>,
    ) -> Result<Budget, String> {
        let key = (lease, seq);
        lock(&self.reserving).insert(key, false);
        let reserving = self.reserving.clone();
        let written = self
            .with_journal(move |q| {
                // Under the journal's lock: a release asked for from here on
                // waits for this write, and one asked for before is seen.
                match lock(&reserving).remove(&key) {
                    Some(true) => Ok(None),
                    _ => q
                        .reserve_model_tokens(lease, seq, need, manifest_budget)
                        .map(Some),
                }
            })
            .await;
        // When the journal could not be opened the write never ran.
        lock(&self.reserving).remove(&key);
        written?.ok_or_else(|| "the run ended before its tokens were set aside".to_string())
    }

    fn release_reservation_later(&self, lease: Lease, seq: u32) {
        // Not written yet: the write sets nothing aside instead.
        if let Some(released) = lock(&self.reserving).get_mut(&(lease, seq)) {
            *released = true;
            return;
        }
        self.on_journal_later(
            lease,
            "could not release the token reservation of a model call its run cut off before sending it (it stays counted against the budget)",
            move |q| q.release_model_reservation(lease, seq),
        );
    }

    fn record_cut_off_call_later(&self, lease: Lease, attempt: u32, call: ModelCall) {
        self.on_journal_later(
            lease,
            "could not journal a model call its run cut off while the provider had it (its reservation stays counted against the budget)",
            move |q| q.record_cut_off_call(lease, attempt, &call).map(drop),
        );
    }

    async fn state_get(
        &self,
        scope: Scope,
        owner: String,
        key: String,
    ) -> Result<Option<Entry>, String> {
        self.with_reader(move |q| q.state_get(scope, &owner, &key))
            .await
    }

    async fn state_scan(
        &self,
        scope: Scope,
        owner: String,
        prefix: String,
        limit: u32,
    ) -> Result<Vec<Entry>, String> {
        self.with_reader(move |q| q.state_scan(scope, &owner, &prefix, limit))
            .await
    }

    async fn record_event(
        &self,
        lease: Lease,
        event: &'static str,
        detail: serde_json::Value,
    ) -> Result<(), String> {
        self.with_journal(move |q| q.record_run_event(lease, event, &detail))
            .await
            .map(drop)
    }

    async fn record_model_call(
        &self,
        lease: Lease,
        attempt: u32,
        call: &ModelCall,
    ) -> Result<(), String> {
        let call = call.clone();
        match self
            .with_journal(move |q| q.record_model_call(lease, attempt, &call))
            .await?
        {
            Applied::LeaseLost => Err(
                "the run's lease was lost (its task cancelled, or the lease reset); a call that was charged is stored for its spend".into(),
            ),
            Applied::Moved(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Budget;
    use crate::runtime::RunHooks;
    use crate::task::NewTask;

    /// A request waits while the leases are in doubt and goes out once
    /// renewed, except a stopped run's: its abort may land after the
    /// renewal, and a request let through then went out beside the daemon
    /// that takes the task over.
    #[tokio::test]
    async fn a_stopped_runs_request_waits_for_good_and_others_go_on_renewal() {
        let side = RunSide::new(
            Arc::new(|| Err(QueueError::NotNow("no database here".into()))),
            true,
            Renewals::new(Duration::from_secs(2), Duration::from_secs(1)),
        );
        let (live, stopped) = (
            Lease {
                task_id: 1,
                token: 1,
            },
            Lease {
                task_id: 2,
                token: 2,
            },
        );
        let short = Duration::from_millis(200);
        let waits = |lease| tokio::time::timeout(short, side.wait_while_lease_in_doubt(lease));
        assert!(waits(live).await.is_ok(), "renewed just now");
        side.renewals
            .renewed(Instant::now() - Duration::from_secs(5));
        assert!(waits(live).await.is_err(), "in doubt: it waits");
        side.stopped(stopped);
        side.renewals.renewed(Instant::now());
        assert!(waits(live).await.is_ok(), "renewed: it goes out");
        assert!(waits(stopped).await.is_err(), "a stopped run's never does");
        side.forget_stopped(Duration::ZERO);
        assert!(waits(stopped).await.is_ok(), "forgotten once long gone");
    }

    /// A run dropped while its reservation waits for the journal's lock
    /// (another run's write holds it) leaves nothing reserved: its release,
    /// asked for from the drop, went first and deleted nothing, and the
    /// reservation written after counted against the budgets for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // holding the journal's lock is the point
    async fn a_reservation_given_back_before_it_is_written_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let mut q = Queue::open(&db).unwrap();
        q.submit(&NewTask::new("a", "{}")).unwrap();
        let lease = q.claim("a", 1).unwrap()[0].lease;
        let path = db.clone();
        let side = Arc::new(RunSide::new(
            Arc::new(move || Queue::open(&path)),
            true,
            Renewals::new(Duration::from_secs(60), Duration::from_secs(10)),
        ));
        // Open the journal connection, then hold its lock.
        side.reserve_tokens(lease, 1, 0, Some(1000)).await.unwrap();
        let held = side.journal.lock().unwrap();
        let run = {
            let side = side.clone();
            tokio::spawn(async move { side.reserve_tokens(lease, 2, 100, Some(1000)).await })
        };
        while !lock(&side.reserving).contains_key(&(lease, 2)) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // The run is dropped (its deadline passed) and gives its tokens back.
        run.abort();
        side.release_reservation_later(lease, 2);
        // The write, still to come, gives it back by not being made: no
        // release races it for the lock (with a std Mutex's waiters woken
        // in no set order, the write could come second and stay).
        assert!(
            lock(&side.releases).is_empty(),
            "a release was sent to race the write"
        );
        drop(held);
        // The write gave up its place.
        while !lock(&side.reserving).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        side.settle_releases(tokio::time::Instant::now() + std::time::Duration::from_secs(10))
            .await;
        assert_eq!(
            q.reserve_model_tokens(lease, 3, 0, Some(1000)).unwrap(),
            Budget::Reserved { left: 1000 },
            "nothing stays reserved"
        );
    }
}
