//! Model providers: the host's side of the `model` capability.
//!
//! An agent never holds a key, a URL or a socket: it names an *alias* granted
//! by its manifest, and the host makes the call through the provider the
//! operator configured for that alias in `colony.toml` ([`ModelsConfig`]).
//! [`Providers`] owns the HTTP client, the API keys (read from the
//! environment once, at start-up) and the per-alias rate limits, and speaks
//! two wire protocols: OpenAI-compatible chat completions ([`Api::OpenAi`]:
//! OpenAI, Ollama, vLLM, llama.cpp, LM Studio) and the Anthropic Messages API
//! ([`Api::Anthropic`]).
//!
//! This module knows no SQL and no wasm: budgets per task and the replay
//! journal are kept by the callers, which use [`request_hash`] and
//! [`estimate_prompt_tokens`] from here so that every process agrees on them.

mod anthropic;
mod config;
mod exchange;
mod journal;
mod limits;
mod messages;
mod openai;
mod providers;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use config::{
    Api, ConfigError, DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT, ModelConfig, ModelsConfig,
};
pub use journal::{Budget, BudgetOf, ModelCall, ModelContext};
pub use providers::Providers;

/// Who wrote a message of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The result of a tool call, answering the assistant's [`ToolCall`]
    /// named by [`Message::tool_call_id`].
    Tool,
}

/// A tool call the model asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call; a tool result refers to it.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (as the model wrote them).
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The calls an assistant message made (empty otherwise).
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// For a [`Role::Tool`] message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl Message {
    fn plain(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Message {
        Message::plain(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message::plain(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message::plain(Role::Assistant, content)
    }

    /// The assistant turn of a reply, tool calls included: what a
    /// conversation appends before answering the calls.
    pub fn from_reply(reply: &ChatReply) -> Message {
        Message {
            tool_calls: reply.tool_calls.clone(),
            ..Message::plain(Role::Assistant, reply.content.clone())
        }
    }

    /// The result of the tool call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            tool_call_id: Some(call_id.into()),
            ..Message::plain(Role::Tool, content)
        }
    }
}

/// A tool the model may call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// The arguments' JSON Schema, as JSON text.
    pub parameters: String,
}

/// One model call, as an agent asks for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The alias (`[models.<alias>]` in `colony.toml`), not the provider's model id.
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Vec<Tool>,
    /// The most tokens the reply may have; the alias's `max_tokens` when none.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Ask for one JSON object as the answer.
    #[serde(default)]
    pub json: bool,
}

/// Tokens a call consumed, as the provider counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Every prompt token, those served from or written to the provider's
    /// prompt cache included (budgets count them all).
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Of `input_tokens`, those read from the prompt cache and (Anthropic)
    /// written to it: billed at their own prices.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Usage {
    /// `input` prompt tokens (none from a cache) and `output` reply tokens.
    pub fn new(input_tokens: u32, output_tokens: u32) -> Usage {
        Usage {
            input_tokens,
            output_tokens,
            ..Usage::default()
        }
    }

    pub fn total(&self) -> u64 {
        u64::from(self.input_tokens) + u64::from(self.output_tokens)
    }
}

/// Why the model stopped writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// A natural end (or a stop sequence).
    Stop,
    /// The reply hit `max_tokens`.
    Length,
    /// The model is waiting for the results of its tool calls.
    ToolCalls,
    Other,
}

/// A model's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatReply {
    pub content: String,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
    pub usage: Usage,
    /// The provider's model id (e.g. `gpt-4o-mini-2024-07-18`), not the alias.
    pub model: String,
}

/// Why a model call failed. Every message is a sentence safe to show the
/// agent: it may name the alias and an HTTP status, never a key or a URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum ModelError {
    /// The alias is unknown here, or not granted to the agent.
    #[error("{0}")]
    NotGranted(String),
    /// The task (or its chain) has no tokens left for this call.
    #[error("{0}")]
    BudgetExceeded(String),
    /// The provider (or this host's own limit) kept refusing within the
    /// call's time.
    #[error("{0}")]
    RateLimited(String),
    /// Network error, 5xx, timeout, or a reply that could not be understood.
    #[error("{0}")]
    Unavailable(String),
    /// The provider refused the request (a 4xx other than 429), or the
    /// request cannot be sent as it is.
    #[error("{0}")]
    InvalidRequest(String),
}

impl ModelError {
    /// The error kind as recorded in events and the journal.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::NotGranted(_) => "not_granted",
            ModelError::BudgetExceeded(_) => "budget_exceeded",
            ModelError::RateLimited(_) => "rate_limited",
            ModelError::Unavailable(_) => "unavailable",
            ModelError::InvalidRequest(_) => "invalid_request",
        }
    }

    /// An error of the same kind, saying `message` instead.
    pub fn same_kind(&self, message: String) -> ModelError {
        match self {
            ModelError::NotGranted(_) => ModelError::NotGranted(message),
            ModelError::BudgetExceeded(_) => ModelError::BudgetExceeded(message),
            ModelError::RateLimited(_) => ModelError::RateLimited(message),
            ModelError::Unavailable(_) => ModelError::Unavailable(message),
            ModelError::InvalidRequest(_) => ModelError::InvalidRequest(message),
        }
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            ModelError::NotGranted(m)
            | ModelError::BudgetExceeded(m)
            | ModelError::RateLimited(m)
            | ModelError::Unavailable(m)
            | ModelError::InvalidRequest(m) => m,
        }
    }
}

