//! Model providers against a real loopback server (`colony_tests::model_server`)
//! through the real HTTP client: request shapes on both APIs, keys, retries,
//! timeouts, limits, and the errors an agent would see.

use std::path::Path;
use std::time::{Duration, Instant};

use colony::models::{
    ChatRequest, ConfigError, Finish, Message, ModelError, ModelsConfig, Providers, Tool, Usage,
    estimate_prompt_tokens, request_hash,
};
use colony_tests::model_server::{ModelServer, Scripted};
use serde_json::json;

const KEY: &str = "sk-test-0123456789";

/// An alias `fast` (OpenAI protocol) on `server`, with `extra` keys.
fn openai_alias(server: &ModelServer, extra: &str) -> String {
    format!(
        "[models.fast]\napi = \"openai\"\nbase_url = \"{}\"\nmodel = \"llama3.2\"\n{extra}\n",
        server.openai_url()
    )
}

/// An alias `smart` (Anthropic protocol) on `server`, with `extra` keys.
fn anthropic_alias(server: &ModelServer, extra: &str) -> String {
    format!(
        "[models.smart]\napi = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\n{extra}\n",
        server.url()
    )
}

/// Providers for `toml`, where the variable `TEST_KEY` holds [`KEY`].
fn providers_for(toml: &str) -> Providers {
    let config = ModelsConfig::from_toml(toml, Path::new("colony.toml")).expect("a valid config");
    Providers::with_env(&config, |var| (var == "TEST_KEY").then(|| KEY.to_string()))
        .expect("providers")
}

fn ask(alias: &str, text: &str) -> ChatRequest {
    ChatRequest {
        model: alias.into(),
        messages: vec![Message::system("Be brief."), Message::user(text)],
        ..ChatRequest::default()
    }
}

fn lookup_tool() -> Tool {
    Tool {
        name: "lookup".into(),
        description: "Looks a word up in the dictionary".into(),
        parameters:
            r#"{"type":"object","properties":{"word":{"type":"string"}},"required":["word"]}"#
                .into(),
    }
}

