//! Outbound HTTP for agents: the standard `wasi:http/outgoing-handler`
//! (wasmtime-wasi-http), sent by the host under the agent's grant.
//!
//! Denied by default. An agent's manifest grants origins (`allowed_hosts`:
//! scheme, host, port; `*.example.com` for subdomains); every other request
//! fails with WASI's `HTTP-request-denied` before any connection. The host
//! resolves names itself and connects only to an address it checked:
//! loopback, private, link-local and unspecified addresses are refused
//! unless the grant names that address literally, so a granted public name
//! cannot be pointed at 127.0.0.1 or 169.254.169.254 by DNS. The `Host`
//! header is the host's (from the URL); redirects are not followed (the
//! guest sees the 3xx, and a request to its `Location` is checked again).
//!
//! Secrets (`[secrets."https://api.example.com"]`) are read from the
//! environment when the agent loads and added by the host to requests to
//! that origin; a guest-supplied header of the same name is dropped, and
//! the guest never sees the value.
//!
//! Bounds per run: `http_timeout` per request (connection, head and body),
//! `http_max_response_kb` per response body (cut off past it with an error,
//! never buffered whole), `http_max_requests` requests. Every request
//! appends an `http_request` audit event (method, origin, path without the
//! query, status, bytes, ms — or why it was refused; never headers or bodies).
//!
//! `grant` parses what a manifest grants (origins, secrets, bounds); this
//! file sends one run's requests under that grant.

mod grant;

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpHooks};

use super::sandbox::{RunHooks, TaskLog};
use crate::task::Lease;

pub use grant::{
    DEFAULT_MAX_REQUESTS, DEFAULT_MAX_RESPONSE_KB, DEFAULT_TIMEOUT, HttpGrant, ManifestHttp,
    Origin, OriginPattern, Scheme, Secret, SecretSpec, check_url, non_public,
};
use grant::{Host, shown_origin};

/// How long the end of a run waits for its `http_request` events to be stored.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

// ----- one run's requests ---------------------------------------------------

/// One run's outbound HTTP: the wasi-http context and the policy that sends.
pub struct HttpSession {
    pub(super) ctx: WasiHttpCtx,
    pub(super) policy: HttpPolicy,
}

impl HttpSession {
    /// The agent's grant (effects are checked against it too).
    pub(super) fn grant(&self) -> &HttpGrant {
        &self.policy.grant
    }
}

impl HttpSession {
    pub fn new(
        grant: Arc<HttpGrant>,
        hooks: Arc<dyn RunHooks>,
        lease: Lease,
        log: TaskLog,
    ) -> Self {
        HttpSession {
            ctx: WasiHttpCtx::new(),
            policy: HttpPolicy {
                grant,
                hooks,
                lease,
                log,
                attempts: 0,
                events: None,
                open: Vec::new(),
            },
        }
    }

    /// Ends the run's HTTP: requests still open are recorded as they stand,
    /// and the returned future waits (briefly) until every `http_request`
    /// event is stored, so they precede the run's result in the trail.
    pub fn finish(&mut self) -> impl Future<Output = ()> + Send + 'static {
        let events = self.policy.events.clone();
        for record in self.policy.open.drain(..) {
            record.finish(Some("unfinished when the run ended".into()));
        }
        async move {
            let Some(events) = events else { return };
            let (done, wait) = oneshot::channel();
            if events.send(Recorded::Flush(done)).is_ok() {
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, wait).await;
            }
        }
    }
}

