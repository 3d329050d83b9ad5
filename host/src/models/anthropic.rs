//! The Anthropic Messages API (`POST {base_url}/v1/messages`), as Anthropic
//! documents it. Its conversation differs from the chat-completions one:
//! system text is a top-level field, a turn is a list of content blocks, tool
//! calls are `tool_use` blocks of the assistant, and tool results are
//! `tool_result` blocks of a *user* turn.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChatReply, ChatRequest, Finish, ModelError, Role, ToolCall, Usage};

/// The API version this module speaks (sent as `anthropic-version`).
pub(super) const VERSION: &str = "2023-06-01";

/// What `json = true` adds to the system prompt: the Messages API has no
/// JSON mode, so the request says it in words.
pub(super) const JSON_INSTRUCTION: &str =
    "Answer with exactly one JSON object and nothing else: no prose, no code fences.";

/// The request body for `model` (the provider's id).
pub(super) fn request_body(
    model: &str,
    req: &ChatRequest,
    max_tokens: u32,
) -> Result<Value, ModelError> {
    let mut system: Vec<&str> = Vec::new();
    // (role, blocks): consecutive messages of one role become one turn, so
    // the results of parallel tool calls travel together in one user turn,
    // as the API asks.
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for (index, message) in req.messages.iter().enumerate() {
        let (role, blocks) = match message.role {
            Role::System => {
                system.push(&message.content);
                continue;
            }
            Role::User => ("user", text_block(&message.content)),
            Role::Assistant => {
                let mut blocks = text_block(&message.content);
                for call in &message.tool_calls {
                    let input = if call.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        let input = serde_json::from_str::<Value>(&call.arguments).map_err(|e| {
                            ModelError::InvalidRequest(format!(
                                "message {index}: the arguments of tool call `{}` are not valid JSON: {e}",
                                call.id
                            ))
                        })?;
                        crate::json::check_numbers(&input).map_err(|why| {
                            ModelError::InvalidRequest(format!(
                                "message {index}: the arguments of tool call `{}`: {why}",
                                call.id
                            ))
                        })?;
                        input
                    };
                    blocks.push(json!({
                        "type": "tool_use", "id": call.id, "name": call.name, "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            Role::Tool => {
                let Some(id) = &message.tool_call_id else {
                    return Err(ModelError::InvalidRequest(format!(
                        "message {index}: a tool result needs the tool_call_id of the call it answers"
                    )));
                };
                let block =
                    json!({ "type": "tool_result", "tool_use_id": id, "content": message.content });
                ("user", vec![block])
            }
        };
        if blocks.is_empty() {
            // An empty text turn is refused by the API; it carries nothing.
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    let mut body = json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": messages,
    });
    if req.json {
        system.push(JSON_INSTRUCTION);
    }
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !req.tools.is_empty() {
        let tools = req
            .tools
            .iter()
            .map(|tool| {
                Ok(json!({
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": super::providers::parse_schema(tool)?,
                }))
            })
            .collect::<Result<Vec<Value>, ModelError>>()?;
        body["tools"] = Value::Array(tools);
    }
    if let Some(temperature) = req.temperature {
        body["temperature"] = super::providers::temperature_json(temperature);
    }
    Ok(body)
}

fn text_block(text: &str) -> Vec<Value> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![json!({ "type": "text", "text": text })]
    }
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    model: String,
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Option<RawUsage>,
}

/// Internally tagged: serde reads its variants through buffered content,
/// where serde_json's `arbitrary_precision` leaves numbers as maps, so a
/// variant can hold `Value`s and strings but no numeric field.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// Thinking and other block types carry nothing an agent asked for.
    #[serde(other)]
    Other,
}

