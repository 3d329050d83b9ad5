//! The dashboard, JSON API and /metrics over a real listener on loopback:
//! every endpoint answers in the CLI's `--json` shapes, bad input is 400
//! and changes nothing, changes without the token are 401/403 and change
//! nothing, agent-written text is escaped, and the metrics move.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use common::web::{TOKEN, Web, send};
use common::*;
use serde_json::{Value, json};

/// A task's JSON as the CLI prints it, and as the API answers.
fn cli_show(env: &Env, id: i64) -> Value {
    env.show(id)
}

on_both_drivers! {
    fn api_reads_answer_as_the_cli_does(db) {
        let env = Env::on(db, &["echo", "permanent"]);
        let ok = env.submit(&["echo", r#"{"product":"lamp"}"#]);
        let failed = env.submit(&["permanent", "{}"]);
        env.until_idle(&[]);
        let web = Web::serve(&env);

        assert_eq!(web.get_json("/api/tasks"), env.json(&["list"]));
        assert_eq!(web.get_json(&format!("/api/tasks/{ok}")), cli_show(&env, ok));
        assert_eq!(web.get_json(&format!("/api/tasks/{failed}")), cli_show(&env, failed));
        let filtered = web.get_json("/api/tasks?state=failed&agent=permanent");
        assert_eq!(filtered, env.json(&["list", "--state", "failed", "--agent", "permanent"]));
        assert_eq!(filtered.as_array().unwrap().len(), 1);

        let status = web.get_json("/api/status");
        let cli_status = env.json(&["status"]);
        assert_eq!(status["by_state"], cli_status["by_state"]);
        assert_eq!(status["by_agent"], cli_status["by_agent"]);
        assert_eq!(status["agents"], cli_status["agents"]);
        assert_eq!(web.get_json("/api/agents"), env.json(&["agents"]));

        let cli_events: Vec<Value> = env
            .ok(&["events"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(web.get_json("/api/events"), Value::Array(cli_events.clone()));
        // Pages of 2: a full page links to the next; the whole trail read
        // through the links is the CLI's.
        let mut read = Vec::new();
        let mut next = Some("/api/events?limit=2".to_string());
        while let Some(path) = next.take() {
            let response = web.client.get(web.url(&path)).send().unwrap();
            next = response.headers().get("link").map(|link| {
                let link = link.to_str().unwrap();
                assert!(link.ends_with(">; rel=\"next\""), "{link}");
                link[1..link.find('>').unwrap()].to_string()
            });
            let page: Vec<Value> = response.json().unwrap();
            assert!(page.len() <= 2);
            assert!(next.is_none() || page.len() == 2, "{path}: a short page links on");
            read.extend(page);
        }
        assert_eq!(read, cli_events);
        // Task 0: the operators' own writes, as `events --task 0` reads them.
        env.ok(&["state", "set", "--agent", "echo", "k1", "\"v\""]);
        let operators: Vec<Value> = env
            .ok(&["events", "--task", "0"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(operators.len(), 1, "{operators:?}");
        assert_eq!(web.get_json("/api/events?task=0"), Value::Array(operators));
        let since = cli_events[1]["id"].as_i64().unwrap();
        assert_eq!(
            web.get_json(&format!("/api/events?since={since}&task={failed}")),
            json!(cli_events.iter().filter(|e| e["id"].as_i64().unwrap() > since && e["task_id"] == failed).collect::<Vec<_>>())
        );

        for page in ["/", "/tasks", "/tasks?state=failed", &format!("/tasks/{ok}"), &format!("/tasks/{failed}"), "/review", "/agents", "/login"] {
            let html = web.page(page);
            assert!(html.starts_with("<!DOCTYPE html>"), "{page}: {html}");
        }
        let failed_page = web.page(&format!("/tasks/{failed}"));
        assert!(failed_page.contains("permanent: this input can never work"), "{failed_page}");
        assert!(web.page("/agents").contains("echo"));
        assert!(web.page("/").contains(&format!("/tasks/{failed}")), "the overview links the recent failure");
    }

    /// The overview says which agents' waiting tasks no component here
    /// serves, as `colony status` does: they looked merely slow.
    fn the_overview_flags_agents_no_component_serves(db) {
        let env = Env::on(db, &["echo"]);
        env.submit(&["echo", "{}"]);
        env.submit(&["nowhere", "{}"]);
        std::fs::write(env.agents.path().join("broken.wasm"), b"not a component").unwrap();
        env.submit(&["broken", "{}"]);
        let overview = Web::serve(&env).page("/");
        let table = &overview[overview.find("Tasks by agent").expect("the agents table")..];
        let row = |agent: &str| {
            let at = table.find(&format!("?agent={agent}\"")).unwrap_or_else(|| panic!("{agent}: {table}"));
            table[at..].split("</tr>").next().unwrap().to_string()
        };
        assert!(!row("echo").contains("unserved"), "{}", row("echo"));
        assert!(row("nowhere").contains("nowhere.wasm: its tasks wait for a daemon that has one"), "{}", row("nowhere"));
        assert!(row("broken").contains("broken.wasm does not load: see Agents"), "{}", row("broken"));
    }

    /// The overview's failures are the latest to fail, whatever their ids:
    /// an old task retried that failed again comes first.
    fn the_overview_lists_failures_by_when_they_failed(db) {
        let env = Env::on(db, &["permanent"]);
        let older = env.submit(&["permanent", "{}"]);
        let newer = env.submit(&["permanent", "{}"]);
        env.until_idle(&[]);
        env.ok(&["retry", &older.to_string()]);
        env.until_idle(&[]);
        let web = Web::serve(&env);
        let overview = web.page("/");
        let failures = &overview[overview.find("Recent failures").expect("the failures section")..];
        let at = |id: i64| failures.find(&format!("/tasks/{id}\"")).unwrap_or_else(|| panic!("task {id} listed: {failures}"));
        assert!(at(older) < at(newer), "the task that failed last comes first: {failures}");
    }

    /// A stopped daemon's leases are not shown as live: `status`, its JSON
    /// and the overview give each holder's last heartbeat and how many of
    /// its leases went unrenewed past its --stale-after.
    fn leases_say_how_fresh_they_are(db) {
        let env = Env::on(db, &["sleeper"]);
        let live = env.submit(&["sleeper", "{}"]);
        let dead = env.submit(&["sleeper", "{}"]);
        let mut q = env.queue();
        q.set_claim_lease(Duration::from_secs(600));
        let running = q.claim("sleeper", 1).unwrap().remove(0).lease;
        let mut stopped = env.queue();
        stopped.set_claim_lease(Duration::from_millis(100));
        let gone = stopped.claim("sleeper", 1).unwrap().remove(0).lease;
        assert_eq!((running.task_id, gone.task_id), (live, dead));

        std::thread::sleep(Duration::from_millis(300));

        // One holder (this process), one of its two leases stale.
        let holder = q.get(live).unwrap().claimed_by.unwrap();
        let status = env.json(&["status"]);
        let lease = &status["leases"][0];
        assert_eq!((&lease["holder"], &lease["count"], &lease["stale"]), (&json!(holder), &json!(2), &json!(1)), "{status}");
        assert!(lease["last_heartbeat_at"].as_i64().is_some(), "{lease}");
        let text = env.ok(&["status"]);
        let line = text.lines().find(|l| l.starts_with(&format!("leases held by {holder}: 2 (last heartbeat "))).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains(" ago; 1 stale: not renewed"), "{text}");
        let overview = Web::serve(&env).page("/");
        let leases = &overview[overview.find("<h2>Leases</h2>").expect("the leases section")..];
        assert!(leases.contains("<tr class=\"stale\">"), "{leases}");

        // Renewed, it is fresh again.
        q.heartbeat(&[gone]).unwrap();
        let text = env.ok(&["status"]);
        let line = text.lines().find(|l| l.starts_with(&format!("leases held by {holder}: 2 (last heartbeat "))).unwrap_or_else(|| panic!("{text}"));
        assert!(line.ends_with(" ago)"), "{text}");
    }

    fn changes_need_the_token_and_change_nothing_without_it(db) {
        let env = Env::on(db, &["echo", "permanent"]);
        let review = env.submit(&["echo", r#"{"needs_review":true}"#]);
        let failed = env.submit(&["permanent", "{}"]);
        env.until_idle(&[]);
        let ready = env.submit(&["echo", "{}"]);
        let web = Web::serve(&env);
        let before = env.snapshot();
        let changes = [
            ("/api/tasks".to_string(), r#"{"agent":"echo","payload":{}}"#),
            (format!("/api/tasks/{review}/review"), r#"{"verdict":"approve"}"#),
            (format!("/api/tasks/{failed}/retry"), ""),
            (format!("/api/tasks/{ready}/cancel"), ""),
        ];
        for (path, body) in &changes {
            let (status, answer) = web.post_anonymous(path, body);
            assert_eq!(status, 401, "{path} without a token: {answer}");
            assert!(answer["error"].as_str().unwrap().contains("Bearer"), "{answer}");
            let (status, answer) = send(web.client.post(web.url(path)).bearer_auth("wrong-token-0000000000").body(body.to_string()));
            assert_eq!(status, 403, "{path} with a wrong token: {answer}");
            let (status, _) = send(web.client.post(web.url(path)).header("authorization", "Basic abc").body(body.to_string()));
            assert_eq!(status, 403, "{path} with a Basic header");
            // A script whose token variable was empty sent no credentials.
            for empty in ["Bearer ", "Bearer", "bearer   "] {
                let (status, answer) = send(web.client.post(web.url(path)).header("authorization", empty).body(body.to_string()));
                assert_eq!(status, 401, "{path} with {empty:?}: {answer}");
            }
            // A cookie that names no session is anonymous: still 401.
            let forged = format!("colony_session_{}=forged", web.base.rsplit(':').next().unwrap());
            let (status, _) = send(web.client.post(web.url(path)).header("cookie", forged).body(body.to_string()));
            assert_eq!(status, 401, "{path} with a forged session");
        }
        assert_eq!(env.snapshot(), before, "refused requests changed the queue");
    }

    fn bad_input_is_400_and_changes_nothing(db) {
        let env = Env::on(db, &["echo"]);
        let done = env.submit(&["echo", "{}"]);
        env.until_idle(&[]);
        let web = Web::serve(&env);
        let before = env.snapshot();
        let bad_posts = [
            ("/api/tasks", "", "the body is empty"),
            ("/api/tasks", "{not json", "not valid JSON: key must be a string"),
            ("/api/tasks", r#"{"agent":"echo","payload":{"a":1}"#, "not valid JSON: EOF while parsing"),
            ("/api/tasks", r#"{"agent":"echo"} {"agent":"other"}"#, "text after the value"),
            ("/api/tasks", r#"{"agent":"echo"} garbage"#, "text after the value"),
            ("/api/tasks/1/review", r#"{"verdict":"reject"} {"verdict":"approve"}"#, "text after the value"),
            ("/api/tasks/1/retry", "{}xyz", "text after the value"),
            ("/api/tasks", r#"{"agent":"echo","colour":"red"}"#, "unknown field `colour`"),
            ("/api/tasks", r#"{"agent":"echo","priority":"high"}"#, "field priority"),
            ("/api/tasks", "{\"agent\":\"echo\"}\n{\"agent\":\"echo\"}", "more than one line"),
            ("/api/tasks", r#"{"agent":"echo","timeout":"forever"}"#, "invalid timeout"),
            ("/api/tasks", r#"{"agent":"no such/agent"}"#, "agent"),
            ("/api/tasks", r#"{"agent":"echo","after":[999999]}"#, "999999"),
            ("/api/tasks/abc/retry", "", "invalid task id"),
            ("/api/tasks/0/cancel", "", "invalid task id"),
            ("/api/tasks/1/review", r#"{"verdict":"maybe"}"#, "field verdict"),
            ("/api/tasks/1/review", r#"{"note":"x"}"#, "missing field `verdict`"),
            ("/api/tasks/1/cancel", r#"{"why":"x"}"#, "unknown field `why`"),
            ("/api/tasks/1/cancel", "null", "must be a JSON object"),
            ("/api/tasks/1/cancel", "[]", "must be a JSON object"),
            ("/api/tasks/1/review", r#"["approve"]"#, "must be a JSON object"),
        ];
        for (path, body, says) in bad_posts {
            let (status, answer) = web.post(path, body);
            assert_eq!(status, 400, "POST {path} {body:?}: {answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(says), "POST {path} {body:?}: {error:?} should say {says:?}");
        }
        // The CLI's wording for the same line.
        let line = env.file("bad.jsonl", r#"{"agent":"echo","priority":"high"}"#);
        let cli = env.run(&["submit", "--batch", &line]);
        assert_eq!(cli.status.code(), Some(2));
        let (_, answer) = web.post("/api/tasks", r#"{"agent":"echo","priority":"high"}"#);
        assert!(String::from_utf8_lossy(&cli.stderr).contains(answer["error"].as_str().unwrap()));

        // The scheme is case-insensitive: a lowercase `bearer` with a wrong
        // token is refused for the token, not the scheme.
        let (status, answer) = send(web.client.post(web.url("/api/tasks/999999/retry")).header("authorization", format!("bearer {}", web.token)));
        assert_eq!(status, 404, "{answer}");
        let (status, answer) = send(web.client.post(web.url("/api/tasks/999999/retry")).header("authorization", "BEARER wrong-token-0000000000"));
        assert_eq!((status, answer["error"].as_str().unwrap()), (403, "the bearer token is not this server's token"));

        let (status, answer) = web.post("/api/tasks/999999/retry", "");
        assert_eq!(status, 404, "{answer}");
        assert_eq!(answer["error"], "task 999999 does not exist");
        let (status, answer) = web.post(&format!("/api/tasks/{done}/review"), r#"{"verdict":"approve"}"#);
        assert_eq!(status, 409, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("is complete"), "{answer}");

        for (path, says) in [
            ("/api/tasks?state=bogus", "invalid state"),
            ("/api/tasks?limit=0", "invalid limit"),
            ("/api/tasks?limit=100000", "invalid limit"),
            ("/api/tasks?before=-3", "invalid before: invalid task id"),
            ("/api/tasks?colour=red", "invalid query string: colour: unknown field"),
            ("/api/tasks/abc", "invalid task id"),
            ("/api/events?since=x", "invalid since"),
            ("/api/events?task=999999", "does not exist"),
            (&format!("/api/tasks?q={}", "a".repeat(60_000)), "invalid q: a search of 60000 characters"),
        ] {
            let response = web.get(path);
            let status = response.status().as_u16();
            let answer: Value = response.json().unwrap();
            assert!(status == 400 || status == 404, "GET {path}: {status} {answer}");
            assert!(answer["error"].as_str().unwrap().contains(says), "GET {path}: {answer}");
        }
        assert_eq!(web.get("/api/tasks/999999").status(), 404);

        // What axum answers by itself is JSON under /api/ too.
        let (status, answer) = oversized_post(&web, "/api/tasks");
        assert_eq!(status, 413, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("larger than the API takes (2 MiB)"), "{answer}");
        let (status, answer) = send(web.client.delete(web.url("/api/tasks")));
        assert_eq!(status, 405, "{answer}");
        assert_eq!(answer["error"], "/api/tasks does not take DELETE; it takes GET,HEAD,POST");
        let response = web.get("/api/nothing-here");
        assert_eq!(response.status().as_u16(), 404);
        let answer: Value = response.json().unwrap();
        assert_eq!(answer["error"], "no such endpoint: GET /api/nothing-here");
        assert_eq!(web.get("/nothing-here").text().unwrap(), "no such page", "pages keep their text");
        assert_eq!(env.snapshot(), before, "bad input changed the queue");
    }

    fn submit_review_retry_and_cancel_over_the_api(db) {
        let env = Env::on(db, &["echo", "permanent"]);
        let web = Web::serve(&env);
        let response = web.client.post(web.url("/api/tasks")).bearer_auth(&web.token).body(r#"{"agent":"echo","payload":{"needs_review":true},"key":"k1"}"#).send().unwrap();
        assert_eq!(response.status().as_u16(), 201);
        let location = response.headers()["location"].to_str().unwrap().to_string();
        let answer: Value = response.json().unwrap();
        assert_eq!(location, format!("/api/tasks/{}", answer["id"]));
        let id = answer["id"].as_i64().unwrap();
        assert_eq!(answer, json!({"id": id}));
        let (status, again) = web.post("/api/tasks", r#"{"agent":"echo","payload":{"needs_review":true},"key":"k1"}"#);
        assert_eq!((status, again), (200, json!({"id": id, "existed": true})));
        env.until_idle(&[]);
        assert_eq!(cli_show(&env, id)["state"], "review");

        let (status, answer) = web.post(&format!("/api/tasks/{id}/review"), r#"{"verdict":"reject","note":"shorter, please"}"#);
        assert_eq!((status, answer), (200, json!({"id": id, "state": "ready"})));
        let shown = cli_show(&env, id);
        assert_eq!(shown["feedback"], "shorter, please");
        let reject = shown["events"].as_array().unwrap().iter().find(|e| e["event"] == "reject").unwrap().clone();
        assert_eq!(reject["actor"], "api", "{reject}");
        env.until_idle(&[]);
        let (status, answer) = web.post(&format!("/api/tasks/{id}/review"), r#"{"verdict":"approve"}"#);
        assert_eq!((status, answer), (200, json!({"id": id, "state": "complete"})));

        // A task for an agent with no component is stored, with the CLI's warning.
        let (status, answer) = web.post("/api/tasks", r#"{"agent":"nosuchagent","reviewer":"echo"}"#);
        assert_eq!(status, 201, "{answer}");
        let warnings = answer["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1, "{answer}");
        assert!(warnings[0].as_str().unwrap().starts_with("no agent \"nosuchagent\" in "), "{answer}");
        web.post(&format!("/api/tasks/{}/cancel", answer["id"]), "");

        let (_, answer) = web.post("/api/tasks", r#"{"agent":"permanent"}"#);
        let failed = answer["id"].as_i64().unwrap();
        env.until_idle(&[]);
        assert_eq!(cli_show(&env, failed)["state"], "failed");
        let (status, answer) = web.post(&format!("/api/tasks/{failed}/retry"), "");
        assert_eq!((status, answer), (200, json!({"id": failed, "state": "ready"})));
        let (_, answer) = web.post("/api/tasks", &format!(r#"{{"agent":"echo","after":[{failed}]}}"#));
        let dependent = answer["id"].as_i64().unwrap();
        let (status, answer) = web.post(&format!("/api/tasks/{failed}/cancel"), r#"{"reason":"not today"}"#);
        assert_eq!((status, answer), (200, json!({"cancelled": [failed, dependent]})));
        assert_eq!(cli_show(&env, failed)["error"]["message"], "not today");
        // Its dependent cannot come back before it: a refusal of the state
        // machine (409), not bad input.
        let (status, answer) = web.post(&format!("/api/tasks/{dependent}/retry"), "");
        assert_eq!(status, 409, "{answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(&format!("depends on task {failed}, which is cancelled")) && message.contains(&format!("retry task {failed} first")), "{message}");
    }

    fn metrics_move_after_a_drain(db) {
        let env = Env::on(db, &["echo", "permanent"]);
        let web = Web::serve(&env);
        let before = scrape(&web);
        assert_eq!(sample(&before, "colony_runs_finished_total", &[("agent", "echo"), ("outcome", "complete")]), 0.0);
        for _ in 0..5 {
            env.submit(&["echo", "{}"]);
        }
        env.submit(&["permanent", "{}"]);
        env.submit(&["permanent", "{}"]);
        let waiting = scrape(&web);
        assert_eq!(sample(&waiting, "colony_ready_tasks", &[("agent", "echo")]), 5.0);
        assert_eq!(sample(&waiting, "colony_tasks", &[("agent", "permanent"), ("state", "ready")]), 2.0);
        env.until_idle(&[]);
        let after = scrape(&web);
        assert_eq!(sample(&after, "colony_runs_finished_total", &[("agent", "echo"), ("outcome", "complete"), ("error_kind", "")]), 5.0);
        assert_eq!(sample(&after, "colony_runs_finished_total", &[("agent", "permanent"), ("outcome", "fail"), ("error_kind", "permanent")]), 2.0);
        assert_eq!(sample(&after, "colony_tasks", &[("agent", "echo"), ("state", "complete")]), 5.0);
        assert_eq!(sample(&after, "colony_tasks", &[("agent", "permanent"), ("state", "failed")]), 2.0);
        assert_eq!(sample(&after, "colony_ready_tasks", &[("agent", "echo")]), 0.0);
        // Empty gauges read 0 rather than vanishing.
        let present = |name: &str, labels: &[(&str, &str)]| {
            after.samples.iter().any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        };
        assert!(present("colony_ready_tasks", &[("agent", "echo")]));
        assert!(present("colony_tasks", &[("agent", "echo"), ("state", "ready")]));
        assert!(present("colony_effects", &[("state", "failed")]));
        assert_eq!(sample(&after, "colony_run_duration_seconds_count", &[("agent", "echo")]), 5.0);
        assert_eq!(sample(&after, "colony_claim_wait_seconds_count", &[("agent", "echo")]), 5.0);
        let overview = web.page("/");
        assert!(overview.contains("5 runs succeeded, 2 failed for good"), "{overview}");
    }
}

/// A POST declaring a 3 MiB body and waiting for `100 Continue` before
/// sending it, as careful clients do: the answer comes before any of it.
/// (Sending the body at once races the server's early answer and close.)
fn oversized_post(web: &Web, path: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let url = reqwest::Url::parse(&web.url(path)).unwrap();
    let mut socket =
        std::net::TcpStream::connect((url.host_str().unwrap(), url.port().unwrap())).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        web.token,
        3 << 20
    );
    socket.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}")),
    )
}

/// The token and cost counters of an agent's granted model aliases read 0
/// before its first call, so that increase() sees the first call after a
/// start: tokens for every alias the configuration declares, cost only for
/// a priced one, nothing for an alias it does not declare.
#[test]
fn granted_model_counters_start_at_zero() {
    let env = Env::new(&["echo"]);
    env.file(
        "colony.toml",
        "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\
         input_usd_per_mtok = 1.0\n\
         [models.free]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n",
    );
    std::fs::write(
        env.agents.path().join("echo.toml"),
        "models = [\"fast\", \"free\", \"nowhere\"]\n",
    )
    .unwrap();
    let web = Web::serve(&env);
    let text = web.get("/metrics").text().unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("colony_model_"))
        .collect();
    let mut expected = vec![
        r#"colony_model_tokens_total{agent="echo",model="fast",direction="input"} 0"#,
        r#"colony_model_tokens_total{agent="echo",model="fast",direction="output"} 0"#,
        r#"colony_model_tokens_total{agent="echo",model="free",direction="input"} 0"#,
        r#"colony_model_tokens_total{agent="echo",model="free",direction="output"} 0"#,
        r#"colony_model_cost_usd_total{agent="echo",model="fast"} 0.0"#,
    ];
    let mut lines = lines;
    lines.sort();
    expected.sort();
    assert_eq!(lines, expected, "{text}");

    // A configuration that does not load is the daemon's to refuse: the
    // dashboard serves on without those counters.
    env.file("colony.toml", "[models.fast]\napi = \"cohere\"\n");
    let web = Web::serve(&env);
    let text = web.get("/metrics").text().unwrap();
    assert!(!text.contains("colony_model_tokens_total{"), "{text}");
}

/// Parses `/metrics` with a Prometheus text-format parser.
fn scrape(web: &Web) -> prometheus_parse::Scrape {
    let response = web.get("/metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The value of the sample named `name` whose labels include `labels`
/// (0 when there is none; a counter that never moved is not written).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {matching:?}"
    );
    matching.first().copied().unwrap_or(0.0)
}

#[test]
fn agent_written_text_is_escaped() {
    let env = Env::new(&["echo"]);
    let evil = r#"<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">"#;
    let id = env.submit(&["echo", &json!({"name": evil}).to_string()]);
    env.until_idle(&[]);
    let cancelled = env.submit(&["echo", "{}", "--in", "1h"]);
    env.ok(&["cancel", &cancelled.to_string(), "--reason", evil]);
    let web = Web::serve(&env);
    for page in [
        format!("/tasks/{id}"),
        format!("/tasks/{cancelled}"),
        "/tasks".into(),
        "/tasks?q=script".to_string(),
    ] {
        let html = web.page(&page);
        assert!(
            !html.contains("<script>window"),
            "{page} has the agent's script as markup"
        );
        assert!(
            !html.contains("<img src=x"),
            "{page} has the agent's img as markup"
        );
    }
    let html = web.page(&format!("/tasks/{id}"));
    assert!(
        html.contains("&lt;script&gt;window.__pwned=1&lt;/script&gt;"),
        "{html}"
    );
    let response = web.get(&format!("/tasks/{id}"));
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
}

#[test]
fn forms_need_a_session_and_its_csrf_token() {
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", r#"{"needs_review":true}"#]);
    env.until_idle(&[]);
    let web = Web::serve(&env);
    let form = |cookie: Option<&str>, fields: &[(&str, &str)]| {
        let mut request = web
            .client
            .post(web.url(&format!("/tasks/{id}/review")))
            .form(fields);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send().unwrap()
    };
    assert_eq!(
        form(None, &[("verdict", "reject"), ("note", "x")]).status(),
        401
    );
    // Anonymous changes are refused before their bodies are read: 401 in
    // the dashboard's page or the API's JSON, whatever was sent (a form
    // with no content type was answered 415 in plain text, a bad field 400).
    for (path, body) in [
        (format!("/tasks/{id}/cancel"), None),
        (format!("/tasks/{id}/review"), Some("verdict=bogus")),
        ("/logout".to_string(), None),
        (format!("/api/tasks/{id}/cancel"), Some("{not json")),
    ] {
        let mut request = web.client.post(web.url(&path));
        if let Some(body) = body {
            request = request.body(body);
        }
        let answer = request.send().unwrap();
        assert_eq!(answer.status(), 401, "{path}");
        assert!(answer.headers().get("set-cookie").is_none(), "{path}");
        let text = answer.text().unwrap();
        match path.starts_with("/api/") {
            true => assert!(text.starts_with('{'), "{path}: {text}"),
            false => assert!(text.starts_with("<!DOCTYPE html>"), "{path}: {text}"),
        }
    }

    let wrong = web
        .client
        .post(web.url("/login"))
        .form(&[("token", "nope"), ("operator", "ann")])
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text().unwrap().contains("not this server"));
    for (fields, why) in [
        (&[("operator", "ann")][..], "not this server"),
        (&[("token", TOKEN)][..], "say who you are"),
    ] {
        let missing = web
            .client
            .post(web.url("/login"))
            .form(fields)
            .send()
            .unwrap();
        assert_eq!(missing.status(), 401, "{fields:?}");
        let page = missing.text().unwrap();
        assert!(
            page.starts_with("<!DOCTYPE html>") && page.contains(why),
            "{fields:?}: {page}"
        );
    }
    let signed_in = web
        .client
        .post(web.url("/login"))
        .form(&[("token", TOKEN), ("operator", "ann"), ("next", "/review")])
        .send()
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    assert_eq!(signed_in.headers()["location"], "/review");
    let set_cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_string();

    let page = web
        .client
        .get(web.url("/review"))
        .header("cookie", &cookie)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("signed in as <strong>ann</strong>"), "{page}");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    // The form decides on the round of review the page shows.
    let round = env.show(id)["review_round"].as_i64().unwrap();
    assert!(
        page.contains(&format!("name=\"round\" value=\"{round}\"")),
        "{page}"
    );
    let before = env.snapshot();
    // A round the form did not show is refused (a real earlier round is
    // 409: the API's and the CLI's tests), and changes nothing.
    let other = (round - 1).to_string();
    let refused = form(
        Some(&cookie),
        &[("verdict", "approve"), ("csrf", &csrf), ("round", &other)],
    );
    assert_eq!(refused.status(), 400, "a form of another round");
    assert_eq!(
        form(Some(&cookie), &[("verdict", "reject"), ("note", "x")]).status(),
        403
    );
    assert_eq!(
        form(
            Some(&cookie),
            &[("verdict", "reject"), ("note", "x"), ("csrf", "forged")]
        )
        .status(),
        403
    );
    // The API takes a session only with its CSRF header.
    let (status, _) = send(
        web.client
            .post(web.url(&format!("/api/tasks/{id}/review")))
            .header("cookie", &cookie)
            .body(r#"{"verdict":"approve"}"#),
    );
    assert_eq!(status, 403);
    assert_eq!(env.snapshot(), before);

    let done = form(
        Some(&cookie),
        &[
            ("verdict", "reject"),
            ("note", "more colour"),
            ("csrf", &csrf),
            ("next", "/review"),
        ],
    );
    assert_eq!(done.status(), 303);
    assert_eq!(done.headers()["location"], "/review");
    let shown = env.show(id);
    assert_eq!(shown["state"], "ready");
    assert_eq!(shown["feedback"], "more colour");
    let reject = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "reject")
        .unwrap()
        .clone();
    assert_eq!(reject["actor"], "web:ann");
    // An off-site `next` is not followed: the form goes back to the task.
    let cancel = web
        .client
        .post(web.url(&format!("/tasks/{id}/cancel")))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("reason", "enough"),
            ("next", "//evil.example/"),
        ])
        .send()
        .unwrap();
    assert_eq!(cancel.status(), 303);
    assert_eq!(
        cancel.headers()["location"],
        format!("/tasks/{id}").as_str()
    );
    assert_eq!(env.show(id)["state"], "cancelled");
    // The API takes the session with its CSRF header.
    let (status, answer) = send(
        web.client
            .post(web.url(&format!("/api/tasks/{id}/retry")))
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .body(""),
    );
    assert_eq!((status, answer), (200, json!({"id": id, "state": "ready"})));
    let retry = env.show(id)["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["event"] == "retry")
        .unwrap()
        .clone();
    assert_eq!(retry["actor"], "web:ann");

    // Signing out takes the session's CSRF token too: without it (another
    // site's form) the session and its cookie stay; with it both go.
    let logout = |fields: &[(&str, &str)]| {
        web.client
            .post(web.url("/logout"))
            .header("cookie", &cookie)
            .form(fields)
            .send()
            .unwrap()
    };
    let forged = logout(&[]);
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none());
    let signed_in_still = |cookie: &str| {
        web.client
            .get(web.url("/review"))
            .header("cookie", cookie)
            .send()
            .unwrap()
            .text()
            .unwrap()
            .contains("signed in as <strong>ann</strong>")
    };
    assert!(signed_in_still(&cookie));
    let out = logout(&[("csrf", csrf.as_str())]);
    assert_eq!(out.status(), 303);
    assert!(
        out.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert!(!signed_in_still(&cookie), "the session is gone");
}

/// Browsers send a cookie to every port of its host: two dashboards on one
/// machine name their session cookies by port, so signing in to one
/// neither signs the other out nor counts there.
#[test]
fn dashboards_on_two_ports_keep_their_own_sessions() {
    let env = Env::new(&[]);
    let (a, b) = (Web::serve(&env), Web::serve(&env));
    let sign_in = |web: &Web, operator: &str| -> String {
        let response = web
            .client
            .post(web.url("/login"))
            .form(&[("token", TOKEN), ("operator", operator)])
            .send()
            .unwrap();
        assert_eq!(response.status(), 303);
        let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
        set_cookie.split(';').next().unwrap().to_string()
    };
    let (cookie_a, cookie_b) = (sign_in(&a, "ann"), sign_in(&b, "bob"));
    let name = |cookie: &str| cookie.split('=').next().unwrap().to_string();
    assert_ne!(name(&cookie_a), name(&cookie_b));
    let page = |web: &Web, cookie: &str| {
        let response = web.client.get(web.url("/review")).header("cookie", cookie);
        response.send().unwrap().text().unwrap()
    };
    // As a browser sends them: both cookies to either port.
    let both = format!("{cookie_a}; {cookie_b}");
    assert!(page(&a, &both).contains("signed in as <strong>ann</strong>"));
    assert!(page(&b, &both).contains("signed in as <strong>bob</strong>"));
    // One server's session is none on the other.
    assert!(!page(&b, &cookie_a).contains("signed in as"));
}

#[test]
fn loopback_only_answers_to_loopback_names() {
    let env = Env::new(&[]);
    let web = Web::serve(&env);
    let response = web
        .client
        .get(web.url("/api/tasks"))
        .header("host", "evil.example")
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.text().unwrap().contains("evil.example"));
    assert_eq!(
        web.client
            .get(web.url("/api/tasks"))
            .header("host", "localhost:1234")
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn off_loopback_needs_a_token_to_start_and_to_read() {
    let env = Env::new(&[]);
    let refused = env.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without --token"),
        "{stderr}"
    );
    assert!(!env.db().exists(), "a refused serve created the database");
    let short = env.run(&["serve", "--token", "abc"]);
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 16 characters"));

    let web = Web::start(&env, &["serve", "--listen", "0.0.0.0:0", "--token", TOKEN]);
    let port = web.base.rsplit(':').next().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/tasks");
    assert_eq!(web.client.get(&url).send().unwrap().status(), 401);
    let page = web
        .client
        .get(format!("http://127.0.0.1:{port}/tasks"))
        .send()
        .unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/login?next=/tasks");
    assert_eq!(
        web.client
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_busy_address_is_named_once() {
    let env = Env::new(&[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = env.run(&["serve", "--listen", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
    assert!(stderr.contains("give another with --listen"), "{stderr}");
    assert!(
        !env.db().exists(),
        "a serve that could not listen created {}",
        env.db().display()
    );
    // Nor does a daemon whose --http port is taken.
    let out = env.run(&["daemon", "--until-idle", "--http", &addr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert!(
        !env.db().exists(),
        "a daemon that could not listen created the database"
    );
}

#[test]
fn a_generated_token_is_printed_and_works() {
    let env = Env::new(&["echo"]);
    let web = Web::start(&env, &["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(web.token.len(), 64);
    let (status, answer) = web.post("/api/tasks", r#"{"agent":"echo"}"#);
    assert_eq!(status, 201, "{answer}");
}

/// With `--json`, serve says where it is and its generated token in one
/// JSON line on stdout (a script could not read them out of the prose on
/// stderr); a database it cannot open is named.
#[test]
fn serve_announces_itself_as_json_and_names_a_bad_database() {
    use std::io::BufRead;
    let env = Env::new(&["echo"]);
    let mut child = env
        .cmd()
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .env_remove("COLONY_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let announced: Value = serde_json::from_str(&line).unwrap();
    let url = announced["url"].as_str().unwrap();
    let token = announced["token"].as_str().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (status, answer) = send(
        reqwest::blocking::Client::new()
            .post(format!("{url}api/tasks"))
            .bearer_auth(token)
            .body(r#"{"agent":"echo"}"#),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status, 201, "{answer}");

    let bad = env.file(
        "bad.db",
        "not a database at all, but long enough to be read as one".repeat(100),
    );
    let out = env
        .cmd()
        .args(["--db", &bad, "serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&bad) && said.contains("not a SQLite database"),
        "{said}"
    );
}

/// An approval over the API that did not take (its held set-if went stale)
/// says why, as the CLI does: it answered `{"state":"ready"}` alone.
#[test]
fn an_api_approval_that_did_not_take_says_why() {
    let env = Env::new(&["stateful"]);
    let first = env.submit(&["stateful", r#"{"increment":"k"}"#, "--review"]);
    let second = env.submit(&["stateful", r#"{"increment":"k"}"#, "--review"]);
    env.until_idle(&[]);
    let web = Web::serve(&env);
    let approve = r#"{"verdict":"approve"}"#;
    let (status, answer) = web.post(&format!("/api/tasks/{first}/review"), approve);
    assert_eq!(
        (status, &answer["state"]),
        (200, &json!("complete")),
        "{answer}"
    );
    assert!(answer.get("note").is_none(), "{answer}");
    let first_round = env.show(second)["review_round"].as_i64().unwrap();
    let (status, answer) = web.post(&format!("/api/tasks/{second}/review"), approve);
    assert_eq!(
        (status, &answer["state"]),
        (200, &json!("ready")),
        "{answer}"
    );
    let note = answer["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("did not take") && note.contains("stale") && note.contains("revision 1 of"),
        "{answer}"
    );
    // Run again into a new round: a decision on the round read before is
    // refused (409), one on the round shown now goes through.
    let read = env.show(second)["review_round"].clone();
    assert_eq!(read, Value::Null, "not in review: {read}");
    env.until_idle(&[]);
    let round = env.show(second)["review_round"].as_i64().unwrap();
    let before = env.snapshot();
    let on = |round: i64| format!(r#"{{"verdict":"approve","round":{round}}}"#);
    let (status, answer) = web.post(&format!("/api/tasks/{second}/review"), &on(first_round));
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("read it again"),
        "{answer}"
    );
    assert_eq!(env.snapshot(), before);
    let (status, answer) = web.post(&format!("/api/tasks/{second}/review"), &on(round));
    assert_eq!(
        (status, &answer["state"]),
        (200, &json!("complete")),
        "{answer}"
    );
}

/// A task whose reviewer agent failed for good says on its page that a
/// person decides, linking the reviewer's task.
#[test]
fn a_task_page_says_when_its_reviewer_failed() {
    let env = Env::new(&["echo", "panic"]);
    let id = env.submit(&["echo", "{}", "--reviewer", "panic", "--max-attempts", "1"]);
    env.until_idle(&[]);
    let web = Web::serve(&env);
    let page = web.page(&format!("/tasks/{id}"));
    assert!(
        page.contains("Its reviewer, <a href=\"/tasks/")
            && page.contains("failed: a person approves or rejects it."),
        "{page}"
    );
}

/// What a task wrote, held, spawned and will chain, as the pages show it.
/// Its "State writes" listed the entries it had written last, so a key
/// another task wrote over or deleted since vanished from the page; held
/// writes were a raw dump with values as strings, and the review page
/// showed neither them nor the spawned tasks approval creates; `--next`
/// tasks were on no page (found by a walkthrough).
#[test]
fn pages_show_what_a_task_wrote_holds_spawns_and_chains() {
    let env = Env::new(&["stateful", "spawner", "echo"]);
    let first = env.submit(&[
        "stateful",
        r#"{"ops": [["set", "agent", "shared", "1"], ["set", "agent", "gone", "2"]]}"#,
    ]);
    env.until_idle(&[]);
    let second = env.submit(&[
        "stateful",
        r#"{"ops": [["set", "agent", "shared", "3"], ["delete", "agent", "gone"]]}"#,
    ]);
    let held = env.submit(&["stateful", r#"{"ops": [["set", "agent", "nk", "null"], ["delete", "agent", "dk"], ["set", "agent", "obj", "{\"a\":1}"]]}"#, "--review"]);
    let spawner = env.submit(&[
        "spawner",
        r#"{"children": [{"agent": "echo", "payload": {"c": 1}}]}"#,
        "--review",
    ]);
    env.until_idle(&[]);
    // After the drain: an until-idle daemon waits for a task due in an hour.
    let chained = env.submit(&[
        "echo",
        "{}",
        "--in",
        "1h",
        "--next",
        r#"[{"agent": "echo", "payload": {"follow": 1}}]"#,
    ]);
    let web = Web::serve(&env);
    let text = |path: &str| web.page(path).replace("<code>", "").replace("</code>", "");
    // The first task's writes, written over and deleted since.
    let page = text(&format!("/tasks/{first}"));
    assert!(
        page.contains(">shared<") && page.contains(">gone<"),
        "{page}"
    );
    assert_eq!(page.matches("written over since").count(), 2, "{page}");
    let page = text(&format!("/tasks/{second}"));
    assert!(page.contains(">3<") && page.contains("deleted"), "{page}");
    // Held writes, a set to null told from a delete, values as JSON.
    let page = text(&format!("/tasks/{held}"));
    assert!(page.contains("Held until the review approves"), "{page}");
    assert!(
        page.contains("set to null") && page.contains(">delete<"),
        "{page}"
    );
    assert!(page.contains("set to {&quot;a&quot;:1}"), "{page}");
    // The review page shows what approval would make and create.
    let page = text("/review");
    assert!(
        page.contains("State writes (made on approval, in this order)"),
        "{page}"
    );
    assert!(
        page.contains("nk set to null") && page.contains("dk deleted"),
        "{page}"
    );
    assert!(
        page.contains("Tasks spawned (created on approval)"),
        "{page}"
    );
    assert!(page.contains("echo {&quot;c&quot;:1}"), "{page}");
    let page = text(&format!("/tasks/{spawner}"));
    assert!(page.contains("Spawned tasks"), "{page}");
    let page = text(&format!("/tasks/{chained}"));
    assert!(
        page.contains("Next tasks") && page.contains("follow"),
        "{page}"
    );
}

/// The review page lists the oldest 50 and says how many more wait: it
/// showed 50 of 55 without a word, and a reviewer took the queue for done.
#[test]
fn the_review_page_says_how_many_it_leaves_out() {
    let env = Env::new(&["echo"]);
    let lines: String = (0..55)
        .map(|i| {
            format!(
                "{}\n",
                json!({"agent": "echo", "payload": {"n": i}, "review": true})
            )
        })
        .collect();
    let batch = env.file("tasks.jsonl", lines);
    env.ok(&["submit", "--batch", &batch]);
    env.until_idle(&[]);
    let web = Web::serve(&env);
    let page = web.page("/review");
    assert_eq!(
        page.matches("<article class=\"review\"").count(),
        50,
        "{page}"
    );
    assert!(
        page.contains("The oldest 50 of 55 tasks in review"),
        "{page}"
    );
    assert!(page.contains("href=\"/tasks?state=review\""), "{page}");
}

#[test]
fn pages_and_api_lists_are_paginated_and_searchable() {
    let env = Env::new(&["echo"]);
    let lines: String = (0..120)
        .map(|i| format!("{}\n", json!({"agent": "echo", "payload": {"n": i, "tag": if i == 7 { "needle_x" } else { "hay" }}})))
        .collect();
    let batch = env.file("tasks.jsonl", lines);
    env.ok(&["submit", "--batch", &batch]);
    let web = Web::serve(&env);
    let first = web.get_json("/api/tasks?limit=50");
    let ids: Vec<i64> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (71..=120).rev().collect::<Vec<_>>());
    let second = web.get_json("/api/tasks?limit=50&before=71");
    assert_eq!(second[0]["id"], 70);
    assert_eq!(
        web.get_json("/api/tasks?limit=50&before=21")
            .as_array()
            .unwrap()
            .len(),
        20
    );
    let found = web.get_json("/api/tasks?q=NEEDLE_x");
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["payload"]["n"], 7);
    assert_eq!(
        web.get_json("/api/tasks?q=50%25").as_array().unwrap().len(),
        0,
        "% is literal"
    );
    // The next page is in a Link header (a search's short page may have
    // older matches, so a client cannot tell the end by its length).
    let link = |path: &str| {
        let response = web.get(path);
        response
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_string())
    };
    assert_eq!(
        link("/api/tasks?limit=50&agent=echo").as_deref(),
        Some("</api/tasks?before=71&agent=echo&limit=50>; rel=\"next\"")
    );
    assert_eq!(link("/api/tasks?limit=50&before=21"), None, "the last page");
    assert_eq!(
        link("/api/tasks?q=needle_x"),
        None,
        "the search covered every task"
    );
    let page = web.page("/tasks");
    assert!(page.contains("href=\"/tasks?before=71\""), "{page}");
    // A limit the reader chose carries to the next page.
    let page = web.page("/tasks?limit=50");
    assert!(
        page.contains("href=\"/tasks?before=71&amp;limit=50\""),
        "{page}"
    );
    assert!(web.page("/tasks?q=needle").contains("/tasks/8\""));
}

#[test]
fn events_stream_as_server_sent_events() {
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", "{}"]);
    let web = Web::serve(&env);
    let mut stream = web
        .client
        .get(web.url(&format!("/api/events?task={id}")))
        .header("accept", "text/event-stream")
        .send()
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    env.until_idle(&[]);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("\n\n").count() < 3 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let events: Vec<Value> = seen
        .split("\n\n")
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(&kinds[..3], ["submit", "claim", "complete"], "{seen}");
    assert!(seen.contains("id: 1\n"), "{seen}");
    // With a limit the stream ends after that many events.
    let mut limited = String::new();
    web.client
        .get(web.url(&format!("/api/events?task={id}&limit=2")))
        .header("accept", "text/event-stream")
        .send()
        .unwrap()
        .read_to_string(&mut limited)
        .unwrap();
    let ids: Vec<&str> = limited
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids.len(), 2, "{limited}");
    // A stop does not wait for the open stream.
    let status = web.stop();
    assert!(status.success(), "{status}");
    drop(stream);
}

/// A task's stream (its page's live updates) keeps up however many events
/// of other tasks come between: it waited half a second per 500 of them, so
/// an old task's page fell minutes behind a busy trail.
#[test]
fn a_tasks_stream_keeps_up_past_other_tasks_events() {
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", "{}"]);
    let other = env.submit(&["echo", "{}"]);
    env.database.raw().execute(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000)
         INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         SELECT 0, {other}, 'submit', NULL, 'ready', 'test', '{{}}' FROM n"
    ));
    env.ok(&["cancel", &id.to_string()]);
    let web = Web::serve(&env);
    let mut streamed = String::new();
    // At half a second per 500 events, the 60,000 in between took a minute.
    web.client
        .get(web.url(&format!("/api/events?task={id}&since=1&limit=1")))
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(30))
        .send()
        .unwrap()
        .read_to_string(&mut streamed)
        .unwrap();
    assert!(streamed.contains("\"event\":\"cancel\""), "{streamed}");
}

#[test]
fn a_daemon_serves_the_dashboard_while_it_runs() {
    let env = Env::new(&["echo"]);
    let web = Web::start(
        &env,
        &[
            "daemon",
            "--poll",
            "100ms",
            "--http",
            "127.0.0.1:0",
            "--token",
            TOKEN,
        ],
    );
    let (status, answer) = web.post("/api/tasks", r#"{"agent":"echo","payload":{"x":1}}"#);
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_i64().unwrap();
    wait_for(
        "the daemon to run the task",
        std::time::Duration::from_secs(60),
        || web.get_json(&format!("/api/tasks/{id}"))["state"] == "complete",
    );
    let counts: HashMap<String, Value> =
        serde_json::from_value(web.get_json("/api/status")["by_state"].clone()).unwrap();
    assert_eq!(counts["complete"], 1);
    let status = web.stop();
    assert!(status.success(), "{status}");
}

/// `--json daemon --http` prints JSON Lines: the serving line, then the
/// summary on one line (it was a pretty document after a compact line).
#[test]
fn a_json_daemon_with_http_prints_json_lines() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    let args = [
        "--json",
        "daemon",
        "--until-idle",
        "--poll",
        "100ms",
        "--http",
        "127.0.0.1:0",
    ];
    let stdout = env.ok(&args);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {stdout}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{stdout}"
    );
    assert_eq!(lines[1]["completed"], 1, "{stdout}");
}

#[test]
fn an_exported_token_does_not_stop_a_plain_daemon() {
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", "{}"]);
    let daemon = ["daemon", "--until-idle", "--poll", "100ms"];
    env.ok_with_env(&daemon, &[("COLONY_TOKEN", TOKEN)]);
    assert_eq!(env.show(id)["state"], "complete");
}

/// The SQLite file deleted under a running server: every request answers
/// 503 naming it (an open connection would still take writes into the
/// deleted file, and a new one would create a fresh empty database), and
/// `/healthz` says so. A daemon stops on it at its next heartbeat.
#[test]
fn a_deleted_database_file_is_refused_not_written_or_recreated() {
    let env = Env::new(&["echo"]);
    let web = Web::serve(&env);
    let (status, answer) = web.post("/api/tasks", r#"{"agent":"echo"}"#);
    assert_eq!(status, 201);
    let first = answer["id"].as_i64().unwrap();
    let daemon = env
        .cmd()
        .args(["daemon", "--heartbeat", "100ms", "--poll", "100ms"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon has the file open once it ran the task (a daemon that
    // opened it only after the deletion would create a fresh one).
    wait_for(
        "the daemon to run the task",
        std::time::Duration::from_secs(20),
        || env.queue().get(first).unwrap().state == colony::task::State::Complete,
    );
    let db = env.db();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }

    let (status, answer) = web.post("/api/tasks", r#"{"agent":"echo"}"#);
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("was moved or deleted while colony had it open"),
        "{answer}"
    );
    // More requests at once than the pool keeps open: new connections too.
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let url = web.url("/api/tasks/1");
            std::thread::spawn(move || reqwest::blocking::get(url).unwrap().status().as_u16())
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), 500);
    }
    let response = web.get("/api/status");
    assert_eq!(response.status().as_u16(), 500);
    assert!(
        response.headers().get("retry-after").is_none(),
        "no retry helps"
    );
    let health = web.get("/healthz");
    assert_eq!(health.status().as_u16(), 503);
    assert_eq!(
        health.text().unwrap(),
        "the database cannot be used: see the server's log"
    );
    assert!(!db.exists(), "a connection created a fresh database");

    let out = daemon.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("was moved or deleted while colony had it open"),
        "{stderr}"
    );
    assert!(!db.exists(), "the daemon created a fresh database");

    // Another file at the path (a submit creates one there): the server
    // does not adopt it, on the connections it had or on new ones.
    env.submit(&["echo"]);
    assert!(db.exists());
    let answers: Vec<_> = (0..12)
        .map(|_| {
            let url = web.url("/api/tasks");
            std::thread::spawn(move || {
                let response = reqwest::blocking::get(url).unwrap();
                (response.status().as_u16(), response.text().unwrap())
            })
        })
        .collect();
    for answer in answers {
        let (status, text) = answer.join().unwrap();
        assert_eq!(status, 500, "{text}");
        assert!(text.contains("was replaced by another file"), "{text}");
    }
}

/// A task's page says its timeout, backoff and its chain's token budget.
#[test]
fn the_task_page_says_its_bounds() {
    let env = Env::new(&["echo"]);
    let (root, child) = env.budgeted_chain();
    let web = Web::serve(&env);
    let page = web.page(&format!("/tasks/{root}"));
    assert!(
        page.contains("<td>9s</td>")
            && page.contains("500 tokens for this task and every task chained"),
        "{page}"
    );
    let page = web.page(&format!("/tasks/{child}"));
    assert!(
        page.contains(&format!(
            "500 tokens for the chain of <a href=\"/tasks/{root}\">#{root}</a>"
        )),
        "{page}"
    );
}

/// A proposed effect shows a reviewer the agent's headers, the body's
/// first lines saying what they leave out, and the whole body behind a
/// click, on the review page and the task's page.
#[test]
fn a_reviewer_sees_a_proposed_effects_headers_and_whole_body() {
    let env = Env::new(&["stateful"]);
    std::fs::write(
        env.agents.path().join("stateful.toml"),
        "allowed_hosts = [\"http://127.0.0.1:9\"]\n",
    )
    .unwrap();
    let body =
        "{\n  \"to\": \"acct-123\",\n  \"memo\": \"refund\",\n  \"amount_cents\": 99999900\n}";
    let payload = serde_json::json!({
        "ops": [["effect", "POST", "http://127.0.0.1:9/pay", body, {"X-Request": "r-7"}]],
        "review": true
    });
    let id = env.submit(&["stateful", &payload.to_string()]);
    env.until_idle(&[]);
    let web = Web::serve(&env);
    for path in ["/review".to_string(), format!("/tasks/{id}")] {
        let page = web.page(&path);
        assert!(
            page.contains("X-Request: r-7")
                && page.contains("… 28 more bytes")
                && page.contains("<summary>the whole body (70 bytes)</summary>")
                && page.contains("&quot;amount_cents&quot;: 99999900"),
            "{path}: {page}"
        );
    }
}
