//! `fetcher`: makes the HTTP requests its payload scripts, through the
//! standard `wasi:http/outgoing-handler` the host grants, and reports what
//! came back.
//!
//! Payload: `{"requests": [{"url": "http://127.0.0.1:9000/x?q=1",
//!   "method": "POST", "headers": [["name", "value"]], "body": "text"}]}`
//! (`method` defaults to GET; `"follow": true` makes a GET to a 3xx's
//! `Location`, as a client following a redirect would, reported under
//! `followed`). The output has one entry per request:
//! `{"status", "headers", "body", "bytes", "sent_headers", "error"}` where
//! `sent_headers` are the request's headers as the guest can see them after
//! building it, and `error` is the WASI error (a refused request is
//! `HttpRequestDenied`; a body cut off by the host says so). `env` lists the
//! environment the guest sees.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::{Value, json};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

struct Fetcher;

fn method(name: &str) -> Method {
    match name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "CONNECT" => Method::Connect,
        other => Method::Other(other.to_string()),
    }
}

fn entries(fields: &Fields) -> Value {
    fields
        .entries()
        .into_iter()
        .map(|(k, v)| json!([k, String::from_utf8_lossy(&v)]))
        .collect()
}

fn fetch(spec: &Value) -> Value {
    let url = spec["url"].as_str().unwrap_or_default();
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let headers = Fields::new();
    for pair in spec["headers"].as_array().into_iter().flatten() {
        let (name, value) = (
            pair[0].as_str().unwrap_or(""),
            pair[1].as_str().unwrap_or(""),
        );
        if let Err(e) = headers.append(name, value.as_bytes()) {
            return json!({"error": format!("header {name}: {e:?}")});
        }
    }
    let request = OutgoingRequest::new(headers);
    let _ = request.set_method(&method(spec["method"].as_str().unwrap_or("GET")));
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let sent_headers = entries(&request.headers());
    let body = request.body().expect("the body is taken once");

    let future = match outgoing_handler::handle(request, None) {
        Ok(future) => future,
        Err(code) => return json!({"error": format!("{code:?}"), "sent_headers": sent_headers}),
    };
    if let Some(text) = spec["body"].as_str() {
        let out = body.write().expect("the body stream is taken once");
        for chunk in text.as_bytes().chunks(4096) {
            if let Err(e) = out.blocking_write_and_flush(chunk) {
                return json!({"error": format!("writing the body: {e:?}"), "sent_headers": sent_headers});
            }
        }
        drop(out);
    }
    let _ = OutgoingBody::finish(body, None);
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => {
            return json!({"error": format!("{code:?}"), "sent_headers": sent_headers});
        }
        other => {
            return json!({"error": format!("no response: {other:?}"), "sent_headers": sent_headers});
        }
    };
    let status = response.status();
    let response_headers = entries(&response.headers());
    let incoming = response.consume().expect("the body is taken once");
    let stream = incoming.stream().expect("the body stream is taken once");
    let mut bytes = Vec::new();
    let mut error = Value::Null;
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                error = json!(e.to_debug_string());
                break;
            }
        }
    }
    json!({
        "status": status,
        "headers": response_headers,
        "body": String::from_utf8_lossy(&bytes),
        "bytes": bytes.len(),
        "sent_headers": sent_headers,
        "error": error,
    })
}

impl Guest for Fetcher {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let script: Value = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad payload: {e}")))?;
        let results: Vec<Value> = script["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|spec| {
                let mut result = fetch(spec);
                let location = result["headers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|h| {
                        h[0].as_str()
                            .is_some_and(|n| n.eq_ignore_ascii_case("location"))
                    })
                    .and_then(|h| h[1].as_str().map(str::to_string));
                let redirected = result["status"]
                    .as_u64()
                    .is_some_and(|s| (300..400).contains(&s));
                if let (true, true, Some(location)) = (spec["follow"] == true, redirected, location)
                {
                    result["followed"] = fetch(&json!({"url": location}));
                }
                result
            })
            .collect();
        let env: Vec<Value> = std::env::vars().map(|(k, v)| json!([k, v])).collect();
        Ok(Outcome {
            output: json!({"results": results, "env": env}).to_string(),
            spawn: vec![],
            needs_review: false,
        })
    }
}

export!(Fetcher);
