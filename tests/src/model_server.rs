//! A fake model provider for tests: a real HTTP server on a loopback port
//! that speaks both the OpenAI chat-completions protocol (`POST
//! /v1/chat/completions`) and the Anthropic Messages API (`POST
//! /v1/messages`), with `usage` in every answer.
//!
//! Each test scripts what it needs ([`ModelServer::push`]): answers, tool
//! calls, 429s, 500s, hangs, malformed JSON. When the script runs out the
//! server echoes the last user message. Every request is recorded (path,
//! headers, parsed body) so tests can assert on what the host really sent.
//! Any other path is a plain endpoint (for effects and outbound HTTP):
//! it answers with the next status queued by [`ModelServer::push_plain`],
//! 200 `{"ok":true}` by default.
//!
//! The server runs on its own thread with its own tokio runtime, so plain
//! `#[test]`s, `#[tokio::test]`s and tests that spawn the `colony` binary
//! can all use it; dropping the [`ModelServer`] stops it.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The model id the server reports in its replies.
pub const MODEL_ID: &str = "fake-model-1";

/// One scripted response; the server answers each request with the next one.
#[derive(Clone, Debug, PartialEq)]
pub enum Scripted {
    /// A text answer with the given usage.
    Answer {
        text: String,
        input_tokens: u32,
        output_tokens: u32,
    },
    /// A text answer part of whose prompt the provider's prompt cache served
    /// (`cache_read`) or took in (`cache_write`), reported as each API
    /// documents it: OpenAI within `prompt_tokens`, its reads as
    /// `prompt_tokens_details.cached_tokens` (it reports no writes: they
    /// count as plain input); Anthropic beside `input_tokens`, as
    /// `cache_read_input_tokens` and `cache_creation_input_tokens`.
    CachedAnswer {
        text: String,
        uncached_input: u32,
        cache_read: u32,
        cache_write: u32,
        output_tokens: u32,
    },
    /// A tool call (`arguments` is JSON), finish reason "tool calls".
    ToolCall {
        id: String,
        name: String,
        arguments: Value,
    },
    /// HTTP 429 with `Retry-After: <seconds>`.
    RateLimited { retry_after_secs: u64 },
    /// HTTP 503 with `Retry-After: <seconds>`.
    Unavailable { retry_after_secs: u64 },
    /// HTTP 500.
    ServerError,
    /// An error status with a provider-shaped error body carrying `message`.
    Status { status: u16, message: String },
    /// Never answers (sleeps for ten minutes, or until the server stops).
    Hang,
    /// Answers as `then` does, after `after`.
    Slow {
        after: Duration,
        then: Box<Scripted>,
    },
    /// HTTP 200 with a body that is not JSON.
    Malformed,
    /// HTTP 200 whose `Content-Length` promises more than is sent before
    /// the connection closes: a reply cut off in transit.
    CutOff,
    /// The request read in full, then the connection closed without an
    /// answer (a provider or proxy that crashed while generating).
    Dropped,
    /// HTTP 429 with OpenAI's documented `insufficient_quota` error: the
    /// account's credit is spent.
    OutOfQuota,
}

impl Scripted {
    /// An answer with usage (12 in, 5 out).
    pub fn answer(text: impl Into<String>) -> Scripted {
        Scripted::answer_with_usage(text, 12, 5)
    }

    pub fn answer_with_usage(
        text: impl Into<String>,
        input_tokens: u32,
        output_tokens: u32,
    ) -> Scripted {
        Scripted::Answer {
            text: text.into(),
            input_tokens,
            output_tokens,
        }
    }

    /// A call of tool `name` with `arguments`; the call id is `call_<name>`.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Scripted {
        let name = name.into();
        Scripted::ToolCall {
            id: format!("call_{name}"),
            name,
            arguments,
        }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Scripted {
        Scripted::RateLimited { retry_after_secs }
    }

    pub fn unavailable(retry_after_secs: u64) -> Scripted {
        Scripted::Unavailable { retry_after_secs }
    }

    /// `self`, answered after `after`.
    pub fn after(self, after: Duration) -> Scripted {
        Scripted::Slow {
            after,
            then: Box::new(self),
        }
    }

    pub fn status(status: u16, message: impl Into<String>) -> Scripted {
        Scripted::Status {
            status,
            message: message.into(),
        }
    }
}

/// A request as the server received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    pub raw_body: String,
}

impl RecordedRequest {
    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Scripted>,
    /// Statuses for plain endpoints, in order.
    plain: VecDeque<u16>,
    requests: Vec<RecordedRequest>,
}

