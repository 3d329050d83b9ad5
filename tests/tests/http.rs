//! Outbound HTTP through the host (issue 12): the `fetcher` fixture makes
//! real `wasi:http/outgoing-handler` requests through the real runtime and
//! daemon to loopback servers started here. Nothing leaves the machine.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use colony::runtime::AgentStatus;
use colony::task::{NewTask, State};
use colony_tests::agents_dir_with;
use common::Harness;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The secret the manifests below hand to the host through the environment.
const TOKEN_VAR: &str = "TEST_HTTP_TOKEN_FOR_COLONY";
const TOKEN: &str = "tok-7f3a9c1e";

/// Sets the secret's variable once, before any test of this binary reads
/// the environment (each test calls this first).
fn set_token() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: every test calls this before it starts anything that reads the
    // environment, and `Once` makes the write happen before any of them goes on.
    ONCE.call_once(|| unsafe { std::env::set_var(TOKEN_VAR, TOKEN) });
}

/// One request as a test server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct Log {
    connections: usize,
    requests: Vec<Seen>,
}

/// A loopback HTTP/1 server on its own thread. Routes: `/big` answers
/// 1 MiB, `/redirect?to=URL` answers 302 to URL, `/hang` waits 30 s and
/// `/gate` until the test opens it ([`Server::open_gate`]; a request is
/// logged once it answers), anything else 200 `hello`.
struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    gate: Arc<std::sync::atomic::AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let served = log.clone();
        let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate_seen = gate.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                    };
                    served.lock().unwrap().connections += 1;
                    let log = served.clone();
                    let gate = gate_seen.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (log, gate) = (log.clone(), gate.clone());
                            async move {
                                let pause = std::time::Duration::from_millis(10);
                                match req.uri().path() {
                                    "/hang" => tokio::time::sleep(pause * 3000).await,
                                    "/gate" => {
                                        while !gate.load(std::sync::atomic::Ordering::SeqCst) {
                                            tokio::time::sleep(pause).await;
                                        }
                                    }
                                    _ => {}
                                }
                                Ok::<_, Infallible>(answer(req, &log))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Server {
            addr,
            log,
            gate,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Lets requests waiting at `/gate` (and later ones) be answered.
    fn open_gate(&self) {
        self.gate.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().requests.clone()
    }

    fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(req: Request<Incoming>, log: &Mutex<Log>) -> Response<Full<Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    log.lock().unwrap().requests.push(Seen {
        method: req.method().to_string(),
        target: target.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
    });
    if req.uri().path() == "/big" {
        return Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20])));
    }
    if let Some(to) = target.strip_prefix("/redirect?to=") {
        return Response::builder()
            .status(302)
            .header("location", to)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// A harness with the `fetcher` fixture and this manifest for it.
fn harness(manifest: &str) -> Harness {
    set_token();
    let h = Harness::with_shared_cache(agents_dir_with(&["fetcher"]));
    std::fs::write(h.agents.path().join("fetcher.toml"), manifest).unwrap();
    h
}

/// Runs one `fetcher` task with these requests; returns its id and output.
async fn fetch(h: &Harness, requests: Value) -> (i64, Value) {
    let mut task = NewTask::new("fetcher", json!({ "requests": requests }).to_string());
    task.max_attempts = 1;
    let id = h.submit(task);
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        task.state,
        State::Complete,
        "{:?}\n{}",
        task.error,
        h.log(id)
    );
    (id, task.result.unwrap())
}