/// A stable fingerprint of a request: lowercase hex SHA-256 of its canonical
/// serialization. The replay journal compares it across processes and
/// versions, so the serialization is serde_json of [`ChatRequest`] (fields in
/// declaration order, no maps whose order could vary) behind a version tag:
/// a change to the request's shape must change the tag, not silently make
/// old journals match or mismatch.
pub fn request_hash(req: &ChatRequest) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"colony.model.request.v1\n");
    // Serializing plain structs of strings, numbers and bools cannot fail.
    let json = serde_json::to_vec(req).expect("a ChatRequest always serializes");
    hasher.update(&json);
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The environment variables this process reads provider keys from
/// (`api_key_env` of every alias of the colony.toml it loaded): an agent's
/// manifest may not name them as its HTTP secrets, which would send the
/// host's provider key to a server the manifest chooses.
static PROVIDER_KEY_VARIABLES: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether `var` holds a provider key of a colony.toml this process loaded.
pub fn is_provider_key_variable(var: &str) -> bool {
    PROVIDER_KEY_VARIABLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(var)
}

/// Remembers the provider-key variables a `colony.toml` names, read
/// leniently (any `api_key_env` string under `[models.*]`, whatever else
/// the file gets wrong), so that every command checks agents' secrets
/// against them, including those that never load the models (`bench
/// --agent`, `status`, `serve`): one that did not listed an agent as
/// loaded, or ran it, with the provider key as its HTTP secret. A missing
/// or unreadable file names nothing.
pub fn remember_provider_keys_of(config: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(config) else {
        return;
    };
    let Ok(table) = toml::from_str::<toml::Table>(&text) else {
        return;
    };
    let aliases = table.get("models").and_then(toml::Value::as_table);
    for alias in aliases.into_iter().flat_map(|models| models.values()) {
        if let Some(var) = alias.get("api_key_env").and_then(toml::Value::as_str) {
            remember_provider_key_variable(var);
        }
    }
}

fn remember_provider_key_variable(var: &str) {
    PROVIDER_KEY_VARIABLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(var.to_string());
}

/// Tokens a request's prompt may take, estimated without a tokenizer: one
/// token per three bytes of text (real tokenizers average about four bytes
/// per token on English, fewer on code and other scripts, so this leans
/// high), plus a few tokens of framing per message and tool, and the
/// system prompt providers add when tools are offered (Anthropic documents
/// about 350 tokens). Budgets and rate limits reserve this before a call and
/// settle to the provider's count after it: erring high only delays, while
/// a provider that counts more than this spends past the reservation by the
/// difference (the README's budget section says so).
pub fn estimate_prompt_tokens(req: &ChatRequest) -> u64 {
    const PER_MESSAGE: u64 = 4;
    const PER_TOOL: u64 = 8;
    const TOOL_USE_PROMPT: u64 = 350;
    let mut bytes = 0u64;
    let mut framing = 3; // the reply's priming
    if !req.tools.is_empty() {
        framing += TOOL_USE_PROMPT;
    }
    for message in &req.messages {
        framing += PER_MESSAGE;
        bytes += message.content.len() as u64;
        bytes += message
            .tool_call_id
            .as_ref()
            .map_or(0, |id| id.len() as u64);
        for call in &message.tool_calls {
            framing += PER_MESSAGE;
            bytes += (call.id.len() + call.name.len() + call.arguments.len()) as u64;
        }
    }
    for tool in &req.tools {
        framing += PER_TOOL;
        bytes += (tool.name.len() + tool.description.len() + tool.parameters.len()) as u64;
    }
    bytes.div_ceil(3) + framing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ChatRequest {
        ChatRequest {
            model: "fast".into(),
            messages: vec![Message::system("Be brief."), Message::user("Hello there")],
            ..ChatRequest::default()
        }
    }

    #[test]
    fn hash_is_stable_hex_and_known() {
        let hash = request_hash(&request());
        assert_eq!(hash.len(), 64);
        assert!(
            hash.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(hash, request_hash(&request().clone()));
    }

    #[test]
    fn hash_changes_with_any_field() {
        let base = request_hash(&request());
        let variants = [
            ChatRequest {
                model: "smart".into(),
                ..request()
            },
            ChatRequest {
                max_tokens: Some(10),
                ..request()
            },
            ChatRequest {
                temperature: Some(0.5),
                ..request()
            },
            ChatRequest {
                json: true,
                ..request()
            },
            ChatRequest {
                messages: vec![Message::system("Be brief."), Message::user("Hello there!")],
                ..request()
            },
        ];
        for variant in variants {
            assert_ne!(request_hash(&variant), base, "{variant:?}");
        }
    }

    #[test]
    fn estimate_counts_every_part() {
        let bare = estimate_prompt_tokens(&ChatRequest::default());
        let with_text = estimate_prompt_tokens(&request());
        assert!(with_text > bare);
        let mut with_tool = request();
        with_tool.tools.push(Tool {
            name: "lookup".into(),
            description: "Looks a word up".into(),
            parameters: r#"{"type":"object","properties":{"word":{"type":"string"}}}"#.into(),
        });
        assert!(
            estimate_prompt_tokens(&with_tool) > with_text + 350,
            "the tool-use system prompt"
        );
        // Leans high: 3 000 bytes of text estimate at least 1 000 tokens.
        let long = ChatRequest {
            messages: vec![Message::user("x".repeat(3000))],
            ..ChatRequest::default()
        };
        assert!(estimate_prompt_tokens(&long) >= 1000);
    }

    #[test]
    fn error_kinds_and_serde_shape() {
        let err = ModelError::RateLimited("model `fast` kept answering 429".into());
        assert_eq!(err.kind(), "rate_limited");
        assert_eq!(err.to_string(), "model `fast` kept answering 429");
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["kind"], "rate_limited");
        assert_eq!(serde_json::from_value::<ModelError>(json).unwrap(), err);
    }
}
