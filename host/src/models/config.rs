//! The operator's `colony.toml`: which model aliases exist and how to reach
//! them. Parsed strictly, because a typo in a provider's settings would
//! otherwise surface hours later as a failed task: unknown sections and keys,
//! an unknown `api` and bad values are errors at start-up that name the file,
//! the alias and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The reply limit (and budget reservation) of a call that sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// How long one call may take, retries included, when the alias sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The top-level sections a `colony.toml` may have today.
const SECTIONS: &[&str] = &["models"];

/// The wire protocol of a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI-compatible chat completions (`{base_url}/chat/completions`).
    OpenAi,
    /// The Anthropic Messages API (`{base_url}/v1/messages`).
    Anthropic,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }
}

/// One alias, `[models.<alias>]`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub api: Api,
    /// Without a trailing slash. For `openai` it includes the version
    /// (`http://127.0.0.1:11434/v1`); for `anthropic` it does not.
    pub base_url: String,
    /// The provider's model id.
    pub model: String,
    /// The environment variable holding the API key; none for local servers.
    pub api_key_env: Option<String>,
    /// The bound on one call, retries and rate-limit waits included.
    pub timeout: Duration,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    /// The prices of prompt tokens read from the provider's prompt cache
    /// and (Anthropic) written to it; unset, the input price.
    pub cache_read_usd_per_mtok: Option<f64>,
    pub cache_write_usd_per_mtok: Option<f64>,
    /// The reply limit of a call that sets none.
    pub max_tokens: u32,
    /// The request field that carries it: `max_tokens`, or OpenAI's
    /// `max_completion_tokens`, which its own API requires of its reasoning
    /// models (they refuse `max_tokens`) and compatible servers may not read.
    pub max_tokens_field: &'static str,
}

/// The models section of a `colony.toml`: every alias the operator declared.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelsConfig {
    /// The file the aliases came from, for error messages.
    path: PathBuf,
    aliases: BTreeMap<String, ModelConfig>,
}

/// A `colony.toml` that cannot be used. Every message names the file, and
/// the alias and key where there is one. (TOML errors are boxed: they are
/// large, and every `Result` carrying this error would pay for them.)
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid TOML", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{}: unknown section `{key}` (known: {})", path.display(), SECTIONS.join(", "))]
    UnknownSection { path: PathBuf, key: String },
    #[error("{}: `models` must be a table of aliases, e.g. [models.fast]", path.display())]
    ModelsNotTable { path: PathBuf },
    #[error("{}: [models.{alias}]: {reason}", path.display())]
    Alias {
        path: PathBuf,
        alias: String,
        reason: String,
    },
    #[error("{}: [models.{alias}] key `{key}`: {reason}", path.display())]
    Key {
        path: PathBuf,
        alias: String,
        key: String,
        reason: String,
    },
    /// A key of the wrong type; the TOML error says which type was expected.
    #[error("{}: [models.{alias}] key `{key}`", path.display())]
    KeyType {
        path: PathBuf,
        alias: String,
        key: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error(
        "{}: [models.{alias}] key `api_key_env`: the environment variable {} is not set or is empty",
        path.display(), shown_var_name(var)
    )]
    MissingKey {
        path: PathBuf,
        alias: String,
        var: String,
    },
    /// A key an HTTP header cannot carry: it went out empty, and the
    /// provider's 401 came long after start-up.
    #[error(
        "{}: [models.{alias}] key `api_key_env`: the value of {} cannot be sent in an HTTP header: \
         character {position} is {what} (a key pasted with a second line, or a stray character?)",
        path.display(), shown_var_name(var)
    )]
    UnsendableKey {
        path: PathBuf,
        alias: String,
        var: String,
        position: usize,
        what: &'static str,
    },
    #[error("cannot set up the HTTP client for model providers")]
    Client(#[source] reqwest::Error),
}