/// What goes to the run's event writer.
enum Recorded {
    /// An event's name and detail.
    Event(&'static str, Value),
    Flush(oneshot::Sender<()>),
}

/// The `wasi:http` hooks of one run: checks every request against the
/// grant and sends it itself.
pub struct HttpPolicy {
    grant: Arc<HttpGrant>,
    hooks: Arc<dyn RunHooks>,
    lease: Lease,
    log: TaskLog,
    /// Requests the guest asked to send (refused ones included).
    attempts: u32,
    /// Writes `http_request` events in order (started by the first request).
    events: Option<mpsc::UnboundedSender<Recorded>>,
    /// The run's requests, to record those still open when it ends.
    open: Vec<Arc<RequestRecord>>,
}

impl HttpPolicy {
    fn events(&mut self) -> mpsc::UnboundedSender<Recorded> {
        if let Some(events) = &self.events {
            return events.clone();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (hooks, lease) = (self.hooks.clone(), self.lease);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Recorded::Event(name, detail) => {
                        if let Err(e) = hooks.record_event(lease, name, detail).await {
                            tracing::warn!(
                                task = lease.task_id,
                                "could not record an {name} event: {e}"
                            );
                        }
                    }
                    Recorded::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        self.events = Some(tx.clone());
        tx
    }

    /// Records a refused request (event and task log) and answers the guest.
    fn refuse(&mut self, detail: Value, shown: &str, why: String) -> SendFuture {
        self.log
            .line("warn", &format!("http: {shown} refused: {why}"));
        let mut detail = detail;
        detail["refused"] = Value::String(why);
        let _ = self.events().send(Recorded::Event("http_request", detail));
        Box::new(async { Err(Error::HttpRequestDenied) })
    }

    /// Records an effect refused when queued (by the grant, or its shape)
    /// as a refused request is recorded: a task log line and an
    /// `effect_refused` event with the method, origin and path (never the
    /// query, a header or the body).
    pub(super) fn record_refused_effect(&mut self, method: &str, url: &str, why: &str) {
        let method = trail_method(method);
        let (origin, path) = match url.parse::<http::Uri>() {
            Ok(uri) => (shown_origin(&uri), trail_path(&uri)),
            Err(_) => ("(not a URL)".to_string(), String::new()),
        };
        self.log.line(
            "warn",
            &format!("effects: {method} {origin}{path} refused: {why}"),
        );
        let detail = json!({"method": method, "origin": origin, "path": path, "refused": why});
        let _ = self
            .events()
            .send(Recorded::Event("effect_refused", detail));
    }
}

/// A request's method as the trail and the task log show it: an extension
/// method may be any token, of any length (5 MB ones made 500 MB of events).
fn trail_method(method: &str) -> String {
    super::sandbox::truncate(method.to_string(), 32)
}

/// Most bytes of a URL's path an event or log line keeps.
const TRAIL_PATH_BYTES: usize = 256;

/// A request's path as the trail and the task log show it: the guest's
/// text, kept to a line's worth (a guest building 60 KB paths made 60 KB
/// events, 100 per run).
fn trail_path(uri: &http::Uri) -> String {
    super::sandbox::truncate(uri.path().to_string(), TRAIL_PATH_BYTES)
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    /// The host sets `Host` itself, from the checked URL.
    fn set_host_header(&mut self) -> bool {
        false
    }

    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let started = Instant::now();
        let method = request.method().clone();
        let uri = request.uri().clone();
        // What the trail and the log show: never the query, the user or a header.
        let path = trail_path(&uri);
        let origin = Origin::of_uri(&uri);
        let origin_text = shown_origin(&uri);
        let shown_method = trail_method(method.as_str());
        let detail = json!({"method": shown_method, "origin": origin_text, "path": path});
        let shown = format!("{shown_method} {origin_text}{path}");

        self.attempts += 1;
        let cap = self.grant.max_requests;
        if self.attempts > cap {
            let why = format!("the run made its {cap} requests (http_max_requests)");
            if self.attempts == cap + 1 {
                return self.refuse(detail, &shown, why);
            }
            // One event says the cap was reached; later attempts only fail.
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let origin = match origin {
            Ok(origin) => origin,
            Err(why) => return self.refuse(detail, &shown, why),
        };
        if let Err(why) = self.grant.check(&method, &origin) {
            return self.refuse(detail, &shown, why);
        }

        // The request as the host sends it: origin-form target, the host's
        // `Host`, and the grant's secrets instead of any same-named header.
        let headers = request.headers_mut();
        headers.remove(HOST);
        let host =
            HeaderValue::from_str(&origin.host_header()).expect("a checked host is a header value");
        headers.insert(HOST, host);
        for secret in self
            .grant
            .secrets
            .iter()
            .filter(|s| s.origin.matches(&origin))
        {
            headers.remove(&secret.header);
            headers.insert(secret.header.clone(), secret.value.clone());
        }
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/")
            .parse()
            .map_err(|_| ());
        match target {
            Ok(target) => *request.uri_mut() = target,
            Err(()) => return self.refuse(detail, &shown, "the URL's path is not valid".into()),
        }

        let record = Arc::new(RequestRecord {
            detail: Mutex::new(Some(detail)),
            started,
            events: self.events(),
        });
        self.open.push(record.clone());
        let plan = Plan {
            origin,
            grant: self.grant.clone(),
            options,
            log: self.log.clone(),
            shown,
        };
        let (hooks, lease) = (self.hooks.clone(), self.lease);
        Box::new(async move {
            hooks.wait_while_lease_in_doubt(lease).await;
            send(plan, request, record).await
        })
    }
}

/// One request's `http_request` event, written once: when its response
/// body ends, fails or is dropped, when it fails before that, or when the
/// run ends.
struct RequestRecord {
    detail: Mutex<Option<Value>>,
    started: Instant,
    events: mpsc::UnboundedSender<Recorded>,
}

impl RequestRecord {
    fn set(&self, key: &str, value: Value) {
        if let Some(detail) = self.detail.lock().unwrap().as_mut() {
            detail[key] = value;
        }
    }

