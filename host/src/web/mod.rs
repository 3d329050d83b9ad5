//! The web side of Colony: a dashboard of server-rendered pages, a JSON API
//! in the CLI's `--json` shapes, and Prometheus metrics, served by
//! `colony serve` or by a daemon started with `--http`. It reads the same
//! database as the daemons and is not a worker: every change it makes is a
//! queue operation, the same transition the CLI would make, audited with
//! the signed-in operator as actor.
//!
//! - [`auth`]: who is asking; tokens, sessions, CSRF.
//! - [`api`]: `/api/...`, JSON.
//! - [`pages`]: `/`, `/tasks`, `/tasks/{id}`, `/review`, `/agents`, `/login`.
//! - [`metrics`]: `/metrics`, and the overview's last hour.
//! - [`store`]: connections to the queue, lent to one request at a time.

pub mod api;
pub mod auth;
mod connections;
pub mod metrics;
pub mod pages;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::queue::QueueError;
use crate::runtime::{AgentDir, Runtime};
use auth::{Auth, Caller};
use metrics::Metrics;
use store::Store;

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// What a web server needs.
pub struct WebConfig {
    pub listen: SocketAddr,
    /// The operator's token; `None` generates one (printed at start).
    pub token: Option<String>,
    pub db: PathBuf,
    /// The agents directory and a runtime to load it with (for `/agents`).
    pub agents: AgentDir,
    pub runtime: Arc<Runtime>,
    /// Who the server acts as in the audit trail when no operator is named.
    pub actor: String,
    /// SQLite's durability for its writes (approvals, submits): `--sync`.
    pub sync: crate::queue::Sync,
}

/// Everything a request handler can reach.
pub struct App {
    pub store: Arc<Store>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub agents: tokio::sync::Mutex<AgentDir>,
    /// The agents folder, readable without the lock (a rescan holds it
    /// while it compiles).
    pub agents_dir: PathBuf,
    pub runtime: Arc<Runtime>,
}

pub type Shared = Arc<App>;

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "refusing to listen on {0} without --token (or COLONY_TOKEN): anyone who can reach that address could read the queue and change it"
    )]
    NoTokenOffLoopback(SocketAddr),
    // Not a `#[source]`: the message carries it, and `{:#}` would repeat it.
    #[error("cannot listen on {addr}: {}", bind_error(*addr, error))]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Why a port could not be taken, with what to do about the usual causes.
fn bind_error(addr: SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "{error}: another process (another `colony serve`, or a daemon's --http) holds that port; give another with --listen (port 0 picks a free one)"
        ),
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "{error}: ports below 1024 need privileges; give one from 1024 up with --listen"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "{error}: that address is not one of this machine's; 127.0.0.1 (this machine only) or 0.0.0.0 (every interface) are"
        ),
        _ => error.to_string(),
    }
}

/// A bound server, not yet serving: the caller prints where it is.
pub struct Bound {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    /// The token changes need (generated when none was given).
    pub token: String,
    /// Whether the token was generated here (and should be printed).
    pub generated_token: bool,
    app: Shared,
}

/// Takes the listening socket: first, so that a port already taken fails
/// before the database file is created.
pub async fn listen(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| StartError::Bind { addr, error })
}

/// Opens the database behind a socket taken by [`listen`].
pub async fn bind(config: WebConfig, listener: TcpListener) -> Result<Bound, StartError> {
    let loopback = config.listen.ip().is_loopback();
    if !loopback && config.token.is_none() {
        return Err(StartError::NoTokenOffLoopback(config.listen));
    }
    let generated_token = config.token.is_none();
    let token = config.token.unwrap_or_else(auth::random_token);
    let store = Store::open(config.db, config.actor, config.sync)?;
    let addr = listener.local_addr().map_err(|error| StartError::Bind {
        addr: config.listen,
        error,
    })?;
    let app = Arc::new(App {
        store,
        auth: Auth::new(token.clone(), loopback, addr.port()),
        metrics: Metrics::new(),
        agents_dir: config.agents.dir().to_path_buf(),
        agents: tokio::sync::Mutex::new(config.agents),
        runtime: config.runtime,
    });
    Ok(Bound {
        listener,
        addr,
        token,
        generated_token,
        app,
    })
}

impl Bound {
    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let tailer = tokio::spawn(keep_metrics_current(self.app.clone()));
        // Outside the router, so that it sees what routing adds (a 405's
        // `Allow` header) and what no route answers.
        let app = Router::new()
            .fallback_service(router(self.app))
            .layer(middleware::from_fn(api::json_errors));
        let result = axum::serve(connections::Bounded::new(self.listener), app)
            .with_graceful_shutdown(shutdown)
            .await;
        tailer.abort();
        result
    }
}