/// An error with its sources, as the CLI prints it.
fn full_message(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

#[test]
fn config_errors_name_file_alias_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("colony.toml");
    let shown = path.display().to_string();
    let cases = [
        (
            "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\ntemprature = 1\n",
            "[models.fast] key `temprature`: unknown key",
        ),
        (
            "[models.fast]\napi = \"foo\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n",
            "[models.fast] key `api`: unknown api \"foo\" (use \"openai\" or \"anthropic\")",
        ),
        (
            "[modles.fast]\napi = \"openai\"\n",
            "unknown section `modles`",
        ),
        (
            "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nmax_tokens_field = \"max_output\"\n",
            "[models.fast] key `max_tokens_field`: \"max_output\": use \"max_tokens\" or \"max_completion_tokens\"",
        ),
        (
            "[models.fast]\napi = \"anthropic\"\nbase_url = \"http://127.0.0.1:1\"\nmodel = \"m\"\nmax_tokens_field = \"max_tokens\"\n",
            "[models.fast] key `max_tokens_field`: is for api = \"openai\" only",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&path, text).unwrap();
        let err = ModelsConfig::load(&path).expect_err(text);
        let message = full_message(&err);
        assert!(message.starts_with(&shown), "{message}");
        assert!(
            message.contains(expected),
            "{message}\nexpected: {expected}"
        );
    }

    // A key variable that is unset, or set but empty, stops start-up.
    let text = "[models.smart]\napi = \"anthropic\"\nbase_url = \"https://api.example.com\"\n\
                model = \"m\"\napi_key_env = \"COLONY_TEST_SURELY_UNSET_KEY_7F3A\"\n";
    std::fs::write(&path, text).unwrap();
    let config = ModelsConfig::load(&path).unwrap();
    for err in [
        Providers::new(&config).unwrap_err(),
        Providers::with_env(&config, |_| Some("  ".into())).unwrap_err(),
    ] {
        assert!(matches!(err, ConfigError::MissingKey { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{shown}: [models.smart] key `api_key_env`: the environment variable \
                 `COLONY_TEST_SURELY_UNSET_KEY_7F3A` is not set or is empty"
            )
        );
    }
    // A key pasted in place of the variable's name (a valid name when it
    // is letters, digits and `_`) is not printed back whole.
    let pasted = "gsk_REALSECRETKEY0123456789";
    let text = text.replace("COLONY_TEST_SURELY_UNSET_KEY_7F3A", pasted);
    let err = Providers::new(&ModelsConfig::from_toml(&text, &path).unwrap()).unwrap_err();
    let message = err.to_string();
    assert!(!message.contains("REALSECRET"), "{message}");
    assert!(message.contains("`gsk_…` (27 characters"), "{message}");

    // The providers' Debug output never shows a key.
    let providers = Providers::with_env(&config, |_| Some(KEY.into())).unwrap();
    assert!(!format!("{providers:?}").contains(KEY));
}

#[tokio::test]
async fn openai_answer_with_usage_and_bearer_key() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "api_key_env = \"TEST_KEY\""));
    server.push(Scripted::answer_with_usage("Hello, commuter.", 30, 7));
    let mut req = ask("fast", "Greet a commuter");
    req.temperature = Some(0.2);
    let reply = providers.complete(&req).await.unwrap();
    assert_eq!(reply.content, "Hello, commuter.");
    assert_eq!(reply.finish, Finish::Stop);
    assert_eq!(reply.usage, Usage::new(30, 7));
    assert_eq!(reply.model, "llama3.2");

    assert_eq!(server.count(), 1);
    let sent = server.last_request();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.header("x-api-key"), None);
    assert_eq!(sent.body["model"], "llama3.2");
    assert_eq!(sent.body["max_tokens"], 1024, "the alias default");
    assert_eq!(sent.body["temperature"], 0.2);
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Greet a commuter"},
        ])
    );
    assert!(sent.body.get("response_format").is_none());
    assert!(sent.body.get("tools").is_none());

    // JSON mode, an explicit max_tokens, and no key for a local server.
    let local = providers_for(&openai_alias(&server, ""));
    let req = ChatRequest {
        json: true,
        max_tokens: Some(64),
        ..ask("fast", "{}")
    };
    local.complete(&req).await.unwrap();
    let sent = server.last_request();
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(sent.body["response_format"], json!({"type": "json_object"}));
    assert_eq!(sent.body["max_tokens"], 64);

    // An alias may send the limit as max_completion_tokens, which OpenAI's
    // reasoning models require (they refuse max_tokens: every call failed).
    let reasoning = providers_for(&openai_alias(
        &server,
        "max_tokens_field = \"max_completion_tokens\"",
    ));
    reasoning.complete(&req).await.unwrap();
    let sent = server.last_request();
    assert_eq!(sent.body["max_completion_tokens"], 64);
    assert!(sent.body.get("max_tokens").is_none(), "{}", sent.body);
}

/// OpenAI's own API gets the reply limit as max_completion_tokens, which
/// its reasoning models require; other OpenAI-compatible servers get
/// max_tokens, which they read.
#[test]
fn the_reply_limit_field_follows_the_api() {
    let field = |base_url: &str| {
        let config = ModelsConfig::from_toml(
            &format!("[models.m]\napi = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"x\"\n"),
            Path::new("colony.toml"),
        )
        .unwrap();
        config.get("m").unwrap().max_tokens_field
    };
    assert_eq!(field("https://api.openai.com/v1"), "max_completion_tokens");
    assert_eq!(field("https://API.OpenAI.com/v1/"), "max_completion_tokens");
    assert_eq!(field("http://localhost:11434/v1"), "max_tokens");
    assert_eq!(field("https://openrouter.ai/api/v1"), "max_tokens");
}

#[tokio::test]
async fn anthropic_answer_moves_system_prompt_and_sends_key() {
    let server = ModelServer::start();
    let providers = providers_for(&anthropic_alias(
        &server,
        "api_key_env = \"TEST_KEY\"\nmax_tokens = 300",
    ));
    server.push(Scripted::answer_with_usage("A mug for the road.", 41, 9));
    let reply = providers
        .complete(&ask("smart", "Write a tagline"))
        .await
        .unwrap();
    assert_eq!(reply.content, "A mug for the road.");
    assert_eq!(reply.finish, Finish::Stop);
    assert_eq!(reply.usage, Usage::new(41, 9));
    assert_eq!(reply.model, "claude-test");

    let sent = server.last_request();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(
        sent.body["max_tokens"], 300,
        "required by the API: the alias default"
    );
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Write a tagline"}]}])
    );

    // JSON mode becomes an instruction in the system prompt.
    let req = ChatRequest {
        json: true,
        ..ask("smart", "{}")
    };
    providers.complete(&req).await.unwrap();
    let system = server.last_request().body["system"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        system.starts_with("Be brief.\n\n") && system.contains("JSON object"),
        "{system}"
    );
}