    fn finish(&self, error: Option<String>) {
        let Some(mut detail) = self.detail.lock().unwrap().take() else {
            return;
        };
        detail["ms"] = json!(self.started.elapsed().as_millis() as u64);
        if let Some(error) = error {
            detail["error"] = Value::String(error);
        }
        let _ = self.events.send(Recorded::Event("http_request", detail));
    }

    fn refuse(&self, why: String) {
        self.set("refused", Value::String(why));
        self.finish(None);
    }
}

/// What sending a checked request needs.
struct Plan {
    origin: Origin,
    grant: Arc<HttpGrant>,
    options: Option<RequestOptions>,
    log: TaskLog,
    shown: String,
}

trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Io for T {}

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

async fn send(
    plan: Plan,
    request: http::Request<WasiBody>,
    record: Arc<RequestRecord>,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let deadline = tokio::time::Instant::now() + plan.grant.timeout;
    let result = send_within(&plan, request, deadline).await;
    match result {
        Ok((status, body, io)) => {
            record.set("status", json!(status.as_u16()));
            let limit = plan.grant.max_response_bytes;
            let (parts, incoming) = body.into_parts();
            let body = BoundedBody {
                inner: incoming,
                read: 0,
                limit,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                cut: false,
                record,
            };
            Ok((http::Response::from_parts(parts, body.boxed_unsync()), io))
        }
        Err(Failure::Refused(why)) => {
            plan.log
                .line("warn", &format!("http: {} refused: {why}", plan.shown));
            record.refuse(why);
            Err(Error::HttpRequestDenied)
        }
        Err(Failure::Failed(error)) => {
            record.finish(Some(error.to_string()));
            Err(error)
        }
    }
}

enum Failure {
    /// Refused by policy (an address the grant does not name).
    Refused(String),
    Failed(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Failed(e)
    }
}

async fn send_within(
    plan: &Plan,
    request: http::Request<WasiBody>,
    deadline: tokio::time::Instant,
) -> Result<
    (
        http::StatusCode,
        http::Response<hyper::body::Incoming>,
        IoFuture,
    ),
    Failure,
> {
    let origin = &plan.origin;
    let addresses = resolve(plan, deadline).await?;

    // Connect to the first checked address that answers.
    let connect_deadline = match plan.options.and_then(|o| o.connect_timeout) {
        Some(t) => deadline.min(tokio::time::Instant::now() + t),
        None => deadline,
    };
    let mut last_error = None;
    let mut stream = None;
    for addr in addresses {
        match tokio::time::timeout_at(connect_deadline, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last_error = Some(Error::Connect(e)),
            Err(_) => {
                last_error = Some(Error::ConnectionTimeout);
                break;
            }
        }
    }
    let Some(stream) = stream else {
        return Err(last_error.unwrap_or(Error::ConnectionRefused).into());
    };
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Io> = match origin.scheme {
        Scheme::Http => Box::new(stream),
        Scheme::Https => {
            let config = tls_config().map_err(|e| Error::InternalError(Some(e)))?;
            let name = match &origin.host {
                Host::Name(name) => rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|_| Error::HttpRequestUriInvalid)?,
                Host::Ip(ip) => rustls::pki_types::ServerName::from(*ip),
            };
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, stream);
            match tokio::time::timeout_at(connect_deadline, tls).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => return Err(Error::Tls(e).into()),
                Err(_) => return Err(Error::ConnectionTimeout.into()),
            }
        }
    };
    let (mut sender, conn) = tokio::time::timeout_at(
        connect_deadline,
        hyper::client::conn::http1::handshake::<_, WasiBody>(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)?
    .map_err(Error::from)?;

    let head_deadline = match plan.options.and_then(|o| o.first_byte_timeout) {
        Some(t) => deadline.min(tokio::time::Instant::now() + t),
        None => deadline,
    };
    let mut response = pin!(tokio::time::timeout_at(
        head_deadline,
        sender.send_request(request)
    ));
    let mut conn = Some(conn);
    // Drive the connection while waiting for the response's head.
    let response = poll_fn(|cx| match response.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending => {
            let Some(c) = conn.as_mut() else {
                return Poll::Pending;
            };
            let done = ready!(Pin::new(c).poll(cx));
            conn = None;
            match done {
                Ok(()) => response.as_mut().poll(cx),
                Err(e) => Poll::Ready(Ok(Err(e))),
            }
        }
    })
    .await
    .map_err(|_| Error::HttpResponseTimeout)?
    .map_err(Error::from)?;
    let io: IoFuture = Box::new(async move {
        match conn {
            Some(conn) => conn.await.map_err(Error::from),
            None => Ok(()),
        }
    });
    Ok((response.status(), response, io))
}