/// The running server. Dropping it stops the server.
pub struct ModelServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModelServer {
    /// Starts a server on `127.0.0.1:<ephemeral port>`, ready on return.
    pub fn start() -> ModelServer {
        // Bound here, before the thread starts, so the port is known and
        // accepting (the OS queues connections) by the time this returns.
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding the model server");
        listener
            .set_nonblocking(true)
            .expect("making the model server's socket non-blocking");
        let addr = listener.local_addr().expect("the model server's address");
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("model-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("starting the model server's runtime");
                runtime.block_on(serve(listener, shared, stopped));
                // Dropping the runtime cancels connections still open,
                // hanging ones included.
            })
            .expect("spawning the model server thread");
        ModelServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the `base_url` of an `anthropic` alias.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1`: the `base_url` of an `openai` alias.
    pub fn openai_url(&self) -> String {
        format!("{}/v1", self.url())
    }

    /// Queues a response for the next request not yet answered.
    pub fn push(&self, response: Scripted) {
        self.state().script.push_back(response);
    }

    /// Queues the status the next request to a plain endpoint (any path
    /// but the two model APIs) gets.
    pub fn push_plain(&self, status: u16) {
        self.state().plain.push_back(status);
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// The most recent request.
    ///
    /// # Panics
    /// When there was none.
    pub fn last_request(&self) -> RecordedRequest {
        self.state()
            .requests
            .last()
            .cloned()
            .expect("the model server received no request")
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.state().requests.len()
    }

    /// Scripted responses not yet used.
    pub fn pending(&self) -> usize {
        self.state().script.len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock must not hide its own
    // failure behind a second panic here.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener =
        tokio::net::TcpListener::from_std(listener).expect("registering the model server's socket");
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, Arc::clone(&state)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Which protocol a request speaks, by its path.
#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    OpenAi,
    Anthropic,
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Body>, std::io::Error> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let raw = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let raw_body = String::from_utf8_lossy(&raw).into_owned();
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let protocol = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/chat/completions") => Some(Protocol::OpenAi),
        ("POST", "/v1/messages") => Some(Protocol::Anthropic),
        _ => None,
    };
    let scripted = {
        let mut state = lock(&state);
        state.requests.push(RecordedRequest {
            method,
            path,
            headers,
            body: body.clone(),
            raw_body,
        });
        // A request to a plain endpoint does not use up the model script.
        match protocol {
            Some(_) => state.script.pop_front(),
            None => {
                let status = state.plain.pop_front().unwrap_or(200);
                drop(state);
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                return Ok(reply(status, json!({"ok": status.is_success()})));
            }
        }
    };
    let protocol = protocol.expect("plain endpoints answered above");
    let scripted = scripted.unwrap_or_else(|| echo(&body, protocol));
    if scripted == Scripted::Dropped {
        // An error from the service makes hyper close the connection
        // without writing a response.
        return Err(std::io::Error::other("dropped, as scripted"));
    }
    Ok(respond(scripted, protocol, &body).await)
}

/// The default answer: the last user message's text, with usage by length.
fn echo(body: &Value, protocol: Protocol) -> Scripted {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let text_of = |message: &Value| match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str().or(b["content"].as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(text_of)
        .unwrap_or_default();
    let mut prompt_bytes: usize = messages.iter().map(|m| text_of(m).len()).sum();
    if protocol == Protocol::Anthropic {
        prompt_bytes += body["system"].as_str().map_or(0, str::len);
    }
    // Roughly four bytes per token, at least one.
    let tokens = |bytes: usize| u32::try_from(bytes.div_ceil(4).max(1)).unwrap_or(u32::MAX);
    Scripted::Answer {
        input_tokens: tokens(prompt_bytes),
        output_tokens: tokens(last_user.len()),
        text: last_user,
    }
}

async fn respond(scripted: Scripted, protocol: Protocol, request: &Value) -> Response<Body> {
    let model = request["model"].as_str().unwrap_or(MODEL_ID);
    let model = if model.is_empty() { MODEL_ID } else { model };
    match scripted {
        Scripted::Answer {
            text,
            input_tokens,
            output_tokens,
        } => reply(
            StatusCode::OK,
            answer(protocol, model, &text, input_tokens, output_tokens),
        ),
        Scripted::CachedAnswer {
            text,
            uncached_input,
            cache_read,
            cache_write,
            output_tokens,
        } => {
            let prompt = uncached_input + cache_read + cache_write;
            let mut body = answer(protocol, model, &text, prompt, output_tokens);
            body["usage"] = match protocol {
                Protocol::OpenAi => json!({
                    "prompt_tokens": prompt,
                    "completion_tokens": output_tokens,
                    "total_tokens": prompt + output_tokens,
                    "prompt_tokens_details": { "cached_tokens": cache_read, "audio_tokens": 0 },
                }),
                Protocol::Anthropic => json!({
                    "input_tokens": uncached_input,
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_write,
                    "output_tokens": output_tokens,
                }),
            };
            reply(StatusCode::OK, body)
        }
        Scripted::ToolCall {
            id,
            name,
            arguments,
        } => reply(
            StatusCode::OK,
            tool_call(protocol, model, &id, &name, arguments),
        ),
        Scripted::RateLimited { retry_after_secs } | Scripted::Unavailable { retry_after_secs } => {
            let (status, kind, message) = match scripted {
                Scripted::RateLimited { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "Rate limit reached; slow down.",
                ),
                _ => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded_error",
                    "Overloaded; try again later.",
                ),
            };
            let mut response = reply(status, error_body(protocol, kind, message));
            response.headers_mut().insert(
                "retry-after",
                retry_after_secs
                    .to_string()
                    .parse()
                    .expect("a number is a header value"),
            );
            response
        }
        Scripted::Dropped => unreachable!("handled before a response is made"),
        Scripted::OutOfQuota => reply(
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota",
                "param": null,
                "code": "insufficient_quota",
            } }),
        ),
        Scripted::ServerError => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            error_body(protocol, "api_error", "The server had an error."),
        ),
        Scripted::Status { status, message } => {
            let status = StatusCode::from_u16(status).expect("a valid scripted HTTP status");
            reply(
                status,
                error_body(protocol, "invalid_request_error", &message),
            )
        }
        Scripted::Slow { after, then } => {
            tokio::time::sleep(after).await;
            Box::pin(respond(*then, protocol, request)).await
        }
        Scripted::Hang => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            reply(StatusCode::GATEWAY_TIMEOUT, json!({}))
        }
        Scripted::Malformed => {
            let mut response = Response::new(full(Bytes::from_static(
                b"{\"choices\": [ this is not json",
            )));
            response.headers_mut().insert(
                "content-type",
                "application/json".parse().expect("a header value"),
            );
            response
        }
        Scripted::CutOff => {
            // The head and the first bytes, flushed; then an error: hyper
            // drops the connection short of the promised length.
            use futures_util::StreamExt;
            let first = Ok(hyper::body::Frame::data(Bytes::from_static(
                b"{\"id\": \"cut\", \"choices\": [",
            )));
            let frames = futures_util::stream::once(async { first }).chain(
                futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("cut off"))
                }),
            );
            let mut response = Response::new(BoxBody::new(StreamBody::new(frames)));
            let headers = response.headers_mut();
            headers.insert(
                "content-type",
                "application/json".parse().expect("a header value"),
            );
            headers.insert("content-length", "4096".parse().expect("a header value"));
            response
        }
    }
}

/// A reply body: whole, or (for a cut-off reply) failing part way.
type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("a header value"),
    );
    response
}

fn answer(
    protocol: Protocol,
    model: &str,
    text: &str,
    input_tokens: u32,
    output_tokens: u32,
) -> Value {
    match protocol {
        Protocol::OpenAi => json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }),
        Protocol::Anthropic => json!({
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{ "type": "text", "text": text }],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": { "input_tokens": input_tokens, "output_tokens": output_tokens },
        }),
    }
}

fn tool_call(protocol: Protocol, model: &str, id: &str, name: &str, arguments: Value) -> Value {
    match protocol {
        Protocol::OpenAi => json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "id": id,
                        "type": "function",
                        "function": { "name": name, "arguments": arguments.to_string() },
                    }],
                },
                "finish_reason": "tool_calls",
            }],
            "usage": { "prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28 },
        }),
        Protocol::Anthropic => json!({
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{ "type": "tool_use", "id": id, "name": name, "input": arguments }],
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": { "input_tokens": 20, "output_tokens": 8 },
        }),
    }
}

/// An error body as each provider shapes it.
fn error_body(protocol: Protocol, kind: &str, message: &str) -> Value {
    match protocol {
        Protocol::OpenAi => json!({ "error": { "message": message, "type": kind, "code": null } }),
        Protocol::Anthropic => {
            json!({ "type": "error", "error": { "type": kind, "message": message } })
        }
    }
}

/// Whether each of a `thinker` guest's replies (its result's `replies`)
/// was replayed from the journal, in order.
pub fn replayed(result: &Value) -> Vec<bool> {
    result["replies"]
        .as_array()
        .expect("a thinker's result lists its replies")
        .iter()
        .map(|r| {
            r["replayed"]
                .as_bool()
                .expect("each reply says whether it was replayed")
        })
        .collect()
}