/// Reads the audit trail every few seconds, so the overview's chart is
/// current without a scrape.
async fn keep_metrics_current(app: Shared) {
    loop {
        let tail = app.clone();
        if let Err(e) = app
            .store
            .run(None, move |queue| tail.metrics.catch_up(queue))
            .await
        {
            tracing::warn!("reading the audit trail for the dashboard: {e}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .merge(pages::routes())
        .merge(api::routes())
        .route("/metrics", get(metrics_page))
        .route("/static/app.css", get(stylesheet))
        .route("/static/app.js", get(script))
        .route("/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

/// Checks the Host header and who is asking before any handler runs;
/// hands the handler the [`Caller`].
async fn guard(State(app): State<Shared>, mut request: Request, next: Next) -> Response {
    if app.auth.reads_open {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !auth::is_loopback_host(host) {
            return (
                StatusCode::FORBIDDEN,
                format!("this dashboard listens on loopback and answers only to localhost or a loopback address (127.0.0.1, [::1]), not Host: {host:?}"),
            )
                .into_response();
        }
    }
    let path = request.uri().path();
    let public = path == "/login" || path.starts_with("/static/") || path == "/healthz";
    let caller = match app.auth.caller(request.headers()) {
        Ok(caller) => caller,
        Err(denied) if public => {
            let _ = denied;
            Caller::Anonymous
        }
        Err(denied) => return api::denied(&denied),
    };
    if !app.auth.reads_open && matches!(caller, Caller::Anonymous) && !public {
        if path.starts_with("/api/") || path == "/metrics" {
            return api::denied(&auth::Denied::Missing);
        }
        return pages::to_sign_in(request.uri());
    }
    // A change (a POST: other methods change nothing, and get their 405)
    // asked anonymously is refused before its body is read: the form or
    // JSON reader answered it first (415 in plain text for a form with no
    // content type), not 401.
    if request.method() == Method::POST && !public && matches!(caller, Caller::Anonymous) {
        let denied = auth::Denied::Missing;
        if path.starts_with("/api/") {
            return api::denied(&denied);
        }
        return pages::PageError::from(api::ApiError::from(denied)).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Headers every answer carries: no framing by other sites, no guessing
/// of content types, and scripts only from this server (an agent's
/// `<script>` that slipped through escaping would still not run).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn metrics_page(State(app): State<Shared>) -> Response {
    let metrics_app = app.clone();
    match app
        .store
        .run(None, move |queue| {
            let grants = model_grants(&metrics_app.agents_dir, &metrics_app.runtime);
            metrics_app.metrics.start_grants_at_zero(&grants);
            metrics_app.metrics.render(queue)
        })
        .await
    {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => api::ApiError::from(e).into_response(),
    }
}

/// The model aliases the manifests in the agents folder grant (beside a
/// component) that this host's configuration declares. Manifests are read
/// as they are now, without compiling anything; one that does not load
/// grants nothing here (the agents page says why).
fn model_grants(agents_dir: &std::path::Path, runtime: &Runtime) -> Vec<metrics::ModelGrant> {
    let Ok(read) = std::fs::read_dir(agents_dir) else {
        return Vec::new();
    };
    let mut grants = Vec::new();
    for path in read.flatten().map(|entry| entry.path()) {
        if path.extension().is_none_or(|ext| ext != "toml")
            || !path.with_extension("wasm").is_file()
        {
            continue;
        }
        let (Some(agent), Ok(manifest)) = (
            path.file_stem().and_then(|stem| stem.to_str()),
            crate::runtime::Manifest::load(&path),
        ) else {
            continue;
        };
        for alias in manifest.models.unwrap_or_default() {
            if let Some(priced) = runtime.model_priced(&alias) {
                grants.push(metrics::ModelGrant {
                    agent: agent.to_string(),
                    alias,
                    priced,
                });
            }
        }
    }
    grants
}

/// "ok" when the database answers a read (and, on SQLite, its file is the
/// one opened); else 503. Why goes to the log, not to the anonymous caller
/// (it names paths and servers).
async fn healthz(State(app): State<Shared>) -> Response {
    let checked = app
        .store
        .run(None, |queue| {
            queue.check_database_file()?;
            queue.last_event_id().map(drop)
        })
        .await;
    match checked {
        Ok(()) => "ok".into_response(),
        Err(e) => {
            tracing::warn!("health check failed: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database cannot be used: see the server's log",
            )
                .into_response()
        }
    }
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("static/app.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/app.js"),
    )
        .into_response()
}
