//! The four store agents (`agents/`: design, code, marketing, ops), as built
//! by `host/build.rs`, run through the real runtime and daemon against a real
//! queue file. Assertions are on what the queue recorded: state, attempts,
//! error kind and message, result, children, audit events and stored logs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use colony::queue::all_readable;
use colony::runtime::RunHooks;
use colony::task::{ClaimedTask, Lease};
use colony::task::{ErrorKind, NewTask, RunOutcome, State};
use serde_json::{Value, json};

/// The store agents, each built to `agents/<name>.wasm` by the host's build script.
const AGENTS: [(&str, &str); 4] = [
    (
        "design",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agents/design.wasm"),
    ),
    (
        "code",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agents/code.wasm"),
    ),
    (
        "marketing",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agents/marketing.wasm"),
    ),
    (
        "ops",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agents/ops.wasm"),
    ),
];

fn agent_path(name: &str) -> PathBuf {
    let (_, path) = AGENTS
        .iter()
        .find(|(known, _)| *known == name)
        .unwrap_or_else(|| panic!("no store agent named {name:?}"));
    PathBuf::from(path)
}

mod common;
use common::Harness;

/// A fresh queue and an agents directory holding copies of all four agents.
fn store() -> Harness {
    let agents = tempfile::tempdir().unwrap();
    for (name, _) in AGENTS {
        let from = agent_path(name);
        let to = agents.path().join(format!("{name}.wasm"));
        std::fs::copy(&from, &to)
            .unwrap_or_else(|e| panic!("copying {} (built by host/build.rs): {e}", from.display()));
    }
    Harness::with_shared_cache(agents)
}

/// Checks on what a store agent's task recorded.
trait StoreChecks {
    fn completed(&self, id: i64) -> Value;
    fn failed_permanently(&self, id: i64, needle: &str);
}

impl StoreChecks for Harness {
    /// Asserts the task completed and returns its result.
    fn completed(&self, id: i64) -> Value {
        let task = self.task(id);
        assert_eq!(
            task.state,
            State::Complete,
            "task {id} ({}) did not complete: {:?}\nlog:\n{}",
            task.agent,
            task.error,
            self.log(id)
        );
        task.result.expect("a completed task has a result")
    }

    /// Asserts the task failed permanently on its first attempt, with a
    /// message containing `needle`, and that the agent logged why it gave up.
    fn failed_permanently(&self, id: i64, needle: &str) {
        let task = self.task(id);
        let error = task
            .error
            .clone()
            .unwrap_or_else(|| panic!("task {id} has no error: {task:?}"));
        assert_eq!(
            (task.state, task.attempts, error.kind),
            (State::Failed, 1, ErrorKind::Permanent),
            "task {id} ({}, payload {}): {error:?}",
            task.agent,
            task.payload
        );
        assert!(
            error.message.contains(needle),
            "task {id} ({}): message {:?} does not contain {needle:?}",
            task.agent,
            error.message
        );
        assert!(task.result.is_none());
        assert!(self.queue().children(id).unwrap().is_empty());
        let log = self.log(id);
        assert!(
            log.contains(&format!("[warn] giving up: {}", error.message)),
            "task {id} logged why it gave up:\n{log}"
        );
    }
}

/// A task with a short retry backoff, so retries do not slow the test.
fn new_task(agent: &str, payload: &Value) -> NewTask {
    let mut task = NewTask::new(agent, payload.to_string());
    task.backoff_ms = 1;
    task
}

/// The product brief every store agent reads (each uses the fields it needs).
fn brief(name: &str) -> Value {
    json!({
        "name": name,
        "audience": "remote designers",
        "features": ["adjustable colour temperature", "USB-C charging", "a wireless phone pad"],
        "price_cents": 4900,
        "cost_cents": 2000,
        "currency": "USD",
        "stock": 25,
    })
}

/// `value` with `key` set to `to`.
fn with(mut value: Value, key: &str, to: Value) -> Value {
    value[key] = to;
    value
}

/// `value` without `key`.
fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().unwrap().remove(key);
    value
}

