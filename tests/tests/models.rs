//! Model calls through the host (issue 10): the `thinker` fixture calls the
//! `model` import against a real loopback server speaking the OpenAI and
//! Anthropic protocols, through the real runtime, daemon and queue.

mod common;

use std::path::Path;
use std::sync::Arc;

use colony::models::{ModelsConfig, Providers};
use colony::task::{NewTask, NextSpec, State};
use colony_tests::agents_dir_with;
use colony_tests::model_server::{ModelServer, Scripted};
use common::Harness;
use serde_json::{Value, json};

const SECRET: &str = "sk-test-secret-do-not-leak";

struct Env {
    h: Harness,
    server: ModelServer,
    providers: Arc<Providers>,
}

/// The `thinker` and `legacy` fixtures, `thinker.toml` holding `manifest`,
/// and two aliases on one loopback server: `fast` (OpenAI) and `smart`
/// (Anthropic), both with the key in a variable only the host reads.
fn env(manifest: &str) -> Env {
    let agents = agents_dir_with(&["thinker", "legacy"]);
    std::fs::write(agents.path().join("thinker.toml"), manifest).unwrap();
    let server = ModelServer::start();
    let config = format!(
        r#"
[models.fast]
api = "openai"
base_url = "{}"
model = "fake-fast"
api_key_env = "THINKER_KEY"
timeout = "10s"
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0

[models.smart]
api = "anthropic"
base_url = "{}"
model = "fake-smart"
api_key_env = "THINKER_KEY"
timeout = "10s"

[models.limited]
api = "openai"
base_url = "{}"
model = "fake-limited"
api_key_env = "THINKER_KEY"
timeout = "10s"
requests_per_minute = 1

[models.queued]
api = "openai"
base_url = "{}"
model = "fake-queued"
api_key_env = "THINKER_KEY"
timeout = "60s"
requests_per_minute = 2
"#,
        server.openai_url(),
        server.url(),
        server.openai_url(),
        server.openai_url()
    );
    let config = ModelsConfig::from_toml(&config, Path::new("colony.toml")).unwrap();
    let providers = Providers::with_env(&config, |var| {
        (var == "THINKER_KEY").then(|| SECRET.to_string())
    })
    .unwrap();
    Env {
        h: Harness::with_shared_cache(agents),
        server,
        providers: Arc::new(providers),
    }
}

impl Env {
    async fn run(&self) {
        let mut runtime = self.h.runtime();
        runtime.set_models(self.providers.clone());
        self.h.run_until_idle_on(runtime).await;
    }

    fn think(&self, script: Value) -> i64 {
        let mut task = NewTask::new("thinker", script.to_string());
        task.backoff_ms = 1;
        self.h.submit(task)
    }

