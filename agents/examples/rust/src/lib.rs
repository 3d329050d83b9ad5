//! `wordcount` in Rust: counts the words of `payload.text`. The Python and
//! JavaScript examples beside it do the same job, so they can be compared.
//!
//! Payload: `{"text": "...", "summarize": bool, "raise": bool, "spin": bool}`.
//! Output: `{"words", "longest", "language", "summary"}`. It heartbeats,
//! logs, prints to stdout (kept in the task's log), keeps the last count in
//! its state, and asks the model alias `fast` for a summary when asked to,
//! carrying on without one when no model is configured or granted.

use serde_json::{Value, json};

/// The words of `text` and the longest of them (the first, on a tie).
pub fn count_words(text: &str) -> (usize, Option<&str>) {
    let words: Vec<&str> = text.split_whitespace().collect();
    let longest = words
        .iter()
        .copied()
        .reduce(|a, w| if w.len() > a.len() { w } else { a });
    (words.len(), longest)
}

/// The text to count, or why the payload can never work.
pub fn text_of(payload: &Value) -> Result<&str, String> {
    payload
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| "payload field \"text\" is missing; it must be a string".to_string())
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

    use super::*;
    use colony::agent::host::{heartbeat, log};
    use colony::agent::model::{self, Message, Request, Role};
    use colony::agent::state::{self, Scope};
    use colony::agent::types::Level;
    use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

    struct Wordcount;

    impl Guest for Wordcount {
        fn run(task: Task) -> Result<Outcome, Failure> {
            heartbeat(Some("counting"));
            let payload: Value = serde_json::from_str(&task.payload)
                .map_err(|e| Failure::Permanent(format!("payload is not JSON: {e}")))?;
            let text = text_of(&payload).map_err(Failure::Permanent)?;
            if payload["raise"] == true {
                panic!("asked to raise");
            }
            if payload["spin"] == true {
                #[allow(clippy::empty_loop)]
                loop {}
            }
            let (words, longest) = count_words(text);
            println!("counted {words} words");
            log(Level::Info, &format!("task {}: {words} words", task.id));
            // Committed only if the task completes.
            state::set(Scope::Agent, "last_count", &words.to_string());
            let summary = if payload["summarize"] == true {
                summarize(text)
            } else {
                None
            };
            let output =
                json!({"words": words, "longest": longest, "language": "rust", "summary": summary});
            Ok(Outcome {
                output: output.to_string(),
                spawn: Vec::new(),
                needs_review: false,
            })
        }
    }

    /// One sentence from the model alias `fast`, or `None` (logged) when
    /// the operator configured no such model or did not grant it.
    fn summarize(text: &str) -> Option<String> {
        let request = Request {
            model: "fast".into(),
            messages: vec![Message {
                role: Role::User,
                content: format!("Summarize in one sentence: {text}"),
                tool_calls: Vec::new(),
                tool_call_id: None,
            }],
            tools: Vec::new(),
            max_tokens: Some(60),
            temperature: None,
            json: false,
        };
        match model::complete(&request) {
            Ok(reply) => Some(reply.content),
            Err(e) => {
                log(Level::Warn, &format!("no summary: {e:?}"));
                None
            }
        }
    }

    export!(Wordcount);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_and_finds_the_longest() {
        assert_eq!(count_words("the quick brown fox"), (4, Some("quick")));
        assert_eq!(count_words("   "), (0, None));
    }

    #[test]
    fn a_payload_without_text_is_refused() {
        assert!(text_of(&json!({"text": 3})).is_err());
        assert_eq!(text_of(&json!({"text": "a b"})), Ok("a b"));
    }
}
