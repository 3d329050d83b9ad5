//! The outbox (issue 12): effects queued with `send-after-commit` are stored
//! with the task's completion and delivered at least once, with a stable
//! idempotency key, to a real loopback server — and never for a run that did
//! not complete or a review that was rejected.

mod common;

use colony::task::{NewTask, State};
use colony_tests::agents_dir_with;
use colony_tests::model_server::ModelServer;
use common::Harness;
use serde_json::{Value, json};

/// The `stateful` fixture, granted the server's origin (effects use the
/// outbound-HTTP allow-list).
fn harness(server: &ModelServer) -> Harness {
    let agents = agents_dir_with(&["stateful"]);
    let manifest = format!("allowed_hosts = [{:?}]\n", server.url());
    std::fs::write(agents.path().join("stateful.toml"), manifest).unwrap();
    Harness::with_shared_cache(agents)
}

fn submit(h: &Harness, script: Value, max_attempts: u32) -> i64 {
    let mut task = NewTask::new("stateful", script.to_string());
    task.max_attempts = max_attempts;
    task.backoff_ms = 1;
    h.submit(task)
}

fn effect(server: &ModelServer, path: &str, body: &str) -> Value {
    json!(["effect", "POST", format!("{}{path}", server.url()), body])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_tasks_effects_are_sent_once_with_their_idempotency_keys() {
    let server = ModelServer::start();
    let h = harness(&server);
    let id = submit(
        &h,
        json!({"ops": [effect(&server, "/mail", r#"{"to":"a"}"#), effect(&server, "/pay", r#"{"cents":5}"#)]}),
        1,
    );
    h.run_until_idle().await;
    assert_eq!(h.task(id).result.unwrap()["reads"], json!([1, 2]));
    // Effects are delivered concurrently: sort them by their key.
    let mut requests = server.requests();
    requests.sort_by_key(|r| r.header("idempotency-key").map(str::to_string));
    assert_eq!(requests.len(), 2);
    let key = |i: usize| requests[i].header("idempotency-key").unwrap().to_string();
    assert_eq!(
        (key(0), key(1)),
        (format!("colony-{id}-1"), format!("colony-{id}-2"))
    );
    assert_eq!(requests[0].path, "/mail");
    assert_eq!(requests[0].body, json!({"to": "a"}));
    assert_eq!(requests[1].header("content-type"), Some("application/json"));
    let rows = h.queue().effects(Some(id), None, 10).unwrap();
    assert!(
        rows.iter()
            .all(|r| r.state == "sent" && r.attempts == 1 && r.status == Some(200)),
        "{rows:?}"
    );
    assert_eq!(h.events(id, "effect_sent").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_does_not_complete_sends_nothing() {
    let server = ModelServer::start();
    let h = harness(&server);
    let failed = submit(
        &h,
        json!({"ops": [effect(&server, "/a", "1")], "end": "retryable"}),
        2,
    );
    let trapped = submit(
        &h,
        json!({"ops": [effect(&server, "/b", "1")], "end": "trap"}),
        1,
    );
    h.run_until_idle().await;
    assert_eq!(h.task(failed).state, State::Failed);
    assert_eq!(h.task(trapped).state, State::Failed);
    assert_eq!(server.count(), 0);
    assert!(h.queue().effects(None, None, 10).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_shows_proposed_effects_rejection_sends_nothing_approval_sends_them() {
    let server = ModelServer::start();
    let h = harness(&server);
    let approved = submit(
        &h,
        json!({"ops": [effect(&server, "/yes", "approved body")], "review": true}),
        1,
    );
    let rejected = submit(
        &h,
        json!({"ops": [effect(&server, "/no", "rejected body")], "review": true}),
        1,
    );
    h.run_until_idle().await;
    let mut q = h.queue();
    let proposed = q.effects(Some(approved), None, 10).unwrap();
    assert_eq!(proposed.len(), 1);
    assert_eq!(proposed[0].state, "proposed");
    assert_eq!(
        proposed[0].body_head(),
        Some(("approved body".to_string(), 0))
    );
    assert_eq!(server.count(), 0, "nothing is sent while in review");

    q.reject(rejected, "no").unwrap();
    assert!(q.effects(Some(rejected), None, 10).unwrap().is_empty());
    q.approve(approved, None).unwrap();
    // The rejected task runs again and waits for review; its new proposal is
    // not sent either.
    h.run_until_idle().await;
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/yes"]);
    assert_eq!(h.task(rejected).state, State::Review);
}

/// Only an agent's daemon can send its effects (its allow-list and
/// secrets): a daemon without the agent neither claims them nor counts
/// them as due (it tried a claim transaction every watch tick), and leaves
/// them pending for a daemon that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_of_an_agent_not_loaded_here_is_left_for_its_daemon() {
    let server = ModelServer::start();
    let h = harness(&server);
    let id = submit(
        &h,
        json!({"ops": [effect(&server, "/later", "x")], "review": true}),
        1,
    );
    h.run_until_idle().await;
    let mut q = h.queue();
    q.approve(id, None).unwrap();
    let stateful = ["stateful".to_string()];
    assert!(q.next_effect_due(&stateful).unwrap().is_some());
    std::fs::remove_file(h.agents.path().join("stateful.wasm")).unwrap();
    assert_eq!(q.next_effect_due(&[]).unwrap(), None);
    assert_eq!(q.next_effect_due(&["other".to_string()]).unwrap(), None);
    let summary = h.run_until_idle().await;
    assert_eq!(
        summary.effects_left_for_missing_agents,
        [("stateful".to_string(), 1)]
    );
    let row = &q.effects(Some(id), None, 10).unwrap()[0];
    assert_eq!(
        (row.state.as_str(), row.attempts),
        ("pending", 0),
        "{row:?}"
    );
    assert_eq!(server.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failing_three_times_gets_the_effect_on_the_fourth_try() {
    let server = ModelServer::start();
    let h = harness(&server);
    for _ in 0..3 {
        server.push_plain(503);
    }
    let id = submit(&h, json!({"ops": [effect(&server, "/flaky", "x")]}), 1);
    h.run_until_idle().await;
    let rows = h.queue().effects(Some(id), None, 10).unwrap();
    assert_eq!(
        (rows[0].state.as_str(), rows[0].attempts, rows[0].status),
        ("sent", 4, Some(200))
    );
    let keys: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(
        keys,
        vec![format!("colony-{id}-1"); 4],
        "every attempt carries the same key"
    );
    assert_eq!(h.events(id, "effect_failed").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_that_keeps_failing_is_marked_failed_and_can_be_retried() {
    let server = ModelServer::start();
    let h = harness(&server);
    for _ in 0..5 {
        server.push_plain(500);
    }
    let id = submit(&h, json!({"ops": [effect(&server, "/down", "x")]}), 1);
    h.run_until_idle().await;
    let mut q = h.queue();
    let row = q.effects(Some(id), None, 10).unwrap().remove(0);
    assert_eq!(
        (row.state.as_str(), row.attempts, row.error.as_deref()),
        ("failed", 5, Some("HTTP 500"))
    );
    assert_eq!(h.task(id).state, State::Complete, "the task stays complete");
    let err = q.retry_effect(id + 1_000).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    q.retry_effect(row.id).unwrap();
    h.run_until_idle().await;
    assert_eq!(
        h.queue().effects(Some(id), None, 10).unwrap()[0].state,
        "sent"
    );
    assert_eq!(server.count(), 6);
}

/// A bug that panics the sending of an effect costs that attempt, recorded
/// as its failure, and nothing more: the effect
/// is sent on its next try and the daemon goes idle (the panicked delivery
/// held its sending slot for good, and the daemon never went idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_panics_is_a_failed_attempt_retried() {
    let server = ModelServer::start();
    let h = harness(&server);
    let id = submit(&h, json!({"ops": [effect(&server, "/once", "x")]}), 1);
    let cfg = colony::orchestrator::DaemonConfig {
        panicking_deliveries: 1,
        ..common::Harness::until_idle()
    };
    h.run_until_idle_with(h.runtime(), cfg).await;
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("sent", 2), "{row:?}");
    assert_eq!(server.count(), 1, "the panicked attempt sent nothing");
    let failed = h.events(id, "effect_failed");
    assert_eq!(failed.len(), 1);
    // What the panic said stays in the log: it is text nobody vetted.
    let error = failed[0].detail["error"].as_str().unwrap_or_default();
    assert_eq!(
        error, "the host failed while sending (a bug; the daemon's log says more)",
        "{:?}",
        failed[0].detail
    );
}

/// An agent's manifest sets how often its effects are tried (the default
/// 5 span ~8 s; up to 20, two hours): with `effect_attempts = 2`, two
/// failures fail the effect, where the default would have tried a third
/// time; the number is stored with each effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_manifest_sets_its_effects_attempts() {
    let server = ModelServer::start();
    let agents = agents_dir_with(&["stateful"]);
    let manifest = format!(
        "allowed_hosts = [{:?}]\neffect_attempts = 2\n",
        server.url()
    );
    std::fs::write(agents.path().join("stateful.toml"), manifest).unwrap();
    let h = Harness::with_shared_cache(agents);
    for _ in 0..2 {
        server.push_plain(503);
    }
    let id = submit(&h, json!({"ops": [effect(&server, "/flaky", "x")]}), 1);
    h.run_until_idle().await;
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 2), "{row:?}");
    assert_eq!(server.count(), 2);

    // Out of range: the agent is not loaded, and the reason names the key.
    let agents = agents_dir_with(&["stateful"]);
    std::fs::write(agents.path().join("stateful.toml"), "effect_attempts = 0\n").unwrap();
    let mut dir = colony::runtime::AgentDir::new(agents.path());
    let report = dir.rescan(&h.runtime()).await;
    let (name, why) = &report.broken[0];
    assert_eq!(name, "stateful");
    assert!(
        why.contains("effect_attempts") && why.contains("outside 1..=20"),
        "{why}"
    );
}

/// An effect that cannot connect says why (the connection refused, the
/// receiver's certificate not trusted, a name not found): it was recorded
/// as "could not connect" alone, the cause only in the daemon's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_that_cannot_connect_says_why() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let agents = agents_dir_with(&["stateful"]);
    let manifest = format!("allowed_hosts = [{closed:?}]\neffect_attempts = 1\n");
    std::fs::write(agents.path().join("stateful.toml"), manifest).unwrap();
    let h = Harness::with_shared_cache(agents);
    let url = format!("{closed}/down");
    let id = submit(&h, json!({"ops": [["effect", "POST", url, "1"]]}), 1);
    h.run_until_idle().await;
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1), "{row:?}");
    let error = row.error.unwrap_or_default();
    assert!(
        error.starts_with("could not connect: ") && error.to_lowercase().contains("refused"),
        "{error}"
    );
}

/// A guest refused in a loop cannot fill the trail: 200 calls are checked
/// and recorded, the 201st says the limit, later ones are refused unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_effects_in_a_loop_are_recorded_up_to_a_limit() {
    let server = ModelServer::start();
    let h = harness(&server);
    let ops: Vec<Value> = (0..300)
        .map(|i| {
            json!([
                "effect",
                "POST",
                format!("http://127.0.0.1:1/not-granted/{i}"),
                "x"
            ])
        })
        .collect();
    let id = submit(&h, json!({"ops": ops}), 1);
    h.run_until_idle().await;
    let reads = h.task(id).result.unwrap()["reads"].clone();
    let errors: Vec<&str> = reads
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 300);
    assert!(errors[199].contains("allowed_hosts"), "{}", errors[199]);
    assert!(errors[200].contains("at most 200 times"), "{}", errors[200]);
    assert!(errors[299].contains("at most 200 times"), "{}", errors[299]);
    assert_eq!(h.events(id, "effect_refused").len(), 201);
}

/// A receiver that refuses the request itself (a 4xx, a redirect) would
/// refuse it again: the effect fails at its first attempt. A conflict (409,
/// what idempotency-keyed APIs answer while the first request with the key
/// is still in progress) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_the_receiver_refuses_fails_at_once_and_a_conflict_is_retried() {
    let server = ModelServer::start();
    let h = harness(&server);
    server.push_plain(404);
    let refused = submit(&h, json!({"ops": [effect(&server, "/gone", "x")]}), 1);
    h.run_until_idle().await;
    server.push_plain(409);
    let conflicted = submit(&h, json!({"ops": [effect(&server, "/busy", "x")]}), 1);
    h.run_until_idle().await;
    let q = h.queue();
    let row = q.effects(Some(refused), None, 10).unwrap().remove(0);
    assert_eq!(
        (row.state.as_str(), row.attempts, row.error.as_deref()),
        ("failed", 1, Some("HTTP 404, refused by the receiver"))
    );
    let row = q.effects(Some(conflicted), None, 10).unwrap().remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("sent", 2), "{row:?}");
    assert_eq!(server.count(), 3);
}