/// `[models.<alias>]` as written; checked into a [`ModelConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlias {
    api: String,
    base_url: String,
    model: String,
    api_key_env: Option<String>,
    timeout: Option<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    input_usd_per_mtok: Option<f64>,
    output_usd_per_mtok: Option<f64>,
    cache_read_usd_per_mtok: Option<f64>,
    cache_write_usd_per_mtok: Option<f64>,
    max_tokens: Option<u32>,
    max_tokens_field: Option<String>,
}

/// Every key of `[models.<alias>]`, in the order the docs list them.
const KEYS: &[&str] = &[
    "api",
    "base_url",
    "model",
    "api_key_env",
    "timeout",
    "requests_per_minute",
    "tokens_per_minute",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cache_read_usd_per_mtok",
    "cache_write_usd_per_mtok",
    "max_tokens",
    "max_tokens_field",
];
const REQUIRED: &[&str] = &["api", "base_url", "model"];

impl ModelsConfig {
    /// Reads `path`, which must exist.
    pub fn load(path: &Path) -> Result<ModelsConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ModelsConfig::from_toml(&text, path)
    }

    /// Reads `path`; a missing file means no models (local use without
    /// providers needs no config file), any other read error is an error.
    pub fn load_optional(path: &Path) -> Result<ModelsConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => ModelsConfig::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelsConfig {
                path: path.to_path_buf(),
                aliases: BTreeMap::new(),
            }),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the text of a `colony.toml`; `path_for_messages` only names
    /// the file in errors.
    pub fn from_toml(text: &str, path_for_messages: &Path) -> Result<ModelsConfig, ConfigError> {
        let path = path_for_messages.to_path_buf();
        let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let mut aliases = BTreeMap::new();
        for (section, value) in table {
            if section != "models" {
                return Err(ConfigError::UnknownSection { path, key: section });
            }
            let toml::Value::Table(models) = value else {
                return Err(ConfigError::ModelsNotTable { path });
            };
            for (alias, value) in models {
                let config = parse_alias(&path, &alias, value)?;
                aliases.insert(alias, config);
            }
        }
        Ok(ModelsConfig { path, aliases })
    }

    /// The aliases, in name order.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.keys().map(String::as_str)
    }

    pub fn get(&self, alias: &str) -> Option<&ModelConfig> {
        self.aliases.get(alias)
    }

    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty()
    }

    /// The file these aliases came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &ModelConfig)> {
        self.aliases
            .iter()
            .map(|(name, config)| (name.as_str(), config))
    }
}

