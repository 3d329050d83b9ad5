//! The daemon's side of the outbox: starting the deliveries that are due
//! and recording how each went.

use std::time::Duration;

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

    pub(super) fn record_delivery(&mut self, attempt: crate::delivery::Attempt) {
        let (deliverer, queue) = (&mut self.deliverer, &mut self.queue);
        let mut result = tokio::task::block_in_place(|| deliverer.record(queue, &attempt));
        for _ in 0..5 {
            match &result {
                Err(e) if e.is_transient() => {
                    result = tokio::task::block_in_place(|| {
                        std::thread::sleep(Duration::from_millis(100));
                        deliverer.record(queue, &attempt)
                    });
                }
                _ => break,
            }
        }
        match result {
            Ok(Some("sent")) => self.summary.effects_sent += 1,
            Ok(Some("failed")) => self.summary.effects_failed += 1,
            Ok(_) => {}
            Err(e) => {
                self.deliverer.abandon(&attempt);
                tracing::error!(
                    "could not record an effect's delivery; it will be sent again: {e}"
                );
            }
        }
    }
}
