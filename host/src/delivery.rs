//! Delivering the outbox: the daemon claims due effects under a short lease,
//! sends each with its stable `Idempotency-Key: colony-<task id>-<seq>`, and
//! records the answer (sent on a 2xx; otherwise retried with backoff until
//! its attempts are used). At least once: a sender that dies mid-request
//! leaves its claim to expire and another daemon sends again with the same
//! key, which the receiving API uses to do the work once.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::queue::{Delivery, Queue, QueueError};
use crate::runtime::HttpGrant;

/// Most deliveries in flight per daemon.
const MAX_IN_FLIGHT: usize = 16;

/// One attempt of a delivery and how it ended.
pub struct Attempt {
    delivery: Delivery,
    answer: Answer,
}

impl Attempt {
    /// The claim it answers: effect id and claim token.
    pub fn claim(&self) -> (i64, i64) {
        (self.delivery.id, self.delivery.token)
    }

    /// A 2xx answer to `delivery`, as a receiver gives it (for tests).
    #[cfg(test)]
    pub(crate) fn answered(delivery: Delivery) -> Attempt {
        let answer = Answer {
            status: Some(200),
            error: None,
            refused: false,
            retry_after: None,
        };
        Attempt { delivery, answer }
    }
}

/// How a try ended: the HTTP status, or why there was none.
struct Answer {
    status: Option<u16>,
    error: Option<String>,
    /// Refused by policy (the grant no longer allows it, the address is not
    /// public): no retry can succeed, so the effect fails at once.
    refused: bool,
    /// How long the receiver asked to be left alone (`Retry-After` on a
    /// 429 or 503, say): the next attempt waits at least that long.
    retry_after: Option<Duration>,
}

/// Sends a daemon's share of the outbox.
pub struct Deliverer {
    client: reqwest::Client,
    /// A claimed delivery not finished by then is claimed again by any
    /// daemon: twice the request timeout.
    claim_lease: Duration,
    /// The claims being sent (effect id and claim token), each with its
    /// sending task.
    in_flight: HashMap<(i64, i64), tokio::task::JoinHandle<()>>,
    done_tx: mpsc::UnboundedSender<Attempt>,
    pub done_rx: mpsc::UnboundedReceiver<Attempt>,
    /// For tests: this many of the next deliveries panic while sending.
    panics_left: u32,
}

impl Deliverer {
    /// A sender whose requests time out after `timeout`; the first
    /// `panicking` deliveries panic while sending (for tests; 0 otherwise).
    pub fn new(timeout: Duration, panicking: u32) -> Deliverer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A redirect is an answer, not a 2xx: the effect is retried and
            // then fails visibly rather than following to another origin.
            .redirect(reqwest::redirect::Policy::none())
            // Straight to the granted origin, as a run's own requests go: a
            // proxy from HTTP_PROXY would receive the agent's secrets and
            // answer for a target the address check never saw.
            .no_proxy()
            .dns_resolver(Arc::new(PublicAddressesOnly))
            .timeout(timeout)
            .user_agent(concat!("colony/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a plain reqwest client builds");
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Deliverer {
            client,
            claim_lease: timeout * 2,
            in_flight: HashMap::new(),
            done_tx,
            done_rx,
            panics_left: panicking,
        }
    }