#[tokio::test]
async fn tool_call_round_trip_on_both_apis() {
    let server = ModelServer::start();
    let toml = format!(
        "{}{}",
        openai_alias(&server, ""),
        anthropic_alias(&server, "")
    );
    let providers = providers_for(&toml);
    for alias in ["fast", "smart"] {
        let mut req = ChatRequest {
            tools: vec![lookup_tool()],
            ..ask(alias, "What is a mug?")
        };
        server.push(Scripted::tool_call("lookup", json!({"word": "mug"})));
        let reply = providers.complete(&req).await.unwrap();
        assert_eq!(reply.finish, Finish::ToolCalls, "{alias}");
        assert_eq!(reply.tool_calls.len(), 1);
        let call = &reply.tool_calls[0];
        assert_eq!(
            (call.id.as_str(), call.name.as_str()),
            ("call_lookup", "lookup")
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&call.arguments).unwrap(),
            json!({"word": "mug"})
        );
        let sent = server.last_request();
        let schema = json!({"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]});
        match alias {
            "fast" => {
                assert_eq!(sent.body["tools"][0]["type"], "function");
                assert_eq!(sent.body["tools"][0]["function"]["name"], "lookup");
                assert_eq!(sent.body["tools"][0]["function"]["parameters"], schema);
            }
            _ => {
                assert_eq!(sent.body["tools"][0]["name"], "lookup");
                assert_eq!(sent.body["tools"][0]["input_schema"], schema);
            }
        }

        // The agent runs the tool and sends the result back.
        req.messages.push(Message::from_reply(&reply));
        req.messages
            .push(Message::tool_result(&call.id, "a cup with a handle"));
        server.push(Scripted::answer("A mug is a cup with a handle."));
        let answer = providers.complete(&req).await.unwrap();
        assert_eq!(answer.content, "A mug is a cup with a handle.");
        let messages = server.last_request().body["messages"].clone();
        match alias {
            "fast" => {
                assert_eq!(
                    messages[2],
                    json!({"role": "assistant", "content": null, "tool_calls": [{
                        "id": "call_lookup", "type": "function",
                        "function": {"name": "lookup", "arguments": r#"{"word":"mug"}"#},
                    }]})
                );
                assert_eq!(
                    messages[3],
                    json!({"role": "tool", "content": "a cup with a handle", "tool_call_id": "call_lookup"})
                );
            }
            _ => {
                assert_eq!(
                    messages[1],
                    json!({"role": "assistant", "content": [{
                        "type": "tool_use", "id": "call_lookup", "name": "lookup", "input": {"word": "mug"},
                    }]})
                );
                assert_eq!(
                    messages[2],
                    json!({"role": "user", "content": [{
                        "type": "tool_result", "tool_use_id": "call_lookup", "content": "a cup with a handle",
                    }]})
                );
            }
        }
    }
    assert_eq!(server.count(), 4);
}

#[tokio::test]
async fn rate_limited_then_success_within_one_call() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"10s\""));
    server.push(Scripted::rate_limited(1));
    server.push(Scripted::answer("after the wait"));
    let started = Instant::now();
    let reply = providers.complete(&ask("fast", "hi")).await.unwrap();
    assert_eq!(reply.content, "after the wait");
    assert_eq!(server.count(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 was honoured"
    );

    // So is a 503's.
    server.push(Scripted::unavailable(1));
    server.push(Scripted::answer("after the outage"));
    let started = Instant::now();
    let reply = providers.complete(&ask("fast", "hi")).await.unwrap();
    assert_eq!(reply.content, "after the outage");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "a 503's Retry-After: 1 was honoured"
    );
}