/// Anthropic counts prompt tokens read from or written to its prompt cache
/// apart from `input_tokens`; all were processed and billed (at their own
/// rates), so budgets count them as input.
#[derive(Deserialize)]
struct RawUsage {
    input_tokens: u32,
    output_tokens: u32,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

/// The reply, and the usage when the server reported it.
pub(super) fn parse_reply(body: &[u8]) -> Result<(ChatReply, Option<Usage>), String> {
    let reply: Reply = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for block in reply.content {
        match block {
            Block::Text { text } => content.push_str(&text),
            Block::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                name,
                arguments: input.to_string(),
            }),
            Block::Other => {}
        }
    }
    let finish = match reply.stop_reason.as_deref() {
        Some("end_turn" | "stop_sequence") => Finish::Stop,
        Some("max_tokens") => Finish::Length,
        Some("tool_use") => Finish::ToolCalls,
        _ => Finish::Other,
    };
    let usage = reply.usage.map(|u| {
        let (written, read) = (
            u.cache_creation_input_tokens.unwrap_or(0),
            u.cache_read_input_tokens.unwrap_or(0),
        );
        let input_tokens = u.input_tokens.saturating_add(written).saturating_add(read);
        Usage {
            input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: read.min(input_tokens),
            cache_write_tokens: written.min(input_tokens - read.min(input_tokens)),
        }
    });
    Ok((
        ChatReply {
            content,
            tool_calls,
            finish,
            usage: usage.unwrap_or_default(),
            model: reply.model,
        },
        usage,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Message, Tool};

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "lookup".into(),
            arguments: r#"{"word":"mug"}"#.into(),
        }
    }

    #[test]
    fn body_moves_system_and_shapes_tool_turns() {
        let req = ChatRequest {
            model: "smart".into(),
            messages: vec![
                Message::system("Be brief."),
                Message::user("Define mug and cup"),
                Message {
                    tool_calls: vec![call("tu_1"), call("tu_2")],
                    ..Message::assistant("Looking up.")
                },
                Message::tool_result("tu_1", "a mug"),
                Message::tool_result("tu_2", "a cup"),
            ],
            tools: vec![Tool {
                name: "lookup".into(),
                description: "Looks up a word".into(),
                parameters: r#"{"type":"object"}"#.into(),
            }],
            json: true,
            ..ChatRequest::default()
        };
        let body = request_body("claude", &req, 512).unwrap();
        assert_eq!(body["max_tokens"], 512);
        assert_eq!(
            body["system"],
            format!("Be brief.\n\n{JSON_INSTRUCTION}").as_str()
        );
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(messages[1]["content"][1]["type"], "tool_use");
        assert_eq!(messages[1]["content"][1]["input"]["word"], "mug");
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(
            messages[2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "a mug"},
                {"type": "tool_result", "tool_use_id": "tu_2", "content": "a cup"},
            ])
        );
    }

    #[test]
    fn bad_arguments_and_missing_ids_are_invalid_requests() {
        for arguments in ["{not json", r#"{"n": 1e999}"#] {
            let mut bad = call("tu_1");
            bad.arguments = arguments.into();
            let req = ChatRequest {
                messages: vec![Message {
                    tool_calls: vec![bad],
                    ..Message::assistant("")
                }],
                ..ChatRequest::default()
            };
            assert!(
                matches!(
                    request_body("m", &req, 1),
                    Err(ModelError::InvalidRequest(_))
                ),
                "{arguments}"
            );
        }
        let mut orphan = Message::tool_result("x", "y");
        orphan.tool_call_id = None;
        let req = ChatRequest {
            messages: vec![orphan],
            ..ChatRequest::default()
        };
        assert!(matches!(
            request_body("m", &req, 1),
            Err(ModelError::InvalidRequest(_))
        ));
    }

    #[test]
    fn parses_text_and_tool_use_blocks() {
        let (reply, usage) = parse_reply(
            br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x",
               "content":[{"type":"thinking","thinking":"hm"},{"type":"text","text":"Let me "},
                          {"type":"text","text":"check."},
                          {"type":"tool_use","id":"tu_9","name":"lookup","input":{"word":"mug"}}],
               "stop_reason":"tool_use","usage":{"input_tokens":20,"output_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(reply.content, "Let me check.");
        assert_eq!(reply.finish, Finish::ToolCalls);
        assert_eq!(reply.tool_calls[0].arguments, r#"{"word":"mug"}"#);
        assert_eq!(reply.model, "claude-x");
        assert_eq!(usage, Some(Usage::new(20, 7)));
        assert!(parse_reply(br#"{"content":"oops"}"#).is_err());
    }

    /// Tokens read from or written to the prompt cache are counted apart
    /// from `input_tokens` by Anthropic, and count as input here (they were
    /// processed and billed); null or absent, they count nothing.
    #[test]
    fn prompt_cache_tokens_count_as_input() {
        let with_cache = br#"{"content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":3,"cache_creation_input_tokens":1200,
                     "cache_read_input_tokens":800,"output_tokens":5}}"#;
        let (reply, usage) = parse_reply(with_cache).unwrap();
        let expected = Usage {
            cache_read_tokens: 800,
            cache_write_tokens: 1200,
            ..Usage::new(2003, 5)
        };
        assert_eq!((reply.usage, usage), (expected, Some(expected)));
        let nulls = br#"{"content":[],"usage":{"input_tokens":3,"output_tokens":5,
            "cache_creation_input_tokens":null,"cache_read_input_tokens":null}}"#;
        assert_eq!(parse_reply(nulls).unwrap().1.unwrap().input_tokens, 3);
    }
}
