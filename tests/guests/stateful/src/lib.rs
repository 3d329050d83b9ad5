//! `stateful`: uses the host's `state` interface as its payload scripts.
//!
//! Payload (every key optional):
//! `{"ops": [["set", "agent", "k", "1"], ["set_if", "chain", "k", "2", 1],
//!           ["delete", "agent", "k"], ["get", "agent", "k"], ["scan", "agent", "p", 10],
//!           ["effect", "POST", "http://host/path", "body", {"header": "value"}]],
//!   "touch": "key", "increment": "key", "end": "ok" | "retryable" | "trap" | "huge_failure",
//!   "bytes": N (the huge failure's message length), "review": true,
//!   "spawn": [payload, ...], "spawn_blobs": N, "blob_bytes": B}`
//! `ops` run in order; each `get`/`scan` adds what it saw to the output's
//! `reads`, each `effect` (send-after-commit) its sequence number or error.
//! `touch` gets and sets that agent key and adds nothing to the output.
//! `increment` reads an agent-scoped counter and writes it + 1 with
//! `set-if` on the version read. `end` decides how the run ends after its
//! writes (default ok). `spawn` creates `stateful` children with those
//! payloads, and `spawn_blobs` N more with `{"blob": "xxx..."}` of B bytes.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::effects;
use colony::agent::state::{self, Entry, Scope};
use colony::agent::types::TaskSpec;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::{Value, json};

fn scope(name: &Value) -> Scope {
    match name.as_str() {
        Some("chain") => Scope::Chain,
        _ => Scope::Agent,
    }
}

fn entry(e: &Entry) -> Value {
    json!({"key": e.key, "value": serde_json::from_str::<Value>(&e.value).unwrap_or(Value::Null), "version": e.version})
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Stateful;

impl Guest for Stateful {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let script: Value = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad payload: {e}")))?;
        let mut reads = Vec::new();
        for op in script["ops"].as_array().cloned().unwrap_or_default() {
            let name = op[0].as_str().unwrap_or("");
            let key = text(&op[2]);
            match name {
                "set" => state::set(scope(&op[1]), &key, &text(&op[3])),
                "set_if" => state::set_if(
                    scope(&op[1]),
                    &key,
                    &text(&op[3]),
                    op[4].as_u64().unwrap_or(0),
                ),
                "delete" => state::delete(scope(&op[1]), &key),
                "get" => reads.push(
                    state::get(scope(&op[1]), &key)
                        .as_ref()
                        .map_or(Value::Null, entry),
                ),
                "effect" => {
                    let mut headers =
                        vec![("content-type".to_string(), "application/json".to_string())];
                    for (name, value) in op.get(4).and_then(Value::as_object).into_iter().flatten()
                    {
                        headers.push((name.clone(), text(value)));
                    }
                    let request = effects::Request {
                        method: text(&op[1]),
                        url: key.clone(),
                        headers,
                        body: op.get(3).map(|b| text(b).into_bytes()),
                    };
                    reads.push(match effects::send_after_commit(&request) {
                        Ok(seq) => json!(seq),
                        Err(e) => json!({ "error": e }),
                    });
                }
                "scan" => {
                    let limit = op[3].as_u64().unwrap_or(100) as u32;
                    let found = state::scan(scope(&op[1]), &key, limit);
                    reads.push(Value::Array(found.iter().map(entry).collect()));
                }
                other => return Err(Failure::Permanent(format!("unknown op {other:?}"))),
            }
        }
        // One get and one set of an agent key and nothing else: what
        // `colony bench --capabilities` measures against `"touch": null`.
        if let Some(key) = script["touch"].as_str() {
            state::get(Scope::Agent, key);
            state::set(Scope::Agent, key, "1");
        }
        if let Some(key) = script["increment"].as_str() {
            let current = state::get(Scope::Agent, key);
            let (n, version) = current
                .as_ref()
                .map_or((0, 0), |e| (e.value.parse::<u64>().unwrap_or(0), e.version));
            state::set_if(Scope::Agent, key, &(n + 1).to_string(), version);
            reads.push(json!(n));
        }
        match script["end"].as_str() {
            Some("retryable") => {
                return Err(Failure::Retryable("scripted failure after writing".into()));
            }
            Some("huge_failure") => {
                let bytes = script["bytes"].as_u64().unwrap_or(1 << 20) as usize;
                return Err(Failure::Permanent("x".repeat(bytes)));
            }
            Some("trap") => panic!("scripted trap after writing"),
            _ => {}
        }
        // `spawn_blobs: N` more children whose payloads are `blob_bytes` long.
        let blob = "x".repeat(script["blob_bytes"].as_u64().unwrap_or(0) as usize);
        let blobs =
            (0..script["spawn_blobs"].as_u64().unwrap_or(0)).map(|_| json!({ "blob": blob }));
        let spawn = script["spawn"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .chain(blobs)
            .map(|payload| TaskSpec {
                agent: "stateful".into(),
                payload: payload.to_string(),
                priority: 0,
                review: false,
            })
            .collect();
        Ok(Outcome {
            output: json!({"reads": reads, "attempt": task.attempt}).to_string(),
            spawn,
            needs_review: script["review"] == json!(true),
        })
    }
}

export!(Stateful);