#[tokio::test]
async fn persistent_rate_limiting_is_rate_limited() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"2s\""));
    // Asked to wait longer than the call may take: give up at once.
    server.push(Scripted::rate_limited(30));
    let started = Instant::now();
    let err = providers.complete(&ask("fast", "hi")).await.unwrap_err();
    assert_eq!(err.kind(), "rate_limited", "{err}");
    assert!(err.to_string().contains("model `fast`"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(server.count(), 1);

    for _ in 0..10 {
        server.push(Scripted::rate_limited(1));
    }
    let err = providers.complete(&ask("fast", "hi")).await.unwrap_err();
    assert!(matches!(err, ModelError::RateLimited(_)), "{err}");
    assert_eq!(server.count(), 1 + 2, "retried once a second within 2 s");
}

/// A provider that answers only 429 costs nothing, however it answers:
/// `Retry-After: 0` does not make the host hammer it (the backoff still
/// applies), and no retry starts with so little of the call's timeout left
/// that it would be cut off unanswered (which counts as charged).
#[tokio::test]
async fn a_provider_answering_only_429_is_rate_limited_and_charges_nothing() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"2s\""));
    for _ in 0..100 {
        server.push(Scripted::rate_limited(0));
    }
    let on_wire = std::sync::atomic::AtomicBool::new(false);
    let failure = providers
        .call(&ask("fast", "hi"), &on_wire)
        .await
        .unwrap_err();
    assert_eq!(failure.error.kind(), "rate_limited", "{}", failure.error);
    assert!(
        failure.error.to_string().contains("HTTP 429"),
        "{}",
        failure.error
    );
    assert_eq!(failure.charged, Usage::default());
    assert!(
        server.count() <= 5,
        "backed off: {} requests in 2 s",
        server.count()
    );

    // Each 429 takes 350 ms to come, and asks for a second's wait: after two
    // of them too little of the 3 s is left for a reply.
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"3s\""));
    for _ in 0..10 {
        server.push(Scripted::rate_limited(1).after(Duration::from_millis(350)));
    }
    let failure = providers
        .call(&ask("fast", "hi"), &on_wire)
        .await
        .unwrap_err();
    assert_eq!(failure.error.kind(), "rate_limited", "{}", failure.error);
    assert_eq!(failure.charged, Usage::default(), "{}", failure.error);
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn persistent_server_errors_end_unavailable_within_the_timeout() {
    let server = ModelServer::start();
    let providers = providers_for(&anthropic_alias(&server, "timeout = \"2s\""));
    for _ in 0..50 {
        server.push(Scripted::ServerError);
    }
    let started = Instant::now();
    let err = providers.complete(&ask("smart", "hi")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, ModelError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    // Well under the 50 retries it was offered (slack for a loaded machine).
    assert!(elapsed <= Duration::from_millis(3500), "{elapsed:?}");
    assert!(
        server.count() >= 3,
        "retried with backoff: {}",
        server.count()
    );
}

/// A provider that does not answer within the call's timeout may still be
/// generating the reply, and bill it: the call counts as charged (its
/// reservation), so that a budget cannot be spent through timeouts.
#[tokio::test]
async fn a_hanging_provider_is_unavailable_after_the_timeout_and_counted_as_charged() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"1s\""));
    server.push(Scripted::Hang);
    let started = Instant::now();
    let request = ChatRequest {
        max_tokens: Some(50),
        ..ask("fast", "hi")
    };
    let on_wire = std::sync::atomic::AtomicBool::new(false);
    let failure = providers.call(&request, &on_wire).await.unwrap_err();
    let elapsed = started.elapsed();
    let err = &failure.error;
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(
        err.to_string().contains("within the call's timeout of 1s")
            && err.to_string().contains("counted as charged"),
        "{err}"
    );
    assert_eq!(failure.charged.output_tokens, 50, "{err}");
    assert!(failure.charged.input_tokens > 0, "{err}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(server.count(), 1);
}

/// A 2xx reply the host cannot read (not JSON, or cut off in transit) was
/// most likely charged by the provider: it is not retried (each retry would
/// be charged again) and it counts as its reservation, so that a budget
/// cannot be spent through replies the host never read.
#[tokio::test]
async fn an_unreadable_or_cut_off_reply_counts_as_charged_and_is_not_retried() {
    let server = ModelServer::start();
    let toml = format!(
        "{}{}",
        openai_alias(&server, ""),
        anthropic_alias(&server, "")
    );
    let providers = providers_for(&toml);
    for (scripted, says) in [
        (
            (|| Scripted::Malformed) as fn() -> Scripted,
            "could not be understood",
        ),
        (|| Scripted::CutOff, "was cut off"),
        // The request went out and the connection broke unanswered, or a
        // gateway stopped waiting: the provider may be generating the reply
        // (they were retried, each retry paying again uncounted).
        (|| Scripted::Dropped, "lost before it answered"),
        (
            || Scripted::status(504, "upstream request timeout"),
            "gateway gave up",
        ),
        (
            || Scripted::status(524, "a timeout occurred"),
            "gateway gave up",
        ),
    ] {
        for alias in ["fast", "smart"] {
            server.push(scripted());
            let request = ChatRequest {
                max_tokens: Some(50),
                ..ask(alias, "hi")
            };
            let on_wire = std::sync::atomic::AtomicBool::new(false);
            let failure = providers.call(&request, &on_wire).await.unwrap_err();
            assert!(
                on_wire.load(std::sync::atomic::Ordering::Acquire),
                "a reply was on its way: the call may be charged"
            );
            let err = &failure.error;
            assert!(matches!(err, ModelError::Unavailable(_)), "{err}");
            assert!(err.to_string().contains(says), "{err}");
            assert!(err.to_string().contains("counted as charged"), "{err}");
            assert_eq!(failure.charged.output_tokens, 50, "{alias}: {err}");
            assert!(failure.charged.input_tokens > 0, "{alias}: {err}");
        }
    }
    assert_eq!(server.count(), 10, "none was retried");
}