fn parse_alias(path: &Path, alias: &str, value: toml::Value) -> Result<ModelConfig, ConfigError> {
    let alias_error = |reason: String| ConfigError::Alias {
        path: path.to_path_buf(),
        alias: alias.to_string(),
        reason,
    };
    let key_error = |key: &str, reason: String| ConfigError::Key {
        path: path.to_path_buf(),
        alias: alias.to_string(),
        key: key.to_string(),
        reason,
    };
    // Alias names travel through manifests, the CLI and events: keep them
    // to characters that need no quoting anywhere.
    let valid_name = !alias.is_empty()
        && alias.len() <= 64
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_name {
        return Err(alias_error(
            "an alias is 1 to 64 letters, digits, `-` or `_`".into(),
        ));
    }
    let toml::Value::Table(table) = value else {
        return Err(alias_error(
            "must be a table of keys (api, base_url, model, ...)".into(),
        ));
    };
    // Checked here rather than left to serde so that the message names the
    // key and lists the known ones in a stable order.
    if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(key_error(
            unknown,
            format!("unknown key (known: {})", KEYS.join(", ")),
        ));
    }
    if let Some(missing) = REQUIRED.iter().find(|k| !table.contains_key(**k)) {
        return Err(key_error(missing, "missing (it is required)".into()));
    }
    let raw: RawAlias = serde_path_to_error::deserialize(table).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::KeyType {
            path: path.to_path_buf(),
            alias: alias.to_string(),
            key,
            source: Box::new(e.into_inner()),
        }
    })?;

    let api = match raw.api.as_str() {
        "openai" => Api::OpenAi,
        "anthropic" => Api::Anthropic,
        other => {
            return Err(key_error(
                "api",
                format!("unknown api {other:?} (use \"openai\" or \"anthropic\")"),
            ));
        }
    };
    let base_url = raw.base_url.trim_end_matches('/').to_string();
    let host = match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            url.host_str().unwrap_or_default().to_ascii_lowercase()
        }
        Ok(_) => {
            return Err(key_error(
                "base_url",
                format!("{base_url:?} is not an http:// or https:// URL"),
            ));
        }
        Err(e) => return Err(key_error("base_url", format!("{base_url:?}: {e}"))),
    };
    // The endpoint's own path is appended: a base_url that already ends
    // with it would be sent to ".../chat/completions/chat/completions",
    // a 404 at the first call rather than an error at start.
    let endpoint_path = match api {
        Api::OpenAi => "/chat/completions",
        Api::Anthropic => "/v1/messages",
    };
    // Anthropic's root is the host's (".../v1" went to ".../v1/v1/messages").
    let names_endpoint = base_url.ends_with(endpoint_path)
        || (api == Api::Anthropic
            && (base_url.ends_with("/messages") || base_url.ends_with("/v1")));
    if names_endpoint {
        let root = base_url.trim_end_matches(endpoint_path);
        let root = match api {
            Api::OpenAi => root,
            Api::Anthropic => root.trim_end_matches("/messages").trim_end_matches("/v1"),
        };
        return Err(key_error(
            "base_url",
            format!(
                "{base_url:?} names the endpoint, but Colony appends {endpoint_path:?} itself: give the API's root, {root:?}"
            ),
        ));
    }
    if raw.model.trim().is_empty() {
        return Err(key_error("model", "must not be empty".into()));
    }
    if let Some(var) = &raw.api_key_env {
        super::remember_provider_key_variable(var);
        let valid = !var.is_empty()
            && !var.starts_with(|c: char| c.is_ascii_digit())
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(key_error(
                "api_key_env",
                format!(
                    "{} is not an environment variable name (letters, digits, `_`); \
                     give the variable's name, never the key itself",
                    shown_var_name(var)
                ),
            ));
        }
    }
    let timeout = match &raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(text) => {
            let timeout = humantime::parse_duration(text).map_err(|e| {
                key_error("timeout", format!("{text:?}: {e} (try \"30s\" or \"2m\")"))
            })?;
            if timeout.is_zero() {
                return Err(key_error("timeout", "must be longer than 0".into()));
            }
            timeout
        }
    };
    for (key, value) in [
        ("requests_per_minute", raw.requests_per_minute),
        ("tokens_per_minute", raw.tokens_per_minute),
        ("max_tokens", raw.max_tokens),
    ] {
        if value == Some(0) {
            return Err(key_error(key, "must be at least 1".into()));
        }
    }
    for (key, value) in [
        ("input_usd_per_mtok", raw.input_usd_per_mtok),
        ("output_usd_per_mtok", raw.output_usd_per_mtok),
        ("cache_read_usd_per_mtok", raw.cache_read_usd_per_mtok),
        ("cache_write_usd_per_mtok", raw.cache_write_usd_per_mtok),
    ] {
        if let Some(price) = value
            && !(price.is_finite() && price >= 0.0)
        {
            return Err(key_error(key, format!("{price} is not a price (≥ 0)")));
        }
    }
    let max_tokens_field = match (api, raw.max_tokens_field.as_deref()) {
        (Api::Anthropic, Some(_)) => {
            return Err(key_error(
                "max_tokens_field",
                "is for api = \"openai\" only (the Anthropic API reads max_tokens)".into(),
            ));
        }
        (_, Some("max_tokens")) | (Api::Anthropic, None) => "max_tokens",
        (_, Some("max_completion_tokens")) => "max_completion_tokens",
        (_, Some(other)) => {
            return Err(key_error(
                "max_tokens_field",
                format!("{other:?}: use \"max_tokens\" or \"max_completion_tokens\""),
            ));
        }
        // OpenAI's own API: its reasoning models refuse max_tokens.
        (Api::OpenAi, None) if host == "api.openai.com" => "max_completion_tokens",
        (Api::OpenAi, None) => "max_tokens",
    };
    Ok(ModelConfig {
        api,
        base_url,
        model: raw.model,
        api_key_env: raw.api_key_env,
        timeout,
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
        input_usd_per_mtok: raw.input_usd_per_mtok,
        output_usd_per_mtok: raw.output_usd_per_mtok,
        cache_read_usd_per_mtok: raw.cache_read_usd_per_mtok,
        cache_write_usd_per_mtok: raw.cache_write_usd_per_mtok,
        max_tokens: raw.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        max_tokens_field,
    })
}