fn denied(result: &Value) -> bool {
    result["error"] == "ErrorCode::HttpRequestDenied"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_origin_is_reached_and_the_request_is_recorded() {
    let server = Server::start();
    let h = harness(&format!("allowed_hosts = [{:?}]\n", server.origin()));
    let (id, out) = fetch(
        &h,
        json!([{"url": server.url("/ok?page=2"), "method": "POST", "headers": [["x-mine", "1"]], "body": "ping"}]),
    )
    .await;
    let result = &out["results"][0];
    assert_eq!(result["status"], 200, "{out}");
    assert_eq!(result["body"], "hello");
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].target, "/ok?page=2",
        "origin-form target, query kept"
    );
    assert_eq!(seen[0].header("x-mine"), ["1"]);
    assert_eq!(
        seen[0].header("host"),
        [server.addr.to_string().as_str()],
        "the host sets Host from the URL"
    );

    let events = h.events(id, "http_request");
    assert_eq!(events.len(), 1, "{events:?}");
    let detail = &events[0].detail;
    assert_eq!(detail["method"], "POST");
    assert_eq!(detail["origin"], server.origin());
    assert_eq!(detail["path"], "/ok");
    assert_eq!(detail["status"], 200);
    assert_eq!(detail["bytes"], 5);
    assert!(detail["ms"].is_u64(), "{detail}");
    assert!(!detail.to_string().contains("page=2"), "no query string");
}

