//! The daemon's side of the outbox: starting the deliveries that are due
//! and recording how each went.

use super::Daemon;

impl Daemon {
    pub(super) fn start_deliveries(&mut self) {
        let (deliverer, queue, agents) = (&mut self.deliverer, &mut self.queue, &self.agents);
        let grant_of = |agent: &str| agents.loaded(agent).map(|a| a.limits.http.clone());
        let loaded = agents.loaded_names();
        match tokio::task::block_in_place(|| deliverer.start_due(queue, &loaded, grant_of)) {
            Ok(()) => {
                self.effects_due = false;
                if let Some(lasted) = self.delivery_errors.succeeded() {
                    tracing::info!("claiming effects works again (it failed for {lasted:.0?})");
                }
            }
            Err(e) if e.is_permanent() => self.unusable = Some(e),
            Err(e) => {
                if let Some(more) = self.delivery_errors.failed() {
                    tracing::error!(
                        "claiming effects to send failed, will retry{}: {e}",
                        crate::repeats::more(more)
                    );
                }
            }
        }
    }

    /// Records a delivery's answer. One the database does not take now
    /// (busy or out) is kept for [`Daemon::record_deliveries_again`]:
    /// retried here, with sleeps, each try up to the busy timeout, the loop
    /// and its heartbeats stood still.
    pub(super) fn record_delivery(&mut self, attempt: crate::delivery::Attempt) {
        let (deliverer, queue) = (&mut self.deliverer, &mut self.queue);
        match tokio::task::block_in_place(|| deliverer.record(queue, &attempt)) {
            Ok(Some("sent")) => self.summary.effects_sent += 1,
            Ok(Some("failed")) => self.summary.effects_failed += 1,
            Ok(_) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(
                    "could not record an effect's delivery now, will retry after the next heartbeat: {e}"
                );
                self.unrecorded_deliveries.push(attempt);
            }
            Err(e) => {
                self.deliverer.abandon(&attempt);
                tracing::error!(
                    "could not record an effect's delivery; it will be sent again: {e}"
                );
            }
        }
    }

    /// Records again the answers [`Daemon::record_delivery`] kept.
    pub(super) fn record_deliveries_again(&mut self) {
        for attempt in std::mem::take(&mut self.unrecorded_deliveries) {
            self.record_delivery(attempt);
        }
    }
}