    /// Claims due effects for the free sending slots and starts sending them,
    /// each under its agent's grant (`grant_of`: the allow-list is checked
    /// again and the agent's secrets are added here, never seen by the agent).
    pub fn start_due(
        &mut self,
        queue: &mut Queue,
        agents: &[String],
        grant_of: impl Fn(&str) -> Option<Arc<HttpGrant>>,
    ) -> Result<(), QueueError> {
        let free = MAX_IN_FLIGHT - self.in_flight.len();
        // A read first: tasks that queue no effects cost no write transaction.
        // The queue's clock decides (the server's on PostgreSQL).
        let due = match queue.next_effect_due(agents)? {
            Some(at) => at <= queue.now()?,
            None => false,
        };
        if free == 0 || !due {
            return Ok(());
        }
        for delivery in queue.claim_due_effects(free, self.claim_lease, agents)? {
            let claim = (delivery.id, delivery.token);
            let (client, done) = (self.client.clone(), self.done_tx.clone());
            let grant = grant_of(&delivery.agent);
            let panic_here = self.panics_left > 0;
            self.panics_left = self.panics_left.saturating_sub(1);
            let sending = tokio::spawn(async move {
                let sending = async {
                    if panic_here {
                        panic!("a panicking delivery, as the test asked");
                    }
                    match grant {
                        Some(grant) => send(&client, &delivery, &grant).await,
                        None => Answer::failed(
                            None,
                            format!(
                                "the agent {} is not loaded on this daemon, so its allow-list and secrets are unknown",
                                delivery.agent
                            ),
                            false,
                        ),
                    }
                };
                // A bug that panics the sending is the attempt's failure,
                // retried as any: unanswered, its claim held a sending slot
                // for good. What the panic said goes to the log only: it is
                // text nobody vetted, which could hold the request's secrets.
                let answer = AssertUnwindSafe(sending)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        let message = crate::panic_message(panic.as_ref());
                        tracing::error!(
                            task = delivery.task_id,
                            "a bug: sending an effect panicked: {message}"
                        );
                        let error =
                            "the host failed while sending (a bug; the daemon's log says more)";
                        Answer::failed(None, error.to_string(), false)
                    });
                let _ = done.send(Attempt { delivery, answer });
            });
            self.in_flight.insert(claim, sending);
        }
        Ok(())
    }

    /// Records an attempt's answer; returns the effect's new state (`None`:
    /// the claim had expired). On a store error the attempt stays in flight,
    /// for the caller to record again (its claim lease covers the wait).
    pub fn record(
        &mut self,
        queue: &mut Queue,
        attempt: &Attempt,
    ) -> Result<Option<&'static str>, QueueError> {
        let stored = queue.finish_delivery(
            &attempt.delivery,
            attempt.answer.status,
            attempt.answer.error.as_deref(),
            attempt.answer.refused,
            attempt.answer.retry_after,
        )?;
        let d = &attempt.delivery;
        self.in_flight.remove(&(d.id, d.token));
        match stored {
            Some("sent") => tracing::info!(task = d.task_id, seq = d.effect.seq, "effect sent"),
            Some(state) => tracing::warn!(
                task = d.task_id,
                seq = d.effect.seq,
                attempt = d.attempt,
                status = attempt.answer.status,
                error = attempt.answer.error.as_deref().unwrap_or(""),
                "effect not delivered; now {state}"
            ),
            None => tracing::warn!(
                task = d.task_id,
                "an effect's claim expired while sending; another sender has it"
            ),
        }
        Ok(stored)
    }

    /// Gives up recording an attempt: its claim lease will run out and
    /// another sender will try again.
    pub fn abandon(&mut self, attempt: &Attempt) {
        let d = &attempt.delivery;
        self.in_flight.remove(&(d.id, d.token));
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Stops the deliveries still being sent, for a daemon that stops
    /// waiting for them, and forgets them: the claims (effect id, claim
    /// token) of those that stopped, to give back. Given back while their
    /// requests were still out, the effects were sent by the next daemon
    /// beside them. One that does not stop within a second keeps its claim
    /// (another daemon takes it over when it runs out); an answer that came
    /// as they stopped is in `done_rx`, to record rather than give back.
    pub async fn stop_in_flight(&mut self) -> Vec<(i64, i64)> {
        let sending: Vec<_> = self.in_flight.drain().collect();
        for (_, task) in &sending {
            task.abort();
        }
        let by = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut stopped = Vec::with_capacity(sending.len());
        for (claim, task) in sending {
            match tokio::time::timeout_at(by, task).await {
                Ok(_) => stopped.push(claim),
                Err(_) => tracing::warn!(
                    effect = claim.0,
                    "a delivery did not stop within 1 s of being cut off; its claim is left to run out"
                ),
            }
        }
        stopped
    }
}

impl Answer {
    fn failed(status: Option<u16>, error: String, refused: bool) -> Answer {
        Answer {
            status,
            error: Some(error),
            refused,
            retry_after: None,
        }
    }
}