/// `api_key_env` as an error message may show it: a conventional name
/// (`OPENAI_API_KEY`) or a short one in full; anything else only by its
/// first characters and length, since a key pasted in place of its
/// variable's name would otherwise be printed to a terminal or a CI log.
fn shown_var_name(var: &str) -> String {
    let conventional = var
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    // Provider keys run to 40 characters and more; names rarely do.
    if conventional || var.chars().count() <= 24 {
        return format!("`{var}`");
    }
    let start: String = var.chars().take(4).collect();
    format!(
        "`{start}…` ({} characters, the rest not shown in case it is a key)",
        var.chars().count()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelsConfig, ConfigError> {
        ModelsConfig::from_toml(text, Path::new("colony.toml"))
    }

    /// The message as the CLI prints it: the error and its sources.
    fn message(err: &ConfigError) -> String {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(cause.to_string().trim_end());
            source = cause.source();
        }
        text
    }

    #[test]
    fn full_alias_and_defaults() {
        let config = parse(
            r#"
            [models.fast]
            api = "openai"
            base_url = "http://127.0.0.1:11434/v1/"
            model = "llama3.2"
            api_key_env = "OPENAI_API_KEY"
            timeout = "30s"
            requests_per_minute = 500
            tokens_per_minute = 200000
            input_usd_per_mtok = 0.15
            output_usd_per_mtok = 1
            max_tokens = 2048
            [models.smart]
            api = "anthropic"
            base_url = "https://api.anthropic.com"
            model = "claude-sonnet-4-5"
            "#,
        )
        .unwrap();
        assert_eq!(config.aliases().collect::<Vec<_>>(), ["fast", "smart"]);
        let fast = config.get("fast").unwrap();
        assert_eq!(fast.api, Api::OpenAi);
        assert_eq!(fast.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(fast.timeout, Duration::from_secs(30));
        assert_eq!(fast.output_usd_per_mtok, Some(1.0));
        assert_eq!(fast.max_tokens, 2048);
        let smart = config.get("smart").unwrap();
        assert_eq!(smart.api, Api::Anthropic);
        assert_eq!(smart.timeout, DEFAULT_TIMEOUT);
        assert_eq!(smart.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(smart.api_key_env, None);
    }

    #[test]
    fn empty_file_has_no_models() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("[models]\n").unwrap().is_empty());
    }

    #[test]
    fn errors_name_file_alias_and_key() {
        let base = "api = \"openai\"\nbase_url = \"http://localhost:1/v1\"\nmodel = \"m\"\n";
        let cases = [
            (
                format!("[models.fast]\n{base}colour = 1\n"),
                "colony.toml: [models.fast] key `colour`: unknown key (known: api, ",
            ),
            (
                "[models.fast]\napi = \"foo\"\nbase_url = \"http://x\"\nmodel = \"m\"\n"
                    .to_string(),
                "colony.toml: [models.fast] key `api`: unknown api \"foo\" (use \"openai\" or \"anthropic\")",
            ),
            (
                "[models.fast]\napi = \"openai\"\nmodel = \"m\"\n".to_string(),
                "colony.toml: [models.fast] key `base_url`: missing",
            ),
            (
                "[models.fast]\napi = \"openai\"\nbase_url = \"http://x/v1/chat/completions\"\nmodel = \"m\"\n"
                    .to_string(),
                "key `base_url`: \"http://x/v1/chat/completions\" names the endpoint, but Colony appends \"/chat/completions\" itself: give the API's root, \"http://x/v1\"",
            ),
            (
                "[models.smart]\napi = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1/messages/\"\nmodel = \"m\"\n"
                    .to_string(),
                "give the API's root, \"https://api.anthropic.com\"",
            ),
            (
                "[models.smart]\napi = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1\"\nmodel = \"m\"\n"
                    .to_string(),
                "Colony appends \"/v1/messages\" itself: give the API's root, \"https://api.anthropic.com\"",
            ),
            (
                format!("[models.fast]\n{base}timeout = \"soon\"\n"),
                "colony.toml: [models.fast] key `timeout`: \"soon\"",
            ),
            (
                format!("[models.fast]\n{base}timeout = \"0s\"\n"),
                "key `timeout`: must be longer than 0",
            ),
            (
                format!("[models.fast]\n{base}requests_per_minute = \"many\"\n"),
                "colony.toml: [models.fast] key `requests_per_minute`: invalid type",
            ),
            (
                format!("[models.fast]\n{base}requests_per_minute = -1\n"),
                "colony.toml: [models.fast] key `requests_per_minute`: invalid value",
            ),
            (
                format!("[models.fast]\n{base}tokens_per_minute = 0\n"),
                "key `tokens_per_minute`: must be at least 1",
            ),
            (
                format!("[models.fast]\n{base}input_usd_per_mtok = -1.0\n"),
                "key `input_usd_per_mtok`: -1 is not a price",
            ),
            (
                format!(
                    "[models.fast]\n{base}api_key_env = \"sk-proj abcdefghijklmnopqrstuvwxyz\"\n"
                ),
                "key `api_key_env`: `sk-p…` (34 characters, the rest not shown in case it is a key) is not an environment variable name",
            ),
            (
                format!("[models.fast]\n{base}api_key_env = \"my key\"\n"),
                "key `api_key_env`: `my key` is not an environment variable name",
            ),
            (
                "[models.fast]\napi = \"openai\"\nbase_url = \"ftp://x\"\nmodel = \"m\"\n"
                    .to_string(),
                "key `base_url`: \"ftp://x\" is not an http",
            ),
            (
                format!("[models.\"a b\"]\n{base}"),
                "colony.toml: [models.a b]: an alias is",
            ),
            (
                format!("[server]\nport = 1\n[models.fast]\n{base}"),
                "colony.toml: unknown section `server` (known: models)",
            ),
            (
                "models = 3\n".to_string(),
                "colony.toml: `models` must be a table",
            ),
            (
                "[models]\nfast = 3\n".to_string(),
                "colony.toml: [models.fast]: must be a table",
            ),
            (
                "[models.fast\n".to_string(),
                "colony.toml: not valid TOML: TOML parse error",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).expect_err(&text);
            let message = message(&err);
            assert!(
                message.contains(expected),
                "{text}\n=> {message}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn load_optional_tolerates_only_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("colony.toml");
        assert!(ModelsConfig::load_optional(&missing).unwrap().is_empty());
        let err = ModelsConfig::load(&missing).unwrap_err();
        assert!(
            err.to_string().contains("colony.toml: cannot read"),
            "{err}"
        );
        // A directory where the file should be is an error, not "no models".
        assert!(ModelsConfig::load_optional(dir.path()).is_err());
    }
}