    fn result(&self, id: i64) -> Value {
        let task = self.h.task(id);
        assert_eq!(task.state, State::Complete, "{:?}", task.error);
        task.result.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_reaches_the_agent_and_the_call_is_journaled_and_metered() {
    let e = env(r#"models = ["fast"]"#);
    e.server
        .push(Scripted::answer_with_usage("Bonjour", 40, 10));
    let id = e.think(json!({"prompts": ["say hello in French"]}));
    e.run().await;

    let result = e.result(id);
    assert_eq!(result["replies"][0]["content"], "Bonjour");
    assert_eq!(result["replies"][0]["replayed"], false);
    assert_eq!(result["replies"][0]["usage"], json!([40, 10]));
    assert_eq!(
        result["remaining_before"],
        Value::Null,
        "no budget: unlimited"
    );

    let request = e.server.last_request();
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(request.body["model"], "fake-fast");
    assert_eq!(
        request.body["messages"][0]["content"],
        "say hello in French"
    );

    let q = e.h.queue();
    let usage = q.usage(id).unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.calls,
            usage.replayed
        ),
        (40, 10, 1, 0)
    );
    let cost = usage.cost_usd.unwrap();
    assert!((cost - (40.0 + 20.0) / 1e6).abs() < 1e-12, "{cost}");
    let calls = q.model_calls(id).unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (
            calls[0].attempt,
            calls[0].seq,
            calls[0].model.as_str(),
            calls[0].status.as_str()
        ),
        (1, 1, "fast", "ok")
    );
    let events = e.h.events(id, "model_call");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].detail["input_tokens"], 40);
    let detail = events[0].detail.to_string();
    assert!(
        !detail.contains("French") && !detail.contains("Bonjour"),
        "no prompt or reply text on the audit trail: {detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_reaches_the_provider_and_never_the_guest() {
    let e = env(r#"models = ["smart"]"#);
    let id = e.think(json!({"model": "smart", "prompts": ["hi"], "dump_env": true}));
    e.run().await;
    let result = e.result(id);
    assert_eq!(result["env"], json!([]), "the guest sees no environment");
    let request = e.server.last_request();
    assert_eq!(request.path, "/v1/messages");
    assert_eq!(request.header("x-api-key"), Some(SECRET));
    let stored = format!("{}{}", e.h.task(id).result.unwrap(), e.h.log(id));
    assert!(
        !stored.contains(SECRET) && !stored.contains("127.0.0.1"),
        "{stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_round_trip_reaches_the_agent_and_back() {
    let e = env(r#"models = ["fast"]"#);
    e.server
        .push(Scripted::tool_call("lookup", json!({"word": "colony"})));
    e.server.push(Scripted::answer("a group of ants"));
    let id = e.think(json!({"prompts": ["what is a colony?"], "tool": true}));
    e.run().await;
    let result = e.result(id);
    assert_eq!(result["replies"][0]["finish"], "Finish::ToolCalls");
    assert_eq!(result["replies"][0]["tool_calls"][0][1], "lookup");
    assert_eq!(result["replies"][1]["content"], "a group of ants");
    let second = &e.server.requests()[1].body;
    assert_eq!(second["tools"][0]["function"]["name"], "lookup");
    let messages = second["messages"].as_array().unwrap();
    let tool_answer = messages
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("a tool message");
    assert_eq!(tool_answer["tool_call_id"], "call_lookup");
    assert_eq!(messages[1]["tool_calls"][0]["function"]["name"], "lookup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_the_manifest_does_not_grant_is_refused_without_a_request() {
    let e = env("");
    let id = e.think(json!({"prompts": ["hi"], "on_error": "continue"}));
    let unknown = e.think(json!({"model": "gpt-9", "prompts": ["hi"], "on_error": "continue"}));
    // An alias longer than any a host configures is kept cut: in the
    // refusal, the journal and the trail (20 MB names filled gigabytes).
    let huge =
        e.think(json!({"model": "m".repeat(100_000), "prompts": ["hi"], "on_error": "continue"}));
    e.run().await;
    let said = e.result(huge)["errors"][0].as_str().unwrap().to_string();
    assert!(
        said.contains(&format!("no model alias \"{}…\"", "m".repeat(64))),
        "{said}"
    );
    assert!(said.len() < 300, "{said}");
    let journaled = &e.h.queue().model_calls(huge).unwrap()[0];
    assert_eq!(journaled.model, format!("{}…", "m".repeat(64)));
    let errors = &e.result(id)["errors"];
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with("not_granted: this agent's manifest grants no models"),
        "{errors}"
    );
    let errors = &e.result(unknown)["errors"];
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("no model alias \"gpt-9\""),
        "{errors}"
    );
    assert_eq!(e.server.count(), 0);
    assert_eq!(
        e.h.queue().model_calls(id).unwrap()[0].status,
        "not_granted"
    );
    // Nothing to spend, said without asking the queue.
    assert_eq!(
        (
            &e.result(id)["remaining_before"],
            &e.result(id)["remaining_after"]
        ),
        (&json!(0), &json!(0))
    );
}

/// A guest calling an alias it is not granted in a loop cannot fill the
/// journal: 100 refusals are journaled, later calls are refused at once
/// unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_model_calls_in_a_loop_are_journaled_up_to_a_limit() {
    let e = env("");
    let prompts: Vec<String> = (0..150)
        .map(|i| format!("prompt {i} {}", "x".repeat(1000)))
        .collect();
    let id = e.think(json!({"prompts": prompts, "on_error": "continue"}));
    e.run().await;
    let errors = e.result(id)["errors"].clone();
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 150);
    assert!(
        errors[99].as_str().unwrap().starts_with("not_granted"),
        "{}",
        errors[99]
    );
    assert!(
        errors[100]
            .as_str()
            .unwrap()
            .contains("this host refused 100 of this run's model calls"),
        "{}",
        errors[100]
    );
    // Refused as the calls before it were, so the agent still learns why
    // (it read as rate limited, which invites waiting and trying again).
    let past_cap = errors[100].as_str().unwrap();
    assert!(
        past_cap.starts_with("not_granted") && past_cap.contains("(the last: "),
        "{past_cap}"
    );
    assert_eq!(e.h.queue().model_calls(id).unwrap().len(), 100);
    assert_eq!(e.h.events(id, "model_call").len(), 100);
    assert_eq!(e.server.count(), 0);
    // Counted as refused, not as calls made: none reached a provider.
    let usage = e.h.queue().usage(id).unwrap();
    assert_eq!((usage.calls, usage.refused), (0, 100), "{usage:?}");
}

