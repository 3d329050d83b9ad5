//! The OpenAI-compatible chat completions protocol (`POST
//! {base_url}/chat/completions`), as OpenAI documents it and Ollama, vLLM,
//! llama.cpp's server and LM Studio implement it.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChatReply, ChatRequest, Finish, ModelError, Role, ToolCall, Usage};

/// The request body for `model` (the provider's id).
/// The request; `max_tokens` goes in `max_tokens_field` (see
/// [`super::ModelConfig::max_tokens_field`]).
pub(super) fn request_body(
    model: &str,
    req: &ChatRequest,
    max_tokens: u32,
    max_tokens_field: &str,
) -> Result<Value, ModelError> {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|message| {
            let role = match message.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            let mut out = json!({ "role": role, "content": message.content });
            if !message.tool_calls.is_empty() {
                // An assistant turn that only calls tools has null content
                // in OpenAI's own transcripts; some servers reject "".
                if message.content.is_empty() {
                    out["content"] = Value::Null;
                }
                out["tool_calls"] = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.id,
                            "type": "function",
                            "function": { "name": call.name, "arguments": call.arguments },
                        })
                    })
                    .collect();
            }
            if let Some(id) = &message.tool_call_id {
                out["tool_call_id"] = json!(id);
            }
            out
        })
        .collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
    });
    body[max_tokens_field] = json!(max_tokens);
    if !req.tools.is_empty() {
        let tools = req
            .tools
            .iter()
            .map(|tool| {
                Ok(json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": super::providers::parse_schema(tool)?,
                    },
                }))
            })
            .collect::<Result<Vec<Value>, ModelError>>()?;
        body["tools"] = Value::Array(tools);
    }
    if let Some(temperature) = req.temperature {
        body["temperature"] = super::providers::temperature_json(temperature);
    }
    if req.json {
        body["response_format"] = json!({ "type": "json_object" });
    }
    Ok(body)
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    model: String,
    choices: Vec<Choice>,
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ReplyMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ReplyMessage {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<RawToolCall>>,
}

#[derive(Deserialize)]
struct RawToolCall {
    #[serde(default)]
    id: String,
    function: RawFunction,
}

#[derive(Deserialize)]
struct RawFunction {
    name: String,
    /// JSON text per OpenAI; some compatible servers send the object itself.
    arguments: Value,
}

/// `prompt_tokens` includes those served from OpenAI's prompt cache,
/// which `prompt_tokens_details.cached_tokens` counts (billed at a discount).
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<RawPromptDetails>,
}

#[derive(Deserialize)]
struct RawPromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// The reply, and the usage when the server reported it.
pub(super) fn parse_reply(body: &[u8]) -> Result<(ChatReply, Option<Usage>), String> {
    let reply: Reply = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let Some(choice) = reply.choices.into_iter().next() else {
        return Err("no choices in the reply".into());
    };
    let tool_calls: Vec<ToolCall> = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, call)| ToolCall {
            // Some local servers leave ids out; a tool result needs one.
            id: if call.id.is_empty() {
                format!("call_{i}")
            } else {
                call.id
            },
            name: call.function.name,
            arguments: match call.function.arguments {
                Value::String(text) => text,
                other => other.to_string(),
            },
        })
        .collect();
    let finish = match choice.finish_reason.as_deref() {
        Some("stop") => Finish::Stop,
        Some("length") => Finish::Length,
        Some("tool_calls" | "function_call") => Finish::ToolCalls,
        None if !tool_calls.is_empty() => Finish::ToolCalls,
        _ => Finish::Other,
    };
    let usage = reply.usage.map(|u| Usage {
        input_tokens: u.prompt_tokens,
        output_tokens: u.completion_tokens,
        // Never more than the prompt: a server's odd count cannot make
        // the uncached part negative.
        cache_read_tokens: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(u.prompt_tokens),
        cache_write_tokens: 0,
    });
    Ok((
        ChatReply {
            content: choice.message.content.unwrap_or_default(),
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

    #[test]
    fn body_shapes_tools_calls_and_results() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "lookup".into(),
            arguments: r#"{"word":"mug"}"#.into(),
        };
        let req = ChatRequest {
            model: "fast".into(),
            messages: vec![
                Message::system("Be brief."),
                Message::user("Define mug"),
                Message {
                    tool_calls: vec![call],
                    ..Message::assistant("")
                },
                Message::tool_result("call_1", "a cup"),
            ],
            tools: vec![Tool {
                name: "lookup".into(),
                description: "Looks up a word".into(),
                parameters: r#"{"type":"object"}"#.into(),
            }],
            temperature: Some(0.7),
            json: true,
            ..ChatRequest::default()
        };
        let body = request_body("llama3.2", &req, 99, "max_tokens").unwrap();
        assert_eq!(body["model"], "llama3.2");
        assert_eq!(body["max_tokens"], 99);
        assert_eq!(body["temperature"], 0.7);
        assert_eq!(body["response_format"]["type"], "json_object");
        assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(
            messages[0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(messages[2]["content"], Value::Null);
        assert_eq!(messages[2]["tool_calls"][0]["type"], "function");
        assert_eq!(
            messages[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"word":"mug"}"#
        );
        assert_eq!(
            messages[3],
            json!({"role": "tool", "content": "a cup", "tool_call_id": "call_1"})
        );
    }

    #[test]
    fn parses_answers_and_tool_calls() {
        let (reply, usage) = parse_reply(
            br#"{"model":"m-1","choices":[{"message":{"role":"assistant","content":null,
               "tool_calls":[{"id":"c9","type":"function","function":{"name":"f","arguments":{"a":1}}}]},
               "finish_reason":"tool_calls"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(reply.finish, Finish::ToolCalls);
        assert_eq!(reply.content, "");
        assert_eq!(reply.tool_calls[0].id, "c9");
        assert_eq!(reply.tool_calls[0].arguments, r#"{"a":1}"#);
        assert_eq!(usage.unwrap().input_tokens, 12);
        assert!(parse_reply(br#"{"choices":[]}"#).is_err());
        assert!(parse_reply(b"not json").is_err());
        let (_, usage) =
            parse_reply(br#"{"choices":[{"message":{"content":"hi"},"finish_reason":"length"}]}"#)
                .unwrap();
        assert_eq!(usage, None);
    }
}