/// A design spec, as the `code` agent reads it (the shape `design` produces).
fn spec() -> Value {
    json!({
        "product": {"name": "Tide & Stone"},
        "palette": {
            "primary": "#1F4E79",
            "secondary": "#2e75b6",
            "accent": "#f4b183",
            "background": "#ffffff",
            "text": "#1a1a1a",
        },
        "typography": {
            "heading": "Lora, Georgia, serif",
            "body": "Inter, system-ui, sans-serif",
            "scale": 1.25,
        },
        "sections": [
            {"id": "hero", "title": "Tide & Stone", "body": "Ceramics for the coast."},
            {"id": "feature-1", "title": "Hand thrown", "body": "Each piece is unique."},
            {"id": "pricing", "title": "Pricing", "body": "$49.00. Free shipping."},
        ],
    })
}

fn is_hex_colour(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 7 && s.starts_with('#') && s[1..].bytes().all(|b| b.is_ascii_hexdigit())
    })
}

// ----- design ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn design_specs_a_brief_and_its_code_child_renders_it_escaped() {
    let h = store();
    let id = h.submit(new_task("design", &brief("Lumen <Desk> & Co")));
    let summary = h.run_until_idle().await;
    assert_eq!((summary.completed, summary.failed), (2, 0), "{summary:?}");

    let design = h.completed(id);
    assert_eq!(h.task(id).attempts, 1);
    assert_eq!(design["product"]["name"], "Lumen <Desk> & Co");
    for colour in ["primary", "secondary", "accent", "background", "text"] {
        assert!(
            is_hex_colour(&design["palette"][colour]),
            "palette.{colour} = {}",
            design["palette"][colour]
        );
    }
    let sections = design["sections"].as_array().unwrap();
    let ids: Vec<&str> = sections.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "hero",
            "feature-1",
            "feature-2",
            "feature-3",
            "pricing",
            "cta"
        ]
    );
    assert_eq!(sections[1]["title"], "Adjustable colour temperature");
    assert_eq!(sections[2]["title"], "USB-C charging");
    assert_eq!(sections[3]["title"], "A wireless phone pad");
    assert!(
        sections[4]["body"].as_str().unwrap().contains("$49.00"),
        "{}",
        sections[4]
    );
    let log = h.log(id);
    assert!(
        log.contains(
            "[info] designing \"Lumen <Desk> & Co\" for remote designers (3 features, $49.00)"
        ) && log.contains("[info] 6 sections designed; spawning code to render the page"),
        "{log}"
    );

    // Exactly one child: `code`, which rendered the page from the parent's result.
    let children = all_readable(h.queue().children(id).unwrap()).unwrap();
    assert_eq!(children.len(), 1, "{children:?}");
    let child = &children[0];
    assert_eq!(
        (child.agent.as_str(), child.parent_id, &child.payload),
        ("code", Some(id), &json!({}))
    );
    let page = h.completed(child.id);
    assert_eq!(page["title"], "Lumen <Desk> & Co");
    let html = page["html"].as_str().unwrap();
    assert_eq!(page["bytes"], html.len());
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(
        html.contains("<title>Lumen &lt;Desk&gt; &amp; Co</title>"),
        "{html}"
    );
    assert!(html.contains("Lumen &lt;Desk&gt; &amp; Co"));
    assert!(!html.contains("<Desk>"), "the name is escaped everywhere");
    for section in ["feature-1", "feature-2", "feature-3", "pricing", "cta"] {
        assert!(
            html.contains(&format!("<section id=\"{section}\"")),
            "{section} missing:\n{html}"
        );
    }
    let primary = design["palette"]["primary"].as_str().unwrap();
    assert!(html.contains(&format!("--primary: {primary};")), "{html}");
    let log = h.log(child.id);
    assert!(
        log.contains("[info] rendering the page from the parent result")
            && log.contains("contain markup; it is escaped and shown as text"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn design_fails_bad_briefs_permanently_naming_the_field() {
    let h = store();
    let good = brief("Lumen");
    let cases = [
        (
            json!("a lamp, please"),
            "payload must be a JSON object (got \"a lamp, please\")",
        ),
        (
            without(good.clone(), "audience"),
            "payload field \"audience\" is missing; it must be a non-empty string",
        ),
        (
            with(good.clone(), "price_cents", json!("4900")),
            "payload field \"price_cents\" must be a non-negative integer (got \"4900\")",
        ),
        (
            with(good.clone(), "features", json!([])),
            "payload field \"features\" must be a non-empty list of non-empty strings (got an empty list)",
        ),
        (
            with(good.clone(), "features", json!(["glare-free", "  "])),
            "payload field \"features[1]\" must be a non-empty string (got an empty string)",
        ),
        (
            with(good.clone(), "currency", json!("usd")),
            "payload field \"currency\" must be a three-letter ISO 4217 code",
        ),
    ];
    // Default max_attempts (3): a permanent failure must not use the others.
    let ids: Vec<i64> = cases
        .iter()
        .map(|(payload, _)| h.submit(new_task("design", payload)))
        .collect();
    let summary = h.run_until_idle().await;
    assert_eq!(
        (summary.runs, summary.failed, summary.retried),
        (cases.len() as u64, cases.len() as u64, 0),
        "{summary:?}"
    );
    for (id, (_, needle)) in ids.into_iter().zip(&cases) {
        h.failed_permanently(id, needle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_json_is_refused_at_submit_and_by_the_agent() {
    let h = store();
    // The queue never stores it...
    let err = h
        .queue()
        .submit(&NewTask::new("design", "{name: Lumen"))
        .unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert!(err.to_string().contains("not valid JSON"), "{err}");

    // ...and the agent, handed it anyway, fails permanently and says why.
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let report = runtime
        .run(
            &agents.loaded("design").unwrap(),
            &input("design", "{name: Lumen"),
            Arc::new(Progress::default()),
        )
        .await;
    match report.outcome {
        RunOutcome::Failure(e) => {
            assert_eq!(e.kind, ErrorKind::Permanent);
            assert!(
                e.message.starts_with("payload is not valid JSON"),
                "{}",
                e.message
            );
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(
        report
            .log
            .contains("[warn] giving up: payload is not valid JSON"),
        "{}",
        report.log
    );
}

// ----- code -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_renders_a_spec_from_its_payload() {
    let h = store();
    let id = h.submit(new_task("code", &spec()));
    h.run_until_idle().await;
    let page = h.completed(id);
    assert!(h.queue().children(id).unwrap().is_empty());
    assert_eq!(page["title"], "Tide & Stone");
    let html = page["html"].as_str().unwrap();
    assert_eq!(page["bytes"], html.len());
    assert!(html.contains("<title>Tide &amp; Stone</title>"), "{html}");
    assert!(!html.contains("Tide & Stone"), "{html}");
    // Colours are checked and lower-cased, not escaped.
    assert!(html.contains("--primary: #1f4e79;"), "{html}");
    assert!(
        html.contains("--font-heading: Lora, Georgia, serif;"),
        "{html}"
    );
    assert!(
        html.contains("<header id=\"hero\" class=\"hero\">\n<h1>Tide &amp; Stone</h1>\n<p>Ceramics for the coast.</p>"),
        "{html}"
    );
    assert!(html.contains(
        "<section id=\"feature-1\" class=\"section section-feature-1\">\n<h2>Hand thrown</h2>"
    ));
    assert!(html.contains("<section id=\"pricing\""));
    assert!(html.trim_end().ends_with("</html>"));
    let log = h.log(id);
    assert!(
        log.contains("[info] rendering the page from the payload")
            && log.contains("[info] rendered \"Tide & Stone\": 3 sections"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_fails_bad_specs_permanently_naming_the_field() {
    let h = store();
    let mut red = spec();
    red["palette"]["primary"] = json!("red");
    let mut untitled = spec();
    untitled["sections"][1]
        .as_object_mut()
        .unwrap()
        .remove("title");
    let mut injected = spec();
    injected["typography"]["heading"] = json!("Lora; } body { display: none");
    let mut huge = spec();
    huge["typography"]["scale"] = json!(3);
    let cases = [
        (
            without(spec(), "palette"),
            "payload field \"palette\" is missing; it must be an object",
        ),
        (
            red,
            "payload field \"palette.primary\" must be a \"#rrggbb\" colour (got \"red\")",
        ),
        (untitled, "payload field \"sections[1].title\" is missing"),
        (
            injected,
            "payload field \"typography.heading\" must be a CSS font list",
        ),
        (
            huge,
            "payload field \"typography.scale\" must be a number from 1 to 2 (got 3)",
        ),
        (
            with(spec(), "sections", json!([])),
            "payload field \"sections\" must be a non-empty list of sections",
        ),
    ];
    let ids: Vec<i64> = cases
        .iter()
        .map(|(payload, _)| h.submit(new_task("code", payload)))
        .collect();
    h.run_until_idle().await;
    for (id, (_, needle)) in ids.into_iter().zip(&cases) {
        h.failed_permanently(id, needle);
    }
}

// ----- marketing ------------------------------------------------------------

fn social(copy: &Value) -> Vec<(String, String)> {
    copy["social"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().unwrap().to_string(),
                p["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_posts_within_limits(copy: &Value) {
    let posts = social(copy);
    let platforms: Vec<&str> = posts.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(platforms, ["x", "linkedin", "instagram"]);
    for (platform, text) in &posts {
        let limit = match platform.as_str() {
            "x" => 280,
            "linkedin" => 3000,
            _ => 2200,
        };
        let chars = text.chars().count();
        assert!(
            chars > 0 && chars <= limit,
            "{platform}: {chars} characters (limit {limit})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_copy_waits_for_review_and_a_rejection_is_applied() {
    let h = store();
    let id = h.submit(new_task("marketing", &brief("Lumen")));

    let summary = h.run_until_idle().await;
    assert_eq!(summary.to_review, 1, "{summary:?}");
    let task = h.task(id);
    assert_eq!((task.state, task.attempts), (State::Review, 1));
    let first = task.result.clone().expect("the draft is stored for review");
    assert_eq!(first["revision"], 1);
    assert_eq!(first["addressed_feedback"], Value::Null);
    assert_eq!(
        first["tagline"],
        "Lumen: adjustable colour temperature, USB-C charging, and more."
    );
    assert_posts_within_limits(&first);
    assert!(
        h.log(id)
            .contains("[info] copy is ready and waits for review before it is published"),
        "{}",
        h.log(id)
    );

    assert_eq!(
        h.queue().reject(id, "make it shorter").unwrap(),
        State::Ready
    );
    let task = h.task(id);
    assert_eq!(
        (task.state, task.revisions, task.feedback.as_deref()),
        (State::Ready, 1, Some("make it shorter"))
    );

    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Review);
    let second = task.result.clone().unwrap();
    assert_eq!(second["revision"], 2);
    assert_eq!(second["addressed_feedback"], "make it shorter");
    assert_ne!(second["tagline"], first["tagline"]);
    assert_ne!(second["email"], first["email"]);
    assert!(
        second["tagline"].as_str().unwrap().len() < first["tagline"].as_str().unwrap().len(),
        "{} is not shorter than {}",
        second["tagline"],
        first["tagline"]
    );
    assert_eq!(second["email"]["subject"], "Lumen is here");
    assert_posts_within_limits(&second);
    let logs = h.queue().logs(id).unwrap();
    assert_eq!(logs.len(), 2, "one stored log per run");
    assert!(
        logs[1]
            .text
            .contains("[info] applied reviewer feedback \"make it shorter\": shorter"),
        "{}",
        logs[1].text
    );

    assert_eq!(
        h.queue().approve(id, Some("ship it")).unwrap(),
        State::Complete
    );
    let task = h.task(id);
    assert_eq!(task.state, State::Complete);
    assert_eq!(
        task.result,
        Some(second),
        "approval keeps the approved revision"
    );
    let trail: Vec<String> = h
        .queue()
        .events(Some(id), 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(
        trail,
        [
            "submit",
            "claim",
            "model_call",
            "await_review",
            "reject",
            "claim",
            "model_call",
            "await_review",
            "approve",
            "state_write"
        ]
    );
    // The published copy was held through review: the rejected revision's
    // write never landed, the approved one did, once.
    let published = h
        .queue()
        .state_get(colony::state::Scope::Agent, "marketing", "published/Lumen")
        .unwrap()
        .expect("the approved copy is recorded");
    assert_eq!(published.version, 1);
    assert!(
        published.value.contains("\"revision\":2"),
        "{}",
        published.value
    );
    assert_eq!(h.events(id, "reject")[0].detail["note"], "make it shorter");
    // No model is configured here: the agent asked, was refused, and used
    // its template; the refusal is on the trail like any call.
    for call in h.events(id, "model_call") {
        assert_eq!(call.detail["status"], "not_granted");
    }
    assert_eq!(h.task(id).result.unwrap()["written_by"], "template");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_cuts_social_posts_to_each_platforms_limit() {
    let h = store();
    let long = |topic: &str| format!("{topic} {}", "that keeps going ".repeat(10));
    let payload = with(
        brief("Lumen"),
        "features",
        json!([long("a lamp"), long("a charger"), long("a pad")]),
    );
    let id = h.submit(new_task("marketing", &payload));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Review, "{:?}", task.error);
    let copy = task.result.unwrap();
    assert_posts_within_limits(&copy);
    let x = &social(&copy)[0].1;
    assert_eq!(x.chars().count(), 280, "{x}");
    assert!(x.ends_with('…'), "{x}");
    assert!(
        h.log(id)
            .contains("[warn] the x post was cut to its 280-character limit"),
        "{}",
        h.log(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_fails_a_bad_brief_permanently_naming_the_field() {
    let h = store();
    let not_a_list = h.submit(new_task(
        "marketing",
        &with(brief("Lumen"), "features", json!("USB-C charging")),
    ));
    let nameless = h.submit(new_task(
        "marketing",
        &with(brief("Lumen"), "name", json!(" ")),
    ));
    h.run_until_idle().await;
    h.failed_permanently(
        not_a_list,
        "payload field \"features\" must be a non-empty list of non-empty strings (got \"USB-C charging\")",
    );
    h.failed_permanently(
        nameless,
        "payload field \"name\" must be a non-empty string (got an empty string)",
    );
}

// ----- ops ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_retries_the_flaky_supplier_with_backoff_until_it_answers() {
    let h = store();
    let mut task = new_task("ops", &with(brief("Lumen"), "supplier", json!("flaky")));
    task.backoff_ms = 50;
    let id = h.submit(task);
    let summary = h.run_until_idle().await;
    assert_eq!(
        (summary.runs, summary.retried, summary.completed),
        (3, 2, 1),
        "{summary:?}"
    );

    let result = h.completed(id);
    assert_eq!(h.task(id).attempts, 3);
    assert_eq!(
        result,
        json!({"ok": true, "margin_pct": 59.1, "stock": 25, "reorder": false, "currency": "USD"})
    );

    let retries = h.events(id, "retry_later");
    assert_eq!(retries.len(), 2, "{retries:?}");
    for (n, retry) in retries.iter().enumerate() {
        let attempt = n as i64 + 1;
        assert_eq!(retry.detail["kind"], "retryable");
        assert_eq!(retry.detail["attempt"], attempt);
        assert_eq!(
            retry.detail["message"],
            format!("supplier flaky did not answer (attempt {attempt})")
        );
        // 50 ms doubled per attempt, within 20% jitter.
        let delay = retry.detail["retry_in_ms"].as_i64().expect("retry_in_ms");
        let base = 50 << n;
        assert!(
            (base * 8 / 10 - 1..=base * 12 / 10).contains(&delay),
            "retry {attempt} waited {delay} ms"
        );
    }

    let logs = h.queue().logs(id).unwrap();
    let attempts: Vec<u32> = logs.iter().map(|l| l.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "one stored log per attempt");
    assert!(
        logs[0]
            .text
            .contains("[warn] will retry: supplier flaky did not answer (attempt 1)")
    );
    assert!(
        logs[1]
            .text
            .contains("[warn] will retry: supplier flaky did not answer (attempt 2)")
    );
    assert!(
        logs[2]
            .text
            .contains("[info] margin 59.1% clears the 20% floor"),
        "{}",
        logs[2].text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_fails_broken_rules_permanently_naming_the_field() {
    let h = store();
    let good = brief("Lumen");
    let cases = [
        (
            with(good.clone(), "cost_cents", json!(4000)),
            "payload field \"cost_cents\": margin 18.3% is below the 20% floor",
        ),
        (
            with(good.clone(), "currency", json!("XYZ")),
            "payload field \"currency\": \"XYZ\" is not a known ISO 4217 code",
        ),
        (
            with(good.clone(), "stock", json!(-5)),
            "payload field \"stock\" must be an integer >= 0 (got -5)",
        ),
        (
            without(good.clone(), "cost_cents"),
            "payload field \"cost_cents\" is missing",
        ),
        (
            with(good.clone(), "stock", json!("lots")),
            "payload field \"stock\" must be an integer >= 0 (got \"lots\")",
        ),
        // A broken rule is permanent even when the supplier would need retries.
        (
            with(
                with(good.clone(), "stock", json!(-1)),
                "supplier",
                json!("flaky"),
            ),
            "payload field \"stock\" must be an integer >= 0 (got -1)",
        ),
    ];
    let ids: Vec<i64> = cases
        .iter()
        .map(|(payload, _)| h.submit(new_task("ops", payload)))
        .collect();
    let summary = h.run_until_idle().await;
    assert_eq!(summary.retried, 0, "{summary:?}");
    for (id, (_, needle)) in ids.into_iter().zip(&cases) {
        h.failed_permanently(id, needle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_reports_every_broken_rule_and_flags_low_stock() {
    let h = store();
    let broken = h.submit(new_task(
        "ops",
        &with(
            with(brief("Lumen"), "currency", json!("ABC")),
            "cost_cents",
            json!(4900),
        ),
    ));
    let low = h.submit(new_task("ops", &with(brief("Lumen"), "stock", json!(3))));
    h.run_until_idle().await;
    h.failed_permanently(broken, "payload field \"currency\": \"ABC\" is not a known");
    let message = h.task(broken).error.unwrap().message;
    assert!(
        message.contains("; payload field \"cost_cents\": margin 0.0% is below the 20% floor"),
        "{message}"
    );
    let report = h.completed(low);
    assert_eq!(
        (report["stock"].clone(), report["reorder"].clone()),
        (json!(3), json!(true))
    );
    assert!(
        h.log(low)
            .contains("[warn] stock 3 is below the reorder point of 10: reorder"),
        "{}",
        h.log(low)
    );
}

// ----- logs and heartbeats --------------------------------------------------

/// Records the progress texts an agent reported with `heartbeat`.
#[derive(Default)]
struct Progress(Mutex<Vec<Option<String>>>);

impl RunHooks for Progress {
    fn progress(&self, _lease: Lease, progress: Option<String>) {
        self.0.lock().unwrap().push(progress);
    }
}

fn input(agent: &str, payload: &str) -> ClaimedTask {
    ClaimedTask {
        lease: Lease {
            task_id: 1,
            token: 1,
        },
        agent: agent.into(),
        chain: 1,
        payload: payload.into(),
        attempt: 1,
        max_attempts: 3,
        parent_result: None,
        feedback: None,
        timeout_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_heartbeats_and_logs_through_the_runtime() {
    let h = store();
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let product = brief("Lumen").to_string();
    let runs = [
        (
            "design",
            product.clone(),
            "reading the product brief",
            "[info] designing \"Lumen\"",
        ),
        (
            "code",
            spec().to_string(),
            "reading the design spec",
            "[info] rendered \"Tide & Stone\"",
        ),
        (
            "marketing",
            product.clone(),
            "reading the product brief",
            "[info] tagline: Lumen:",
        ),
        (
            "ops",
            product,
            "checking pricing and stock",
            "[info] margin 59.1% clears",
        ),
    ];
    for (agent, payload, first_progress, line) in runs {
        let progress = Arc::new(Progress::default());
        let report = runtime
            .run(
                &agents.loaded(agent).unwrap(),
                &input(agent, &payload),
                progress.clone(),
            )
            .await;
        assert!(
            matches!(report.outcome, RunOutcome::Success { .. }),
            "{agent}: {:?}\n{}",
            report.outcome,
            report.log
        );
        let seen = progress.0.lock().unwrap().clone();
        assert_eq!(
            seen.first().cloned().flatten().as_deref(),
            Some(first_progress),
            "{agent} heartbeats: {seen:?}"
        );
        assert!(report.log.contains(line), "{agent} log:\n{}", report.log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_stores_its_log_with_the_task() {
    let h = store();
    let design = h.submit(new_task("design", &brief("Lumen")));
    let code = h.submit(new_task("code", &spec()));
    let marketing = h.submit(new_task("marketing", &brief("Lumen")));
    let ops = h.submit(new_task(
        "ops",
        &with(brief("Lumen"), "supplier", json!("acme")),
    ));
    // Heartbeats run every 100 ms in the harness's daemon; they must not
    // disturb the runs or their results.
    let summary = h.run_until_idle().await;
    assert_eq!(
        (
            summary.completed,
            summary.to_review,
            summary.failed,
            summary.retried
        ),
        (3 + 1, 1, 0, 0),
        "design, its code child, code, ops complete; marketing waits: {summary:?}"
    );
    for (id, line) in [
        (design, "[info] palette primary #"),
        (code, "[info] rendering the page from the payload"),
        (
            marketing,
            "[info] writing copy for \"Lumen\", aimed at remote designers (attempt 1)",
        ),
        (
            ops,
            "[info] price 4900 / cost 2000 USD cents, stock 25, supplier acme",
        ),
    ] {
        let logs = h.queue().logs(id).unwrap();
        assert_eq!(logs.len(), 1, "task {id}: {logs:?}");
        assert_eq!(logs[0].attempt, 1);
        assert!(
            logs[0].text.contains(line),
            "task {id} log:\n{}",
            logs[0].text
        );
        let task = h.task(id);
        assert!(task.error.is_none(), "task {id}: {:?}", task.error);
        assert_eq!(task.attempts, 1);
    }
}