/// This host's own rate limit refuses at once, before any provider: those
/// refusals count against the same cap (they used to be journaled with
/// their prompts without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_by_this_hosts_rate_limit_are_journaled_up_to_the_limit() {
    let e = env("models = [\"limited\"]");
    let prompts: Vec<String> = (0..150).map(|i| format!("prompt {i}")).collect();
    let id = e.think(json!({"model": "limited", "prompts": prompts, "on_error": "continue"}));
    e.run().await;
    let result = e.result(id);
    let errors = result["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 149, "the first call went through");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("this host's rate limit"),
        "{}",
        errors[0]
    );
    assert!(
        errors[100]
            .as_str()
            .unwrap()
            .contains("this host refused 100"),
        "{}",
        errors[100]
    );
    assert_eq!(e.server.count(), 1);
    assert_eq!(e.h.queue().model_calls(id).unwrap().len(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_stops_the_second_call_before_the_provider_and_fails_for_good() {
    let e = env("models = [\"fast\"]\ntoken_budget = 200");
    e.server.push(Scripted::answer_with_usage("first", 100, 50));
    let id = e.think(json!({"prompts": ["one", "two"], "max_tokens": 50}));
    e.run().await;
    let task = e.h.task(id);
    assert_eq!(task.state, State::Failed);
    let error = task.error.unwrap();
    assert_eq!(error.kind.as_str(), "budget_exceeded", "{}", error.message);
    assert_eq!(task.attempts, 1, "a budget stop is not retried");
    assert_eq!(
        e.server.count(),
        1,
        "the second call never reached the provider"
    );
    let calls = e.h.queue().model_calls(id).unwrap();
    assert_eq!(
        calls.iter().map(|c| c.status.as_str()).collect::<Vec<_>>(),
        ["ok", "budget_exceeded"]
    );
}

/// A task that failed on its chain's budget runs again when a retry gives
/// the chain more; a retry offering no more than was spent is refused and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_a_larger_token_budget_lets_a_task_past_its_budget() {
    let e = env("models = [\"fast\"]");
    e.server.push(Scripted::answer_with_usage("first", 100, 50));
    let mut task = NewTask::new(
        "thinker",
        json!({"prompts": ["one", "two"], "max_tokens": 50}).to_string(),
    );
    task.backoff_ms = 1;
    task.token_budget = Some(200);
    let id = e.h.submit(task);
    e.run().await;
    let failed = e.h.task(id);
    assert_eq!(failed.error.unwrap().kind.as_str(), "budget_exceeded");
    let mut q = e.h.queue();
    let err = q.retry_with_token_budget(id, Some(150)).unwrap_err();
    assert!(
        err.to_string().contains("has spent 150 tokens already"),
        "{err}"
    );
    assert_eq!(
        e.h.task(id).state,
        State::Failed,
        "a refused retry changes nothing"
    );
    q.retry_with_token_budget(id, Some(1000)).unwrap();
    e.run().await;
    assert_eq!(
        e.h.task(id).state,
        State::Complete,
        "{:?}",
        e.h.task(id).error
    );
    let retry = e.h.events(id, "retry").remove(0);
    assert_eq!(
        retry.detail["token_budget"],
        json!({"chain": id, "old": 200, "new": 1000, "spent": 150})
    );
}

/// A reply cut off after the provider answered 200 is spent from the
/// budget (as its reservation: it was most likely charged), so a budget
/// cannot be drained through replies the host never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_reply_is_spent_from_the_budget() {
    let e = env("models = [\"fast\"]\ntoken_budget = 100");
    e.server.push(Scripted::CutOff);
    let id = e.think(json!({"prompts": ["one", "two"], "max_tokens": 50, "on_error": "continue"}));
    e.run().await;
    assert_eq!(
        e.server.count(),
        1,
        "not retried, and the second call was refused"
    );
    let calls = e.h.queue().model_calls(id).unwrap();
    assert_eq!(
        calls.iter().map(|c| c.status.as_str()).collect::<Vec<_>>(),
        ["unavailable", "budget_exceeded"]
    );
    assert_eq!(calls[0].output_tokens, 50, "{calls:?}");
    assert!(calls[0].input_tokens > 0, "{calls:?}");
    assert!(calls[0].cost_usd.is_some_and(|c| c > 0.0), "{calls:?}");
}

