//! Wake-ups pushed by the server: a connection of its own that waits on
//! `LISTEN colony_work` and calls back the moment another host (or the CLI)
//! commits runnable work, so a daemon claims at once instead of at its next
//! look at the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::postgres::Config;
use ::postgres::fallible_iterator::FallibleIterator;

use super::open;

/// How often the waiting thread checks whether it should stop.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// The pause before reconnecting after the connection was lost.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Stops the listening thread when dropped.
pub struct WorkListener {
    stop: Arc<AtomicBool>,
}

impl Drop for WorkListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts a thread that calls `on_work` for every notification (and once
/// after each reconnection, since notifications sent meanwhile are lost).
pub fn spawn(
    config: Config,
    location: String,
    target: String,
    on_work: Box<dyn Fn() + Send>,
) -> std::io::Result<WorkListener> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("colony-listen".into())
        .spawn(move || {
            let mut failures = crate::repeats::Repeats::default();
            // Connections lost once made: a server restarting, or backends
            // killed in a loop, logged one line per 30 s rather than one per
            // loss (62 lines in 25 s), and a streak ends only once a
            // connection has lasted that long.
            let mut losses = crate::repeats::Repeats::default();
            while !stopped.load(Ordering::Relaxed) {
                let mut client = match open(&config, &location, &target, Duration::ZERO, true) {
                    Ok(client) => client,
                    Err(e) => {
                        if let Some(more) = failures.failed() {
                            tracing::warn!(
                                "listening for new work failed, retrying{}: {e}",
                                crate::repeats::more(more)
                            );
                        }
                        std::thread::sleep(RECONNECT_AFTER);
                        continue;
                    }
                };
                if let Some(lasted) = failures.succeeded() {
                    tracing::info!("listening for new work again (it failed for {lasted:.0?})");
                }
                on_work();
                let connected_at = std::time::Instant::now();
                while !stopped.load(Ordering::Relaxed) {
                    let next = client
                        .notifications()
                        .timeout_iter(CHECK_EVERY)
                        .next()
                        .map(|n| n.is_some());
                    match next {
                        Ok(true) => on_work(),
                        Ok(false) if client.is_closed() => break,
                        Ok(false) => {}
                        Err(e) => {
                            if connected_at.elapsed() >= crate::repeats::WINDOW {
                                losses.succeeded();
                            }
                            if let Some(more) = losses.failed() {
                                tracing::warn!(
                                    "listening for new work: {}; reconnecting{}",
                                    super::describe(&e),
                                    crate::repeats::more(more)
                                );
                            }
                            break;
                        }
                    }
                }
                std::thread::sleep(RECONNECT_AFTER.min(CHECK_EVERY));
            }
        })?;
    Ok(WorkListener { stop })
}
