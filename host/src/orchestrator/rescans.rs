//! Keeping the daemon's agents current without stopping it. The agents
//! folder is looked at every few seconds (a listing and two `stat`s per
//! agent); a changed component is compiled on a task of its own, on a copy
//! of the agent table that replaces the daemon's when done. Meanwhile the
//! daemon goes on dispatching with the agents as they were: compiling one
//! Python component takes ~10 s on two cores, and while the loop waited for
//! it, every other agent's tasks waited too.

use std::time::Duration;

use tokio::sync::mpsc;

use super::Daemon;
use crate::runtime::{AgentDir, ScanReport};

/// Most time between two looks at the agents folder (a daemon polling more
/// often looks as often as it polls).
pub(super) const RESCAN_AT_MOST_EVERY: Duration = Duration::from_secs(2);

/// A finished rescan's agents and report; `None` when it panicked.
pub(super) type Rescanned = Option<(AgentDir, ScanReport)>;

pub(super) struct Rescans {
    /// A rescan is compiling: the next waits for it.
    busy: bool,
    done_tx: mpsc::UnboundedSender<Rescanned>,
    pub done_rx: mpsc::UnboundedReceiver<Rescanned>,
}

/// Answers for a rescan whatever becomes of it: `None` if it panicked (or
/// was dropped) before it answered, so the daemon does not wait for it for
/// good.
struct Answer {
    done: Option<mpsc::UnboundedSender<Rescanned>>,
}

impl Answer {
    fn send(mut self, rescanned: (AgentDir, ScanReport)) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Some(rescanned));
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(None);
        }
    }
}

impl Rescans {
    pub fn new() -> Rescans {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Rescans {
            busy: false,
            done_tx,
            done_rx,
        }
    }
}

impl Daemon {
    /// Looks at the agents folder on a task of its own, unless a look is
    /// still compiling.
    pub(super) fn start_rescan(&mut self) {
        if self.rescans.busy {
            return;
        }
        self.rescans.busy = true;
        let (mut agents, runtime) = (self.agents.clone(), self.runtime.clone());
        let answer = Answer {
            done: Some(self.rescans.done_tx.clone()),
        };
        tokio::spawn(async move {
            let report = agents.rescan(&runtime).await;
            answer.send((agents, report));
        });
    }

    /// Takes a finished rescan's agents in: later claims and dispatches use
    /// them; runs in flight finish on the version they started with.
    pub(super) fn apply_rescan(&mut self, rescanned: Rescanned) {
        self.rescans.busy = false;
        let Some((agents, report)) = rescanned else {
            tracing::error!(
                "looking at the agents folder failed; the agents stay as they were, and the next look tries again"
            );
            return;
        };
        self.agents = agents;
        if !report.is_empty() {
            tracing::debug!(?report, "agents rescanned");
        }
        self.release_orphaned_buffers();
    }
}