/// A call still in flight when its run's deadline passed may have been
/// answered and charged: its reservation stays spent from the budget, and
/// the next attempt starts with that much less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_by_the_deadline_stays_spent_from_the_budget() {
    let e = env("models = [\"fast\"]");
    e.server.push(Scripted::Hang);
    e.server.push(Scripted::answer_with_usage("second", 10, 5));
    let mut task = NewTask::new(
        "thinker",
        json!({"prompts": ["one"], "max_tokens": 50}).to_string(),
    );
    task.backoff_ms = 1;
    task.timeout_ms = Some(1_000);
    task.token_budget = Some(300);
    let id = e.h.submit(task);
    e.run().await;
    let result = e.result(id);
    assert_eq!(e.h.task(id).attempts, 2, "the first attempt timed out");
    let remaining = result["remaining_before"].as_u64().unwrap();
    assert!(
        remaining <= 250,
        "the hung call's reservation (50 max-tokens and the prompt) still counts: {result}"
    );
    assert_eq!(result["remaining_after"].as_u64().unwrap(), remaining - 15);
    let usage = e.h.queue().usage(id).unwrap();
    assert_eq!(
        (
            usage.input_tokens + usage.output_tokens,
            usage.reserved_tokens
        ),
        (15, 300 - remaining),
        "charged apart from reserved"
    );
    // The cut-off call was made, and says so: journaled charged nothing,
    // its reservation kept (it was counted nowhere, and the provider had it).
    assert_eq!(usage.calls, 2, "{usage:?}");
    let calls = e.h.queue().model_calls(id).unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let cut = &calls[0];
    assert_eq!(
        (cut.run, cut.status.as_str(), cut.sent),
        (1, "unavailable", true),
        "{cut:?}"
    );
    assert_eq!(cut.input_tokens + cut.output_tokens, 0, "{cut:?}");
    let events = e.h.queue().events(Some(id), 0, 100).unwrap();
    let said: Vec<&serde_json::Value> = events
        .iter()
        .filter(|ev| ev.event == "model_call")
        .map(|ev| &ev.detail)
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert_eq!(said[0]["cut_off"], true, "{said:?}");
    assert_eq!(
        said[0]["tokens_reserved"].as_u64(),
        Some(300 - remaining),
        "{said:?}"
    );
    assert_eq!(said[1].get("cut_off"), None, "{said:?}");
}

/// A call whose turn under this host's rate limit would come after its
/// run's deadline is refused at once, saying so (it waited, and the run
/// ended as a bare timeout), and the budget counts only what was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_rate_limit_would_hold_past_the_runs_deadline_is_refused_at_once() {
    let e = env("models = [\"queued\"]");
    let mut task = NewTask::new(
        "thinker",
        json!({"model": "queued", "prompts": ["one", "two", "three"], "max_tokens": 50})
            .to_string(),
    );
    task.timeout_ms = Some(5_000);
    task.max_attempts = 1;
    task.token_budget = Some(1_000);
    let id = e.h.submit(task);
    e.run().await;
    let failed = e.h.task(id);
    let error = failed.error.as_ref().expect("failed");
    assert!(
        error.message.contains("rate_limited")
            && error.message.contains("would hold the call for ")
            && error.message.contains("past its run's deadline"),
        "{failed:?}"
    );
    let calls = e.h.queue().model_calls(id).unwrap();
    let sent: Vec<bool> = calls.iter().map(|c| c.sent).collect();
    assert_eq!(
        sent,
        [true, true, false],
        "the third refused, journaled: {calls:?}"
    );
    assert_eq!(e.server.count(), 2, "the third call was not sent");
    // The two calls sent were charged 17 tokens each; the third reserved
    // nothing.
    e.h.queue().retry_with_token_budget(id, Some(35)).unwrap();
}