/// The addresses the request may go to: the literal address the grant
/// names, or the name's public addresses.
async fn resolve(plan: &Plan, deadline: tokio::time::Instant) -> Result<Vec<SocketAddr>, Failure> {
    let origin = &plan.origin;
    let name = match &origin.host {
        // Only reachable when an entry names this address (or a public one).
        Host::Ip(ip) => {
            if let Some(kind) = non_public(*ip)
                && !plan.grant.names_address(origin, *ip)
            {
                return Err(Failure::Refused(format!("{ip} is a {kind} address")));
            }
            return Ok(vec![SocketAddr::new(*ip, origin.port)]);
        }
        Host::Name(name) => name,
    };
    let found = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((name.as_str(), origin.port)),
    )
    .await
    .map_err(|_| Error::DnsTimeout)?
    .map_err(|e| Error::DnsError {
        rcode: Some(e.to_string()),
        info_code: None,
    })?;
    let mut public = Vec::new();
    let mut refused = Vec::new();
    for addr in found {
        match non_public(addr.ip()) {
            None => public.push(addr),
            Some(kind) => refused.push(format!("{} ({kind})", addr.ip())),
        }
    }
    if public.is_empty() {
        if refused.is_empty() {
            return Err(Error::DestinationNotFound.into());
        }
        return Err(Failure::Refused(format!(
            "{name} resolved to {}; the host connects to a loopback, private, link-local or unspecified address only when allowed_hosts names it literally",
            refused.join(", ")
        )));
    }
    Ok(public)
}

/// TLS as the model providers use it: rustls (ring) with the platform's roots.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls_platform_verifier::BuilderVerifierExt;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_platform_verifier()
                .map_err(|e| e.to_string())?
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// A response body the guest reads frame by frame, cut off with an error
/// past the grant's limit or its deadline; it writes the request's event
/// when it ends, fails or is dropped.
struct BoundedBody {
    inner: hyper::body::Incoming,
    read: u64,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    cut: bool,
    record: Arc<RequestRecord>,
}

impl BoundedBody {
    fn fail(&mut self, error: Error, why: String) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.cut = true;
        self.record.set("bytes", json!(self.read));
        self.record.finish(Some(why));
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for BoundedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                };
                if this.read + frame.len() as u64 > this.limit {
                    let limit = this.limit;
                    return this.fail(
                        Error::HttpResponseBodySize(Some(limit)),
                        format!("the response body is larger than {} KiB (http_max_response_kb); cut off", limit >> 10),
                    );
                }
                this.read += frame.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            Poll::Ready(Some(Err(e))) => {
                let why = format!("reading the response body failed: {e}");
                this.fail(Error::from(e), why)
            }
            Poll::Ready(None) => {
                this.record.set("bytes", json!(this.read));
                this.record.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return this.fail(
                        Error::HttpResponseTimeout,
                        "the response did not finish within http_timeout".into(),
                    );
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for BoundedBody {
    fn drop(&mut self) {
        self.record.set("bytes", json!(self.read));
        self.record.finish(None);
    }
}

#[cfg(test)]
mod tests {
    /// A guest's extension method is kept to a line's worth in the trail
    /// and the log (5 MB methods made 500 MB of events).
    #[test]
    fn a_long_method_is_cut_in_the_trail() {
        let shown = super::trail_method(&"X".repeat(5_000_000));
        assert_eq!(shown, format!("{}…", "X".repeat(32)));
        assert_eq!(super::trail_method("PATCH"), "PATCH");
    }
}