/// Granted by name, a name that resolves to a loopback address is refused
/// when the effect is sent, as a run's own request to it would be: DNS
/// cannot point a granted name at the host's own services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_to_a_name_that_resolves_to_loopback_is_refused_at_delivery() {
    let server = ModelServer::start();
    let by_name = server.url().replace("127.0.0.1", "localhost");
    let agents = agents_dir_with(&["stateful"]);
    let manifest = format!("allowed_hosts = [{by_name:?}]\n");
    std::fs::write(agents.path().join("stateful.toml"), manifest).unwrap();
    let h = Harness::with_shared_cache(agents);
    let url = format!("{by_name}/internal");
    let id = submit(&h, json!({"ops": [["effect", "POST", url, "1"]]}), 1);
    h.run_until_idle().await;
    assert_eq!(h.task(id).state, State::Complete);
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    // A refusal is final: no retry can make the address public.
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1), "{row:?}");
    let error = row.error.unwrap_or_default();
    assert!(
        error.contains("refused: localhost resolved to") && error.contains("(loopback)"),
        "{error}"
    );
    assert_eq!(server.count(), 0, "nothing reached the loopback server");
    let failed = h.events(id, "effect_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].detail["refused"], json!(true), "{:?}", failed[0]);
}

/// An effect approved after its agent's grant was withdrawn is refused by
/// the deliverer, which checks the manifest again, and fails at once rather
/// than being retried against a policy that cannot change by waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_whose_grant_was_withdrawn_fails_at_its_first_attempt() {
    let server = ModelServer::start();
    let h = harness(&server);
    let id = submit(
        &h,
        json!({"ops": [effect(&server, "/publish", "1")], "review": true}),
        1,
    );
    h.run_until_idle().await;
    assert_eq!(h.task(id).state, State::Review);
    let manifest = h.agents.path().join("stateful.toml");
    std::fs::write(&manifest, "allowed_hosts = []\n").unwrap();
    h.queue().approve(id, None).unwrap();
    h.run_until_idle().await;
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1), "{row:?}");
    let error = row.error.unwrap_or_default();
    assert!(error.starts_with("no longer allowed: "), "{error}");
    assert_eq!(server.count(), 0);
    assert_eq!(h.task(id).state, State::Complete, "the task stays complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_ungranted_effect_is_refused_to_the_agent_and_not_queued() {
    let server = ModelServer::start();
    let h = harness(&server);
    let id = submit(
        &h,
        json!({"ops": [
            ["effect", "BREW", "http://127.0.0.1:1/x", "1"],
            ["effect", "POST", "ftp://x/y", "1"],
            ["effect", "POST", "http://127.0.0.1:1/not-granted", "1"],
            ["effect", "POST", "http://svc:hunter2@127.0.0.1:1/x?api_key=QSECRET", "1"]
        ]}),
        1,
    );
    h.run_until_idle().await;
    let reads = h.task(id).result.unwrap()["reads"].clone();
    assert!(
        reads[0]["error"]
            .as_str()
            .unwrap()
            .contains("\"BREW\" is not one of"),
        "{reads}"
    );
    assert!(
        reads[1]["error"]
            .as_str()
            .unwrap()
            .contains("the URL's scheme is \"ftp\": only http:// and https:// URLs are sent"),
        "{reads}"
    );
    assert!(h.queue().effects(Some(id), None, 10).unwrap().is_empty());
    // Each refusal is recorded as a refused request is: an event (method,
    // origin, path and why; not the query) and a line in the task log.
    let refused = h.events(id, "effect_refused");
    assert_eq!(refused.len(), 4, "{refused:?}");
    // A password or query string in a refused URL reaches neither the
    // trail nor the log.
    let why = refused[3].detail["refused"].as_str().unwrap_or_default();
    assert!(why.contains("user information"), "{why}");
    for secret in ["hunter2", "QSECRET"] {
        assert!(
            !refused[3].detail.to_string().contains(secret),
            "{:?}",
            refused[3].detail
        );
        assert!(!h.log(id).contains(secret), "{}", h.log(id));
    }
    assert_eq!(refused[0].detail["method"], "BREW");
    assert_eq!(refused[2].detail["origin"], "http://127.0.0.1:1");
    assert_eq!(refused[2].detail["path"], "/not-granted");
    assert!(
        refused[2].detail["refused"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed_hosts"),
        "{refused:?}"
    );
    let log = h.log(id);
    assert!(
        log.contains("effects: POST http://127.0.0.1:1/not-granted refused:"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_adds_the_agents_secret_and_drops_the_agents_own_header_of_that_name() {
    const VAR: &str = "TEST_EFFECTS_TOKEN_FOR_COLONY";
    // SAFETY: set once, before any thread of this test reads the environment;
    // no other test in this binary uses this variable.
    unsafe { std::env::set_var(VAR, "effects-secret") };
    let server = ModelServer::start();
    let h = harness(&server);
    let manifest = format!(
        "allowed_hosts = [{origin:?}]\n[secrets.{origin:?}]\nheader = \"Authorization\"\nenv = \"{VAR}\"\nprefix = \"Bearer \"\n",
        origin = server.url()
    );
    std::fs::write(h.agents.path().join("stateful.toml"), manifest).unwrap();
    let forged = json!({"ops": [["effect", "POST", format!("{}/pay", server.url()), "{}", {"Authorization": "Bearer forged", "X-Trace": "t1"}]]});
    let id = submit(&h, forged, 1);
    h.run_until_idle().await;
    assert_eq!(
        h.queue().effects(Some(id), None, 10).unwrap()[0].state,
        "sent"
    );
    let request = server.last_request();
    assert_eq!(
        request.header("authorization"),
        Some("Bearer effects-secret")
    );
    assert_eq!(
        request.header("x-trace"),
        Some("t1"),
        "other headers of the agent's pass"
    );
    let stored = format!(
        "{:?}{}",
        h.queue().effects(Some(id), None, 10).unwrap(),
        h.log(id)
    );
    assert!(
        !stored.contains("effects-secret"),
        "the secret is stored nowhere: {stored}"
    );
    // Nor the agent's header the secret replaced: a reviewer shown it would
    // approve a value that never went out.
    let headers = &h.queue().effects(Some(id), None, 10).unwrap()[0].headers;
    assert!(
        !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("authorization")),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("X-Trace".to_string(), "t1".to_string())),
        "{headers:?}"
    );
}

/// A daemon that stops while a receiver has not answered gives the effect
/// back when its grace runs out, due at once and its attempt not counted,
/// instead of leaving it `sending` until its claim runs out (twice
/// --effect-timeout), and says so on the trail and in its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_unanswered_at_shutdown_is_given_back() {
    use colony::orchestrator::DaemonConfig;
    use std::time::Duration;
    // A receiver that takes the connection and never answers; it says
    // when the sender hangs up.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", silent.local_addr().unwrap());
    let (hung_up, hang_ups) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for stream in silent.incoming() {
            let Ok(mut stream) = stream else { return };
            let hung_up = hung_up.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buffer = [0u8; 4096];
                while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
                let _ = hung_up.send(());
            });
        }
    });
    let agents = agents_dir_with(&["stateful"]);
    std::fs::write(
        agents.path().join("stateful.toml"),
        format!("allowed_hosts = [{origin:?}]\n"),
    )
    .unwrap();
    let h = Harness::with_shared_cache(agents);
    let id = submit(
        &h,
        json!({"ops": [["effect", "POST", format!("{origin}/slow"), "1"]]}),
        1,
    );

    let cfg = DaemonConfig {
        poll: Duration::from_millis(50),
        heartbeat: Duration::from_millis(100),
        grace: Duration::from_millis(300),
        ..DaemonConfig::default()
    };
    let daemon = h.start_daemon(h.runtime(), cfg).await;
    common::wait_for("the effect's sending", || {
        let effects = h.queue().effects(Some(id), None, 10).unwrap();
        effects.first().is_some_and(|e| e.state == "sending")
    })
    .await;
    let summary = daemon.stop().await;
    assert_eq!(summary.effects_released, 1);
    // Its request was cut off before it was given back: the next daemon's
    // send is not made beside it (it stayed open, the sender running on).
    assert!(
        hang_ups.recv_timeout(Duration::from_secs(3)).is_ok(),
        "the request given back was still open"
    );
    let effect = &h.queue().effects(Some(id), None, 10).unwrap()[0];
    assert_eq!(
        (effect.state.as_str(), effect.attempts),
        ("pending", 0),
        "{effect:?}"
    );
    let released = h.events(id, "effect_released");
    assert_eq!(released.len(), 1);
    assert!(
        released[0].detail["why"]
            .as_str()
            .unwrap()
            .contains("same idempotency key")
    );
}

/// A receiver that closes the connection without answering: the attempt's
/// error says so (it said only "error sending request").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_closing_the_connection_is_named_in_the_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            // Read the request's first bytes, then hang up without a word.
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1024]);
        }
    });
    let agents = agents_dir_with(&["stateful"]);
    let manifest = format!("allowed_hosts = [{origin:?}]\neffect_attempts = 1\n");
    std::fs::write(agents.path().join("stateful.toml"), manifest).unwrap();
    let h = Harness::with_shared_cache(agents);
    let op = json!(["effect", "POST", format!("{origin}/hangs-up"), "x"]);
    let id = submit(&h, json!({"ops": [op]}), 1);
    h.run_until_idle().await;
    let row = h.queue().effects(Some(id), None, 10).unwrap().remove(0);
    let error = row.error.clone().unwrap_or_default();
    assert_eq!(row.state, "failed", "{row:?}");
    assert!(
        error.starts_with("request failed: error sending request: ") && error.contains("closed"),
        "{error}"
    );
}