/// A call waiting to retry (the provider answered 429) when its daemon
/// stops has its tokens set aside but no request out: its reservation is
/// released before the daemon's run ends. (The release was a write spawned
/// as the run was dropped, and a process that ended right after its
/// shutdown lost it: the call then counted against the budget for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_at_shutdown_is_released_before_the_daemon_ends() {
    let e = env("models = [\"fast\"]");
    e.server.push(Scripted::answer("one"));
    e.server.push(Scripted::answer("two"));
    e.server.push(Scripted::rate_limited(5));
    let mut task = NewTask::new(
        "thinker",
        json!({"prompts": ["one", "two", "three"], "max_tokens": 50}).to_string(),
    );
    task.token_budget = Some(1_000);
    let id = e.h.submit(task);
    let mut runtime = e.h.runtime();
    runtime.set_models(e.providers.clone());
    let cfg = colony::orchestrator::DaemonConfig {
        grace: std::time::Duration::from_millis(100),
        ..Harness::until_idle()
    };
    let daemon = e.h.start_daemon(runtime, cfg).await;
    let queue = e.h.queue();
    // The third call has reserved its tokens and waits to retry.
    common::wait_for("the third call to wait for its retry", || {
        e.server.count() == 3 && queue.usage(id).is_ok_and(|u| u.reserved_tokens > 0)
    })
    .await;
    daemon.stop().await;
    let usage = queue.usage(id).unwrap();
    assert_eq!(
        (usage.reserved_tokens, usage.calls),
        (0, 2),
        "only the two calls answered count once the daemon has stopped: {usage:?}"
    );
    assert_eq!(e.h.task(id).state, State::Ready, "given back at shutdown");
}