/// OpenAI's 429 `insufficient_quota` is a spent account, not a rate limit:
/// it fails at once (it was retried for the whole timeout and reported as
/// rate limited, inviting the agent to wait and try again).
#[tokio::test]
async fn an_account_out_of_quota_is_not_retried() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"30s\""));
    server.push(Scripted::OutOfQuota);
    let started = Instant::now();
    let failure = providers
        .call(
            &ask("fast", "hi"),
            &std::sync::atomic::AtomicBool::new(false),
        )
        .await
        .unwrap_err();
    let err = &failure.error;
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(err.to_string().contains("no quota left"), "{err}");
    assert!(
        err.to_string().contains("You exceeded your current quota"),
        "the provider's own words: {err}"
    );
    assert_eq!(server.count(), 1, "not retried");
    assert_eq!(failure.charged, Usage::default(), "a refusal costs nothing");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A plain 429 is still retried.
    server.push(Scripted::rate_limited(0));
    providers.complete(&ask("fast", "again")).await.unwrap();
    assert_eq!(server.count(), 3);
}

/// A call whose turn under this host's rate limit would leave it less than
/// a quarter of its timeout is refused at once, as a retry is: sent so late
/// it would most likely be cut off before its answer, and charged all the
/// same. (With one request a minute and a 70 s timeout, the second call
/// waited 60 s and went with 10 s left.)
#[tokio::test]
async fn a_turn_that_would_leave_too_little_of_the_timeout_is_refused() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(
        &server,
        "requests_per_minute = 1\ntimeout = \"70s\"",
    ));
    providers.complete(&ask("fast", "first")).await.unwrap();
    let err = match providers.take_turn(&ask("fast", "second")) {
        Ok(turn) => panic!("the second call got a turn (waits: {})", turn.waits()),
        Err(failure) => failure.error,
    };
    assert_eq!(err.kind(), "rate_limited", "{err}");
    assert!(err.to_string().contains("less than a quarter"), "{err}");
    assert_eq!(server.count(), 1);
    // With the timeout to spare, it waits its turn instead.
    let roomy = providers_for(&openai_alias(
        &server,
        "requests_per_minute = 1\ntimeout = \"100s\"",
    ));
    roomy.complete(&ask("fast", "first")).await.unwrap();
    assert!(roomy.take_turn(&ask("fast", "second")).unwrap().waits());
}

/// A provider that refused the first connection and then took the request
/// and never answered has it out for real: the call counts as charged. It
/// was taken for one more connection that never opened, and charged 0.
#[tokio::test]
async fn a_retry_that_connected_and_got_no_answer_counts_as_charged() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!(
        "[models.late]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\ntimeout = \"13s\"\n"
    );
    let providers = providers_for(&toml);
    // Nothing listens for the first attempt; the retry (200-300 ms later)
    // finds a server that reads the request and never answers, with more
    // time left than a connection may take to open (10 s).
    let hanging = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            held.push(stream);
        }
    };
    let request = ChatRequest {
        max_tokens: Some(40),
        ..ask("late", "hi")
    };
    let on_wire = std::sync::atomic::AtomicBool::new(false);
    let failure = tokio::select! {
        result = providers.call(&request, &on_wire) => result.unwrap_err(),
        _ = hanging => unreachable!("the server accepts for ever"),
    };
    assert_eq!(failure.error.kind(), "unavailable", "{}", failure.error);
    assert_eq!(
        failure.charged.output_tokens, 40,
        "charged: {:?} ({})",
        failure.charged, failure.error
    );
}