/// One attempt: the request as queued, plus the idempotency key and the
/// agent's secrets for the origin.
async fn send(client: &reqwest::Client, delivery: &Delivery, grant: &HttpGrant) -> Answer {
    let effect = &delivery.effect;
    // The manifest may have changed since the effect was queued.
    if let Err(why) = grant.check_url(&effect.method, &effect.url) {
        return Answer::failed(None, format!("no longer allowed: {why}"), true);
    }
    if let Err(why) = crate::effects::check_path_as_sent(&effect.url) {
        return Answer::failed(None, format!("not sent: {why}"), true);
    }
    let secrets = grant.secret_headers(&effect.url);
    let method = match reqwest::Method::from_bytes(effect.method.as_bytes()) {
        Ok(method) => method,
        Err(e) => {
            let error = format!("method {:?}: {e}", effect.method);
            return Answer::failed(None, error, true);
        }
    };
    let mut request = client
        .request(method, &effect.url)
        .header("Idempotency-Key", delivery.idempotency_key());
    let reserved = |name: &str| {
        name.eq_ignore_ascii_case("idempotency-key")
            || name.eq_ignore_ascii_case("host")
            || secrets
                .iter()
                .any(|(secret, _)| name.eq_ignore_ascii_case(secret.as_str()))
    };
    for (name, value) in effect.headers.iter().filter(|(name, _)| !reserved(name)) {
        request = request.header(name, value);
    }
    for (name, value) in secrets {
        request = request.header(name, value);
    }
    if let Some(body) = &effect.body {
        request = request.body(body.clone());
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => Answer {
            status: Some(response.status().as_u16()),
            error: None,
            refused: false,
            retry_after: None,
        },
        Ok(response) => {
            let status = response.status().as_u16();
            // The receiver refused the request itself (a redirect, which is
            // not followed, or a 4xx other than a timeout, a conflict, a
            // lock, too early or too many): the same request will be
            // refused again.
            let refused =
                (300..500).contains(&status) && !matches!(status, 408 | 409 | 423 | 425 | 429);
            let error = match refused {
                true => format!("HTTP {status}, refused by the receiver"),
                false => format!("HTTP {status}"),
            };
            Answer {
                retry_after: crate::retry::retry_after(response.headers()),
                ..Answer::failed(Some(status), error, refused)
            }
        }
        Err(e) => {
            let refused = refused_address(&e).is_some();
            Answer::failed(None, describe(e), refused)
        }
    }
}

/// The resolver's refusal somewhere in `e`'s causes, if that is why it failed.
fn refused_address(e: &reqwest::Error) -> Option<&NonPublicAddress> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = cause {
        if let Some(refused) = error.downcast_ref::<NonPublicAddress>() {
            return Some(refused);
        }
        cause = error.source();
    }
    None
}

/// Why a request failed, without its URL (it may carry a query the agent
/// put there).
fn describe(e: reqwest::Error) -> String {
    if let Some(refused) = refused_address(&e) {
        return format!("refused: {refused}");
    }
    // reqwest's own text ("error sending request") hides the cause (the
    // connection refused, the receiver's certificate not trusted, the
    // connection closed, a malformed answer): said, each cause after it.
    let e = e.without_url();
    let mut causes = vec![e.to_string()];
    let mut cause = std::error::Error::source(&e);
    while let Some(inner) = cause {
        causes.push(inner.to_string());
        cause = inner.source();
    }
    if e.is_timeout() {
        "no answer in time".to_string()
    } else if e.is_connect() {
        // The innermost cause is the one to act on; those between repeat it.
        format!(
            "could not connect: {}",
            causes.last().expect("one at least")
        )
    } else {
        format!("request failed: {}", causes.join(": "))
    }
}

/// The deliverer's DNS: a name's public addresses only, as for a run's own
/// requests (`runtime::http`), so that DNS cannot point a granted name at a
/// loopback, private or link-local address (`localhost`, the metadata
/// service at 169.254.169.254) when the effect is sent. An address the
/// allow-list names literally never comes here: it needs no lookup.
struct PublicAddressesOnly;

/// A name that resolved to non-public addresses only.
#[derive(Debug)]
struct NonPublicAddress(String);

impl std::fmt::Display for NonPublicAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonPublicAddress {}

impl reqwest::dns::Resolve for PublicAddressesOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let mut public = Vec::new();
            let mut refused = Vec::new();
            for addr in tokio::net::lookup_host((name.as_str(), 0)).await? {
                match crate::runtime::http::non_public(addr.ip()) {
                    None => public.push(addr),
                    Some(kind) => refused.push(format!("{} ({kind})", addr.ip())),
                }
            }
            if public.is_empty() && !refused.is_empty() {
                return Err(Box::new(NonPublicAddress(format!(
                    "{name} resolved to {}; effects go to a loopback, private, link-local or unspecified address only when allowed_hosts names it literally",
                    refused.join(", ")
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