/// A run stopped by its budget was interrupted by the host, not answered
/// by its agent: the retry its error suggests (`--token-budget N`, more
/// than was spent) replays the calls already paid for and pays only for
/// the rest. It paid for them again, and a budget raised to cover the one
/// call left ran out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_its_budget_ran_out_replays_the_calls_it_paid_for() {
    let e = env(r#"models = ["fast"]"#);
    for text in ["one", "two", "three", "four"] {
        e.server.push(Scripted::answer_with_usage(text, 10, 18));
    }
    let mut task = NewTask::new(
        "thinker",
        json!({"prompts": ["a", "b", "c", "d"], "max_tokens": 20}).to_string(),
    );
    task.token_budget = Some(100);
    let id = e.h.submit(task);
    e.run().await;
    let failed = e.h.task(id);
    let kind = failed.error.as_ref().map(|e| e.kind.as_str());
    assert_eq!(kind, Some("budget_exceeded"), "{failed:?}");
    assert_eq!(
        e.server.count(),
        3,
        "84 of 100 tokens spent: the fourth call is refused"
    );

    e.h.queue().retry_with_token_budget(id, Some(150)).unwrap();
    e.run().await;
    let result = e.result(id);
    let replayed = colony_tests::model_server::replayed(&result);
    assert_eq!(replayed, [true, true, true, false], "{result}");
    assert_eq!(e.server.count(), 4, "only the fourth call was paid for");
    assert_eq!(e.h.queue().chain_budget(id).unwrap().spent, 4 * 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_spends_from_its_roots_budget() {
    let e = env(r#"models = ["fast"]"#);
    e.server.push(Scripted::answer_with_usage("root", 100, 50));
    e.server
        .push(Scripted::answer_with_usage("child 1", 100, 50));
    let child = json!({"prompts": ["c1", "c2"], "max_tokens": 50});
    let mut root = NewTask::new(
        "thinker",
        json!({"prompts": ["r"], "max_tokens": 50}).to_string(),
    );
    root.token_budget = Some(300);
    root.next = vec![NextSpec {
        agent: "thinker".into(),
        payload: child,
        priority: 0,
        review: false,
        next: vec![],
    }];
    let root = e.h.submit(root);
    e.run().await;
    let result = e.result(root);
    assert_eq!(result["remaining_before"], 300);
    assert_eq!(result["remaining_after"], 150);
    let q = e.h.queue();
    let child = q.children(root).unwrap().remove(0).unwrap();
    assert_eq!(child.state, State::Failed);
    assert_eq!(child.error.unwrap().kind.as_str(), "budget_exceeded");
    assert_eq!(e.server.count(), 2, "root's call and the child's first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_then_an_answer_is_one_call_of_one_attempt() {
    let e = env(r#"models = ["fast"]"#);
    e.server.push(Scripted::rate_limited(1));
    e.server.push(Scripted::answer("after the wait"));
    let id = e.think(json!({"prompts": ["hi"]}));
    e.run().await;
    assert_eq!(e.result(id)["replies"][0]["content"], "after the wait");
    assert_eq!(e.h.task(id).attempts, 1);
    assert_eq!(e.server.count(), 2);
    assert_eq!(e.h.queue().usage(id).unwrap().calls, 1);
}

/// A `Retry-After` that would leave less than a quarter of the timeout for
/// the answer is not waited out, and the error says why in numbers that
/// hold (it said "8s, longer than is left of the timeout of 10s").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_asking_too_long_a_wait_gives_up_saying_why() {
    let e = env(r#"models = ["fast"]"#);
    e.server.push(Scripted::rate_limited(8));
    let id = e.think(json!({"prompts": ["hi"], "on_error": "continue"}));
    e.run().await;
    let errors = e.result(id)["errors"].to_string();
    assert!(
        errors.contains(
            "asks to wait 8s, which leaves less than a quarter of the call's timeout of 10s"
        ),
        "{errors}"
    );
    assert_eq!(e.server.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_trap_replays_the_journal_instead_of_paying_again() {
    let e = env(r#"models = ["fast"]"#);
    for text in ["one", "two", "three"] {
        e.server.push(Scripted::answer_with_usage(text, 10, 10));
    }
    let id = e.think(json!({"prompts": ["a", "b", "c"], "panic_after": 2}));
    e.run().await;
    let result = e.result(id);
    let replies = result["replies"].as_array().unwrap();
    let seen: Vec<(&str, bool)> = replies
        .iter()
        .map(|r| {
            (
                r["content"].as_str().unwrap(),
                r["replayed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("one", true), ("two", true), ("three", false)]);
    assert_eq!(e.server.count(), 3, "the first two calls were paid once");
    let usage = e.h.queue().usage(id).unwrap();
    assert_eq!(
        (usage.calls, usage.replayed, usage.input_tokens),
        (3, 2, 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_agents_own_failure_calls_afresh() {
    let e = env(r#"models = ["fast"]"#);
    let id = e.think(json!({"prompts": ["a", "b"], "fail": "retryable"}));
    e.run().await;
    let result = e.result(id);
    assert!(
        result["replies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["replayed"] == false)
    );
    assert_eq!(e.server.count(), 4);
    assert_eq!(e.h.queue().usage(id).unwrap().replayed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_built_against_0_1_0_still_runs() {
    let e = env("");
    let id = e.h.submit(NewTask::new("legacy", r#"{"n": 7}"#));
    e.run().await;
    let result = e.result(id);
    assert_eq!(
        result,
        json!({"contract": "0.1.0", "echo": {"n": 7}, "attempt": 1})
    );
    assert!(e.h.log(id).contains("legacy agent ran"));
}

/// Hooks whose lease stays in doubt until the test says otherwise, as a
/// daemon's do while its heartbeat is held up.
#[derive(Default)]
struct InDoubt {
    waiting: std::sync::atomic::AtomicBool,
    vouched: tokio::sync::Notify,
}

#[colony::runtime::async_trait]
impl colony::runtime::RunHooks for InDoubt {
    fn progress(&self, _lease: colony::task::Lease, _progress: Option<String>) {}

    async fn wait_while_lease_in_doubt(&self, _lease: colony::task::Lease) {
        self.waiting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.vouched.notified().await;
    }
}

/// A model call waits, unsent, while its run's lease is in doubt (its
/// daemon's heartbeat held up for nearly `--stale-after`), and goes out
/// once the lease is vouched for again. The daemon's side of it: `http.rs`,
/// `a_request_waits_while_the_daemons_heartbeat_is_held_up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_not_sent_while_its_lease_is_in_doubt() {
    let e = env(r#"models = ["fast"]"#);
    e.server.push(Scripted::answer("later"));
    let mut runtime = e.h.runtime();
    runtime.set_models(e.providers.clone());
    let agents = e.h.agent_dir(&runtime).await;
    let agent = agents.loaded("thinker").unwrap();
    let hooks = Arc::new(InDoubt::default());
    let input = colony::task::ClaimedTask {
        lease: colony::task::Lease {
            task_id: 1,
            token: 1,
        },
        agent: "thinker".into(),
        chain: 1,
        payload: json!({"prompts": ["hello"]}).to_string(),
        attempt: 1,
        max_attempts: 1,
        parent_result: None,
        feedback: None,
        timeout_ms: None,
    };
    let run = tokio::spawn({
        let hooks = hooks.clone();
        async move { runtime.run(&agent, &input, hooks).await }
    });
    common::wait_for("the call to wait", || {
        hooks.waiting.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        e.server.count(),
        0,
        "nothing sent while the lease is in doubt"
    );
    hooks.vouched.notify_one();
    let report = run.await.unwrap();
    assert_eq!(e.server.count(), 1);
    match report.outcome {
        colony::task::RunOutcome::Success { output, .. } => {
            assert!(output.contains("later"), "{output}")
        }
        other => panic!("{other:?}"),
    }
}