#[tokio::test]
async fn client_errors_are_invalid_requests_without_secrets() {
    let server = ModelServer::start();
    let toml = format!(
        "{}{}",
        openai_alias(&server, "api_key_env = \"TEST_KEY\""),
        anthropic_alias(&server, "api_key_env = \"TEST_KEY\"")
    );
    let providers = providers_for(&toml);
    server.push(Scripted::status(400, "max_tokens: must be below 4096"));
    let err = providers.complete(&ask("fast", "hi")).await.unwrap_err();
    assert_eq!(
        err,
        ModelError::InvalidRequest(
            "model `fast`: the provider refused the request (HTTP 400): max_tokens: must be below 4096".into()
        )
    );
    // A 404 is most likely the host's base_url or model: said so.
    server.push(Scripted::status(404, "The model `m` does not exist"));
    let err = providers.complete(&ask("fast", "hi")).await.unwrap_err();
    assert_eq!(err.kind(), "invalid_request");
    assert!(
        err.to_string().contains("HTTP 404 (no such endpoint or model: the host's base_url or model for the alias may be wrong")
            && err.to_string().ends_with("The model `m` does not exist"),
        "{err}"
    );
    // A provider that echoes the key or its own URL does not leak them.
    server.push(Scripted::status(
        401,
        format!("Incorrect API key provided: {KEY} at {}", server.url()),
    ));
    let err = providers.complete(&ask("smart", "hi")).await.unwrap_err();
    assert_eq!(err.kind(), "invalid_request");
    let message = err.to_string();
    assert!(
        message.contains("HTTP 401") && message.contains("<redacted>"),
        "{message}"
    );
    assert!(
        !message.contains(KEY) && !message.contains(&server.url()),
        "{message}"
    );
    // Nor under another path than its base_url's (`fast` is on `<url>/v1`),
    // nor by its address alone.
    let address = server.url().trim_start_matches("http://").to_string();
    server.push(Scripted::status(
        401,
        format!(
            "bad key; see {}/echokey/docs (served by {address})",
            server.url()
        ),
    ));
    let message = providers
        .complete(&ask("fast", "hi"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.ends_with("bad key; see <provider> (served by <provider>)"),
        "{message}"
    );
    assert_eq!(server.count(), 4, "4xx is not retried");

    // Unknown aliases never reach a provider.
    let err = providers.complete(&ask("other", "hi")).await.unwrap_err();
    assert_eq!(err.kind(), "not_granted");
    assert!(err.to_string().contains("`other`"), "{err}");
    // A tool schema that is not JSON is refused before sending.
    let req = ChatRequest {
        tools: vec![Tool {
            parameters: "{nope".into(),
            ..lookup_tool()
        }],
        ..ask("fast", "hi")
    };
    assert_eq!(
        providers.complete(&req).await.unwrap_err().kind(),
        "invalid_request"
    );
    assert_eq!(server.count(), 4, "the bad schema was not sent");
}

#[tokio::test]
async fn an_unreachable_provider_is_unavailable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!(
        "[models.gone]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\ntimeout = \"1s\"\n"
    );
    let err = providers_for(&toml)
        .complete(&ask("gone", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(
        !err.to_string().contains("127.0.0.1"),
        "no URL for the guest: {err}"
    );

    // Under a rate limit too: a connection that never opened sent no
    // request, so its retries are not held back a minute each, and the
    // call ends on what happened, not as rate limited (it said the limit
    // "would hold the call for 1m, longer than its timeout of 2m 30s").
    let limited = providers_for(&format!(
        "[models.gone]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\ntimeout = \"3s\"\nrequests_per_minute = 1\n"
    ));
    let err = limited.complete(&ask("gone", "hi")).await.unwrap_err();
    assert_eq!(err.kind(), "unavailable", "{err}");
    assert!(err.to_string().contains("connect"), "{err}");
    // And the limit's one request a minute was given back.
    assert!(!limited.take_turn(&ask("gone", "hi")).unwrap().waits());
}

#[tokio::test]
async fn requests_per_minute_queues_then_refuses_past_the_timeout() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(
        &server,
        "requests_per_minute = 60\ntimeout = \"5s\"",
    ));
    // 60 a minute: a burst of 60, then one a second. The bucket is full
    // (60) when the burst starts and gains one a second, so the 61st request
    // cannot go before 1 s after the burst started and the 62nd before 2 s,
    // however fast or slow this machine sends the burst.
    let burst = Instant::now();
    for _ in 0..60 {
        providers.complete(&ask("fast", "hi")).await.unwrap();
    }
    assert_eq!(server.count(), 60);
    let (first, second) = tokio::join!(
        async {
            let reply = providers.complete(&ask("fast", "a")).await;
            (reply, burst.elapsed())
        },
        async {
            // Starts after the first has queued, so it waits behind it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let reply = providers.complete(&ask("fast", "b")).await;
            (reply, burst.elapsed())
        }
    );
    assert_eq!(first.0.unwrap().content, "a");
    assert_eq!(second.0.unwrap().content, "b");
    assert!(first.1 >= Duration::from_millis(950), "{:?}", first.1);
    assert!(second.1 >= Duration::from_millis(1950), "{:?}", second.1);
    assert_eq!(server.count(), 62);
    let sent: Vec<String> = server.requests()[60..]
        .iter()
        .map(|r| {
            r.body["messages"][1]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(sent, ["a", "b"], "served in the order they queued");

    // 2 a minute with a 1 s timeout: the third call cannot be sent in time
    // and is refused without contacting the provider.
    let tight = providers_for(&openai_alias(
        &server,
        "requests_per_minute = 2\ntimeout = \"1s\"",
    ));
    tight.complete(&ask("fast", "1")).await.unwrap();
    tight.complete(&ask("fast", "2")).await.unwrap();
    let started = Instant::now();
    let err = tight.complete(&ask("fast", "3")).await.unwrap_err();
    assert_eq!(err.kind(), "rate_limited", "{err}");
    assert!(err.to_string().contains("this host's rate limit"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(server.count(), 64);
}

/// A turn taken and dropped unsent (its budget refused the call, its run
/// ended while it waited) gives its request and tokens back; one sent
/// keeps them, whether or not the provider answered.
#[tokio::test]
async fn a_turn_dropped_unsent_is_given_back() {
    use std::sync::atomic::AtomicBool;
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(
        &server,
        "requests_per_minute = 1
tokens_per_minute = 1000
max_tokens = 600
timeout = \"5m\"",
    ));
    let turn = providers.take_turn(&ask("fast", "hi")).unwrap();
    assert!(!turn.waits(), "the first call of a minute goes at once");
    assert!(
        turn.tokens() > 600,
        "max_tokens plus the prompt: {}",
        turn.tokens()
    );
    let behind = providers.take_turn(&ask("fast", "hi")).unwrap();
    assert!(behind.waits(), "one request a minute: the second waits");
    drop(behind);
    drop(turn);
    // Both given back: the request and the tokens (600 + 600 would be past
    // the minute's 1,000 tokens otherwise).
    let turn = providers.take_turn(&ask("fast", "hi")).unwrap();
    assert!(!turn.waits(), "the turns dropped unsent were given back");
    assert_eq!(server.count(), 0);
    providers
        .send(turn, &ask("fast", "hi"), &AtomicBool::new(false))
        .await
        .unwrap();
    assert_eq!(server.count(), 1);
    let next = providers.take_turn(&ask("fast", "hi")).unwrap();
    assert!(next.waits(), "a turn sent is spent");
}

#[tokio::test]
async fn tokens_per_minute_reserves_then_settles_to_usage() {
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(
        &server,
        "tokens_per_minute = 1000\ntimeout = \"1s\"",
    ));
    // Each call reserves 900 + the prompt; the provider reports 17 used, so
    // the reservation is given back and the next call fits at once.
    let req = ChatRequest {
        max_tokens: Some(900),
        ..ask("fast", "hi")
    };
    for _ in 0..3 {
        server.push(Scripted::answer_with_usage("ok", 12, 5));
        providers.complete(&req).await.unwrap();
    }
    assert_eq!(server.count(), 3);
    // More than a minute's tokens can never be sent.
    let huge = ChatRequest {
        max_tokens: Some(2000),
        ..ask("fast", "hi")
    };
    assert_eq!(
        providers.complete(&huge).await.unwrap_err().kind(),
        "invalid_request"
    );
    assert_eq!(server.count(), 3);
}

#[test]
fn request_hash_is_stable_and_sensitive_to_content() {
    let req = ChatRequest {
        tools: vec![lookup_tool()],
        temperature: Some(0.7),
        ..ask("fast", "Describe the mug")
    };
    let hash = request_hash(&req);
    // Pinned: journals written by one build must match in the next.
    assert_eq!(hash, request_hash(&req.clone()));
    let round_trip: ChatRequest =
        serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
    assert_eq!(request_hash(&round_trip), hash);
    assert_eq!(
        hash, PINNED_HASH,
        "the canonical serialization changed; bump its version tag"
    );
    let mut changed = req.clone();
    changed.messages[1].content.push('!');
    assert_ne!(request_hash(&changed), hash);
    let mut changed = req.clone();
    changed.tools.clear();
    assert_ne!(request_hash(&changed), hash);
    assert!(estimate_prompt_tokens(&req) > estimate_prompt_tokens(&changed));
}

const PINNED_HASH: &str = "feb321038a57d8b648f6e946f588987b6cf1a1c0685807be9ada585ce7dd8642";

#[test]
fn cost_from_prices() {
    let server = ModelServer::start();
    let toml = format!(
        "{}{}",
        openai_alias(
            &server,
            "input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.60"
        ),
        anthropic_alias(&server, "")
    );
    let providers = providers_for(&toml);
    let usage = Usage::new(1_000_000, 500_000);
    let cost = providers.cost_usd("fast", &usage).unwrap();
    assert!((cost - 0.45).abs() < 1e-9, "{cost}");
    assert_eq!(
        providers.cost_usd("smart", &usage),
        None,
        "no prices, no cost"
    );
    assert_eq!(providers.cost_usd("other", &usage), None);
    assert_eq!(providers.config("fast").unwrap().max_tokens, 1024);
    assert!(providers.has_alias("smart") && !providers.has_alias("other"));
}

/// Prompt tokens the provider's cache served or took in are priced at
/// their own rates when the alias gives them (at the input price when it
/// does not), and counted as input against budgets either way. They were
/// all priced as input: OpenAI's cached reads (a discount) made the
/// recorded cost too high, Anthropic's cache writes (a premium) too low.
#[tokio::test]
async fn prompt_cache_tokens_are_priced_at_their_own_rates() {
    let server = ModelServer::start();
    let prices = "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n\
                  cache_read_usd_per_mtok = 0.1\ncache_write_usd_per_mtok = 1.25";
    let providers = providers_for(&format!(
        "{}{}",
        openai_alias(&server, prices),
        anthropic_alias(&server, prices)
    ));
    let cached = || Scripted::CachedAnswer {
        text: "ok".into(),
        uncached_input: 200,
        cache_read: 800,
        cache_write: 1000,
        output_tokens: 100,
    };
    let cost_of = |alias: &str, usage: &Usage| providers.cost_usd(alias, usage).unwrap();
    // OpenAI reports no cache writes: those 1,000 are plain input.
    server.push(cached());
    let reply = providers.complete(&ask("fast", "hi")).await.unwrap();
    assert_eq!(
        reply.usage,
        Usage {
            cache_read_tokens: 800,
            ..Usage::new(2000, 100)
        }
    );
    let expected = (1200.0 * 1.0 + 800.0 * 0.1 + 100.0 * 2.0) / 1e6;
    assert!((cost_of("fast", &reply.usage) - expected).abs() < 1e-12);
    server.push(cached());
    let reply = providers.complete(&ask("smart", "hi")).await.unwrap();
    assert_eq!(
        reply.usage,
        Usage {
            cache_read_tokens: 800,
            cache_write_tokens: 1000,
            ..Usage::new(2000, 100)
        }
    );
    let expected = (200.0 * 1.0 + 800.0 * 0.1 + 1000.0 * 1.25 + 100.0 * 2.0) / 1e6;
    assert!((cost_of("smart", &reply.usage) - expected).abs() < 1e-12);
    // Without cache prices, at the input price.
    let plain = providers_for(&openai_alias(&server, "input_usd_per_mtok = 1.0"));
    assert!((plain.cost_usd("fast", &reply.usage).unwrap() - 2000.0 / 1e6).abs() < 1e-12);
}

/// A call tells whether a request is out with the provider (then a run cut
/// off may be charged for it) or not (waiting to retry after a 429: its
/// budget reservation can be given back).
#[tokio::test]
async fn a_call_says_whether_a_request_is_out_with_the_provider() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = ModelServer::start();
    let providers = providers_for(&openai_alias(&server, "timeout = \"60s\""));
    let request = ask("fast", "hi");
    for (scripted, out) in [(Scripted::rate_limited(5), false), (Scripted::Hang, true)] {
        server.push(scripted);
        let on_wire = AtomicBool::new(false);
        let cut_off = tokio::time::timeout(
            Duration::from_millis(1_000),
            providers.call(&request, &on_wire),
        )
        .await;
        assert!(cut_off.is_err(), "the call was still under way");
        assert_eq!(on_wire.load(Ordering::Acquire), out, "{out}");
    }
    assert_eq!(server.count(), 2, "one request each, no retry yet");
}