/// The trail keeps a line's worth of a request's path: a guest building
/// 60 KB paths stored 60 KB events, a hundred per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_path_is_cut_on_the_trail() {
    let server = Server::start();
    let h = harness(&format!("allowed_hosts = [{:?}]\n", server.origin()));
    let long = format!("/{}", "a".repeat(10_000));
    let (id, _) = fetch(&h, json!([{"url": server.url(&long)}])).await;
    assert_eq!(server.seen()[0].target, long, "sent whole");
    let events = h.events(id, "http_request");
    let path = events[0].detail["path"].as_str().unwrap();
    assert!(path.len() <= 260 && path.ends_with('…'), "{path}");
    assert!(long.starts_with(path.trim_end_matches('…')), "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grant_or_outside_it_nothing_is_sent() {
    let granted = Server::start();
    let other = Server::start();
    // No manifest key at all: deny everything.
    let h = harness("");
    let (id, out) = fetch(&h, json!([{"url": granted.url("/")}])).await;
    assert!(denied(&out["results"][0]), "{out}");
    assert_eq!(granted.connections(), 0, "refused before connecting");
    let events = h.events(id, "http_request");
    assert!(
        events[0].detail["refused"]
            .as_str()
            .unwrap()
            .contains("no allowed_hosts"),
        "{events:?}"
    );

    // Granted one origin: another port on the same address is refused.
    let h = harness(&format!("allowed_hosts = [{:?}]\n", granted.origin()));
    let (id, out) = fetch(
        &h,
        json!([{"url": other.url("/x?secret=1")}, {"url": granted.url("/")}, {"url": format!("https://{}/", granted.addr)}]),
    )
    .await;
    assert!(denied(&out["results"][0]), "{out}");
    assert_eq!(out["results"][1]["status"], 200, "{out}");
    assert!(denied(&out["results"][2]), "another scheme: {out}");
    assert_eq!(other.connections(), 0, "the denied origin saw nothing");
    let events = h.events(id, "http_request");
    assert_eq!(events.len(), 3);
    let refused = events[0].detail["refused"].as_str().unwrap();
    assert!(refused.contains(&other.origin()), "{refused}");
    assert_eq!(events[0].detail["path"], "/x");
    assert!(!events[0].detail.to_string().contains("secret=1"));
    assert!(h.log(id).contains("refused"), "{}", h.log(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_refused_unless_the_address_is_granted_literally() {
    let server = Server::start();
    let port = server.addr.port();
    let h = harness(&format!("allowed_hosts = [\"http://localhost:{port}\"]\n"));
    let (id, out) = fetch(&h, json!([{"url": format!("http://localhost:{port}/")}])).await;
    assert!(denied(&out["results"][0]), "{out}");
    assert_eq!(server.connections(), 0, "the host never connected");
    let events = h.events(id, "http_request");
    let refused = events[0].detail["refused"].as_str().unwrap();
    assert!(
        refused.contains("localhost resolved to") && refused.contains("loopback"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_their_target_is_checked_again() {
    let granted = Server::start();
    let other = Server::start();
    let h = harness(&format!("allowed_hosts = [{:?}]\n", granted.origin()));
    let to = other.url("/landing");
    let (id, out) = fetch(
        &h,
        json!([{"url": granted.url(&format!("/redirect?to={to}")), "follow": true}]),
    )
    .await;
    let result = &out["results"][0];
    assert_eq!(result["status"], 302, "the guest sees the redirect: {out}");
    assert!(denied(&result["followed"]), "{out}");
    assert_eq!(other.connections(), 0);
    let events = h.events(id, "http_request");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].detail["status"], 302);
    assert_eq!(events[1].detail["origin"], other.origin());
    assert!(events[1].detail["refused"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_header_is_added_by_the_host_and_never_seen_by_the_guest() {
    let server = Server::start();
    let other = Server::start();
    let h = harness(&format!(
        "allowed_hosts = [{origin:?}, {other:?}]\n\
         [secrets.{origin:?}]\nheader = \"Authorization\"\nenv = \"{TOKEN_VAR}\"\nprefix = \"Bearer \"\n",
        origin = server.origin(),
        other = other.origin(),
    ));
    let (id, out) = fetch(
        &h,
        json!([
            {"url": server.url("/api?key=querysecret"), "headers": [["Authorization", "Bearer forged"], ["x-other", "kept"]]},
            {"url": other.url("/"), "headers": [["Authorization", "mine"]]},
            {"url": server.url("/"), "headers": [["Host", "evil.example.com"]]},
        ]),
    )
    .await;
    assert_eq!(out["results"][0]["status"], 200, "{out}");
    let seen = server.seen();
    assert_eq!(
        seen[0].header("authorization"),
        [format!("Bearer {TOKEN}").as_str()],
        "the host's value, and the guest's dropped"
    );
    assert_eq!(seen[0].header("x-other"), ["kept"]);
    // Another origin gets no secret, and the guest's own header as it was.
    assert_eq!(other.seen()[0].header("authorization"), ["mine"]);
    // The guest cannot set Host.
    assert!(
        out["results"][2]["error"]
            .as_str()
            .unwrap()
            .contains("Forbidden"),
        "{out}"
    );

    // The guest never sees the secret: not in its environment, not in the
    // request's headers, not in anything it reported.
    let text = out.to_string();
    assert!(!text.contains(TOKEN), "{text}");
    assert_eq!(out["env"], json!([]));
    assert_eq!(
        out["results"][0]["sent_headers"],
        json!([["authorization", "Bearer forged"], ["x-other", "kept"]])
    );
    // Nor does the audit trail or the task's log.
    for event in h.events(id, "http_request") {
        let detail = event.detail.to_string();
        assert!(
            !detail.contains(TOKEN)
                && !detail.contains("querysecret")
                && !detail.contains("forged"),
            "{detail}"
        );
    }
    assert!(!h.log(id).contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_variable_reports_the_agent_broken() {
    let h = harness(
        "allowed_hosts = [\"https://api.example.com\"]\n\
         [secrets.\"https://api.example.com\"]\nheader = \"Authorization\"\nenv = \"TEST_HTTP_UNSET_VARIABLE_FOR_COLONY\"\n",
    );
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let entry = agents.entries().next().unwrap();
    let AgentStatus::Broken(reason) = &entry.status else {
        panic!("loaded without its secret");
    };
    for part in [
        "fetcher.toml",
        "https://api.example.com",
        "TEST_HTTP_UNSET_VARIABLE_FOR_COLONY",
    ] {
        assert!(reason.contains(part), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_is_cut_off_with_an_error() {
    let server = Server::start();
    let h = harness(&format!(
        "allowed_hosts = [{:?}]\nhttp_max_response_kb = 8\n",
        server.origin()
    ));
    let (id, out) = fetch(
        &h,
        json!([{"url": server.url("/big")}, {"url": server.url("/small")}]),
    )
    .await;
    let big = &out["results"][0];
    assert_eq!(big["status"], 200, "{out}");
    assert!(big["bytes"].as_u64().unwrap() <= 8 << 10, "{big}");
    assert!(
        big["error"].as_str().unwrap().contains("body size"),
        "the guest sees why: {big}"
    );
    assert_eq!(out["results"][1]["body"], "hello", "the next request works");
    let events = h.events(id, "http_request");
    assert!(
        events[0].detail["error"]
            .as_str()
            .unwrap()
            .contains("8 KiB"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_request_cap_is_enforced() {
    let server = Server::start();
    let h = harness(&format!(
        "allowed_hosts = [{:?}]\nhttp_max_requests = 2\n",
        server.origin()
    ));
    let requests: Vec<Value> = (0..4)
        .map(|i| json!({"url": server.url(&format!("/{i}"))}))
        .collect();
    let (id, out) = fetch(&h, json!(requests)).await;
    let results = out["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 200);
    assert_eq!(results[1]["status"], 200);
    assert!(denied(&results[2]) && denied(&results[3]), "{out}");
    assert_eq!(server.seen().len(), 2);
    let events = h.events(id, "http_request");
    assert_eq!(
        events.len(),
        3,
        "one event says the cap was reached: {events:?}"
    );
    assert!(
        events[2].detail["refused"]
            .as_str()
            .unwrap()
            .contains("http_max_requests")
    );
    assert!(h.log(id).contains("http_max_requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlasts_http_timeout_fails_and_the_run_goes_on() {
    let server = Server::start();
    let h = harness(&format!(
        "allowed_hosts = [{:?}]\nhttp_timeout = \"300ms\"\n",
        server.origin()
    ));
    let started = std::time::Instant::now();
    let (id, out) = fetch(
        &h,
        json!([{"url": server.url("/hang")}, {"url": server.url("/")}]),
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(
        out["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("Timeout"),
        "{out}"
    );
    assert_eq!(out["results"][1]["status"], 200, "{out}");
    let events = h.events(id, "http_request");
    assert!(events[0].detail["error"].is_string(), "{events:?}");
    assert_eq!(events[1].detail["status"], 200);
}

/// A run's request waits while its daemon's heartbeat is held up for
/// nearly `--stale-after` (the database stopped answering without an
/// error): another daemon may take the task over by then, and the request
/// would go out twice. It goes out once a heartbeat goes through. Before,
/// runs were stopped only when the heartbeat came back with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_while_the_daemons_heartbeat_is_held_up() {
    let server = Server::start();
    let h = harness(&format!("allowed_hosts = [{:?}]\n", server.origin()));
    let mut task = NewTask::new(
        "fetcher",
        json!({"requests": [{"url": server.url("/gate")}, {"url": server.url("/after")}]})
            .to_string(),
    );
    task.max_attempts = 1;
    let id = h.submit(task);
    let cfg = colony::orchestrator::DaemonConfig {
        heartbeat: std::time::Duration::from_millis(200),
        stale_after: std::time::Duration::from_secs(1),
        until_idle: false,
        ..Harness::until_idle()
    };
    let daemon = h.start_daemon(h.runtime(), cfg).await;
    common::wait_for("the first request", || server.connections() > 0).await;

    // Every write waits for this lock (up to the 5 s busy timeout), the
    // heartbeat's too: the daemon's loop is held up in it. Past stale_after
    // less a heartbeat (0.8 s) unrenewed, the second request is asked for.
    let lock = rusqlite::Connection::open(h.db()).unwrap();
    lock.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    server.open_gate();
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    let seen: Vec<String> = server.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        seen,
        ["/gate"],
        "nothing goes out while the lease is in doubt"
    );
    lock.execute_batch("COMMIT").unwrap();

    // Once a heartbeat goes through it goes out (on a machine so loaded
    // that the held heartbeat failed first, from a second run, the first
    // stopped before it sent anything): once either way.
    common::wait_for("the task to complete", || {
        h.task(id).state == State::Complete
    })
    .await;
    daemon.stop().await;
    let seen: Vec<String> = server.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        seen.iter().filter(|t| *t == "/after").count(),
        1,
        "sent once: {seen:?}"
    );
    let out = h.task(id).result.unwrap();
    assert_eq!(out["results"][1]["status"], 200, "{out}");
}
