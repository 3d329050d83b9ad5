//! `colony submit`: one task from flags, or a batch from JSON Lines, and
//! the warnings about agents that cannot run what was stored.

use std::io::Read;
use std::path::Path;

use anyhow::{Result, bail};
use serde::Deserialize;

use super::args::{parse_backoff, parse_time, parse_timeout, run_at_after};
use super::{BadInput, Cli, SubmitArgs, bad, identity, input, open_queue, output};
use crate::queue::QueueError;
use crate::runtime::not_a_component;
use crate::task::{DEFAULT_MAX_PAYLOAD_BYTES, NewTask, NextSpec};

pub(super) async fn submit(cli: &Cli, args: &SubmitArgs) -> Result<()> {
    let (mut tasks, lines) = match &args.batch {
        Some(file) => read_batch(file)?,
        None => (vec![task_from_args(args)?], vec![]),
    };
    // Checked before the database is opened, which a submit creates: bad
    // input stores nothing, not even an empty file where --db was mistyped.
    match &args.batch {
        Some(file) => {
            crate::queue::check_new_batch(&tasks).map_err(|e| batch_error(file, &lines, e))?
        }
        None => crate::queue::check_new_task(&tasks[0])?,
    }
    refuse_waits_on_a_new_database(&cli.db, &tasks)?;
    let mut queue = open_queue(&cli.db, &identity("cli"))?;
    // `--in` counts from the queue's clock (PostgreSQL's server decides
    // when a task is due), not this host's, which may be off.
    if let Some(delay) = args.in_ {
        tasks[0].run_at = Some(run_at_after(queue.now()?, delay));
    }
    let submitted = if let Some(file) = &args.batch {
        queue
            .submit_batch(&tasks)
            .map_err(|e| batch_error(file, &lines, e))?
    } else {
        vec![queue.submit(&tasks[0])?]
    };
    warn_about_missing_agents(&cli.agents, &tasks);
    output::print_submitted(&queue, &submitted, args.batch.is_some(), cli.json)
}

/// A task waiting for others needs them stored already: a SQLite database
/// this submit would create holds none, so the submit is refused without
/// creating it (it said so, and left a new file behind).
fn refuse_waits_on_a_new_database(db: &Path, tasks: &[NewTask]) -> Result<()> {
    let Some(missing) = tasks.iter().find_map(|t| t.depends_on.first()) else {
        return Ok(());
    };
    match crate::queue::Location::of(db) {
        crate::queue::Location::Sqlite(path) if !path.exists() => Err(bad(format!(
            "invalid after: task {missing} does not exist: there is no database at {} yet, so \
             no task was ever submitted there; check --db (or COLONY_DB)",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// A batch's error, naming the line of the task at fault.
fn batch_error(file: &Path, lines: &[usize], e: QueueError) -> anyhow::Error {
    match e {
        QueueError::InvalidInBatch { index, source } => bad(format!(
            "{} line {}: {source}",
            batch_name(file),
            lines[index]
        )),
        QueueError::KeyTwiceInBatch { index, first, key } => bad(format!(
            "{} line {}: invalid key: {key:?} is also the key on line {}; a key names one task",
            batch_name(file),
            lines[index],
            lines[first]
        )),
        other => other.into(),
    }
}

/// Warns about every agent the tasks name (to run them, to review them,
/// or to run their `--next` chain) that has no component yet.
pub(super) fn warn_about_missing_agents(dir: &Path, tasks: &[NewTask]) {
    for warning in missing_agent_warnings(dir, tasks) {
        say!("warning: {warning}");
    }
}

/// What [`warn_about_missing_agents`] says, one line per agent (the API
/// answers them with the submitted task's id).
pub(crate) fn missing_agent_warnings(dir: &Path, tasks: &[NewTask]) -> Vec<String> {
    let mut named = Vec::new();
    for task in tasks {
        named.push((task.agent.as_str(), "the task waits"));
        if let Some(reviewer) = &task.reviewer {
            named.push((reviewer.as_str(), "its review waits"));
        }
        chain_agents(&task.next, &mut named);
    }
    if dir.exists() && !dir.is_dir() {
        // No component could ever appear under it.
        return vec![format!(
            "the agents folder {} (--agents, or COLONY_AGENTS) is a file: no daemon given it can run these tasks; give the folder that holds the agents' components",
            dir.display()
        )];
    }
    let mut warned = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    for (agent, waits) in named {
        let file = dir.join(format!("{agent}.wasm"));
        if !file.is_file() && warned.insert(agent) {
            warnings.push(format!(
                "no agent {agent:?} in {} yet; {waits} until {}/{agent}.wasm appears",
                dir.display(),
                dir.display()
            ));
        } else if let Some(not) = component_start(&file).as_deref().and_then(not_a_component)
            && warned.insert(agent)
        {
            warnings.push(format!(
                "agent {agent:?} cannot run: {}: {}; {waits} until it is replaced",
                file.display(),
                not.reason()
            ));
        } else if let Some(why) = manifest_problem(dir, agent)
            && warned.insert(agent)
        {
            warnings.push(format!(
                "agent {agent:?} cannot run: {why}; {waits} until its manifest is fixed"
            ));
        }
    }
    warnings
}

/// What is wrong with the manifest `dir/<agent>.toml`, if it exists and is
/// wrong: read as a daemon would, without loading the component.
pub(super) fn manifest_problem(dir: &Path, agent: &str) -> Option<String> {
    let path = dir.join(format!("{agent}.toml"));
    if !path.is_file() {
        return None;
    }
    crate::runtime::Manifest::load(&path)
        .and_then(|manifest| manifest.limits(&path, dir))
        .err()
}

/// The first bytes of a component file, enough for [`not_a_component`].
pub(super) fn component_start(file: &Path) -> Option<Vec<u8>> {
    let mut start = Vec::with_capacity(8);
    std::fs::File::open(file)
        .ok()?
        .take(8)
        .read_to_end(&mut start)
        .ok()?;
    Some(start)
}

/// `text` as one word of a POSIX shell command line: as it is when it
/// holds nothing the shell would split or expand, else single-quoted.
pub(super) fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    match plain {
        true => text.to_string(),
        false => format!("'{}'", text.replace('\'', r"'\''")),
    }
}

/// The agents of a `--next` chain, with what waits for them.
pub(super) fn chain_agents<'a>(specs: &'a [NextSpec], named: &mut Vec<(&'a str, &'static str)>) {
    for spec in specs {
        named.push((spec.agent.as_str(), "the chained task waits"));
        chain_agents(&spec.next, named);
    }
}

pub(super) fn task_from_args(args: &SubmitArgs) -> Result<NewTask> {
    let agent = args
        .agent
        .clone()
        .ok_or_else(|| bad("name the agent to run the task"))?;
    // A payload from a file is checked here, so that its error names the file.
    let from_file = |text: String, shown: String| -> Result<String> {
        let text = without_bom(text);
        match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            Ok(_) => Ok(text),
            Err(e) => Err(bad(format!("{shown}: not valid JSON: {e}"))),
        }
    };
    let read = |file: &Path, shown: String| -> Result<String> {
        let text = input::read_text(file, &shown, DEFAULT_MAX_PAYLOAD_BYTES, "a payload's")?;
        from_file(text, shown)
    };
    let stdin = "the payload on stdin".to_string();
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) if p == "-" => read(Path::new("-"), stdin)?,
        (None, Some(file)) if file == Path::new("-") => read(file, stdin)?,
        (Some(p), _) => match p.strip_prefix('@') {
            Some(file) => read(Path::new(file), format!("payload @{file}"))?,
            None => p.clone(),
        },
        (None, Some(file)) => read(file, format!("--payload-file {}", file.display()))?,
        (None, None) => "{}".to_string(),
    };
    let mut task = NewTask::new(agent, payload);
    task.priority = args.priority;
    task.max_attempts = args.max_attempts;
    task.review = args.review;
    task.max_revisions = args.max_revisions;
    task.reviewer = args.reviewer.clone();
    task.depends_on = args.after.clone();
    task.key = args.key.clone();
    if let Some(next) = &args.next {
        task.next = parse_next(next)?;
    }
    task.run_at = args.at; // `--in` is set by `submit`, from the queue's clock
    task.timeout_ms = args.timeout.map(|t| t.as_millis() as u64);
    task.token_budget = args.token_budget;
    if let Some(backoff) = args.backoff {
        task.backoff_ms = backoff.as_millis() as u64;
    }
    Ok(task)
}

/// `--next` takes JSON or `@FILE`.
pub(super) fn parse_next(text: &str) -> Result<Vec<NextSpec>> {
    let json = match text.strip_prefix('@') {
        Some(file) => input::read_text(
            Path::new(file),
            &format!("--next @{file}"),
            input::CHAIN_LIMIT,
            "a --next chain's",
        )?,
        None => text.to_string(),
    };
    serde_json::from_str::<serde::de::IgnoredAny>(&json)
        .map_err(|e| bad(format!("--next: not valid JSON: {e}")))?;
    // Read from the text, not through a Value: serde_json keeps a Value's
    // numbers as text, and a field read from one then says only "invalid
    // number" where it could say "expected i32". A single spec is accepted
    // as a list of one.
    let mut de = serde_json::Deserializer::from_str(&json);
    let specs = match json.trim_start().starts_with('{') {
        true => serde_path_to_error::deserialize::<_, NextSpec>(&mut de).map(|spec| vec![spec]),
        false => serde_path_to_error::deserialize::<_, Vec<NextSpec>>(&mut de),
    };
    specs.map_err(|e| {
        // The path of a field, none for the spec itself ("field .").
        let at = match e.path().to_string() {
            path if path == "." => String::new(),
            path => format!("field {path}: "),
        };
        bad(format!(
            "--next: {at}{} (expected a list of {{\"agent\": .., \"payload\": .., \"priority\"?, \"review\"?, \"next\"?}})",
            e.inner()
        ))
    })
}

/// Parses JSON into `T`, naming the offending field in the error
/// (`priority: invalid type ...` rather than just `invalid type ...`).
/// `text` as one JSON value of type `T`, an error naming the field at fault;
/// text after the value is refused (`{"verdict":"reject"} {"verdict":"approve"}`
/// is not a reject).
pub(crate) fn parse_naming_field<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            // Broken JSON has no field to name (the path would read `?`).
            _ if inner.is_syntax() || inner.is_eof() => format!("not valid JSON: {inner}"),
            "." => inner.to_string(),
            path => format!("field {path}: {inner}"),
        }
    })?;
    de.end()
        .map_err(|e| format!("not valid JSON: text after the value ({e})"))?;
    Ok(value)
}

fn empty_payload() -> serde_json::Value {
    serde_json::json!({})
}

/// One line of `submit --batch`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    agent: String,
    /// `{}` when left out; a `null` given is kept, as `submit AGENT null` keeps it.
    #[serde(default = "empty_payload")]
    payload: serde_json::Value,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    review: Option<bool>,
    #[serde(default)]
    max_revisions: Option<u32>,
    #[serde(default)]
    reviewer: Option<String>,
    #[serde(default)]
    next: Vec<NextSpec>,
    #[serde(default)]
    after: Vec<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    run_at: Option<String>,
    #[serde(default)]
    token_budget: Option<u64>,
}

/// One line of `submit --batch` (also the body of `POST /api/tasks`), or
/// what is wrong with it, naming the field.
pub fn parse_batch_line(line: &str) -> Result<NewTask, String> {
    // serde reads a struct from an array too, by position: `[{...}]` said
    // "field [0]: invalid type: map, expected a string".
    if !line.trim_start().starts_with('{')
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(line)
    {
        let what = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(format!(
            "a task is one JSON object, {{\"agent\": ..., \"payload\": ...}}, not {what} (one task per line)"
        ));
    }
    let parsed: BatchLine = parse_naming_field(line).map_err(|e| within_the_line(&e))?;
    let mut task = NewTask::new(parsed.agent, parsed.payload.to_string());
    task.priority = parsed.priority;
    if let Some(n) = parsed.max_attempts {
        task.max_attempts = n;
    }
    if parsed.reviewer.is_some() && parsed.review == Some(false) {
        return Err(
            "field review: false, beside a reviewer, which implies review; drop one of them"
                .to_string(),
        );
    }
    task.review = parsed.review.unwrap_or(false);
    if let Some(n) = parsed.max_revisions {
        task.max_revisions = n;
    }
    task.reviewer = parsed.reviewer;
    task.next = parsed.next;
    task.depends_on = parsed.after;
    task.key = parsed.key;
    task.token_budget = parsed.token_budget;
    if let Some(t) = parsed.timeout {
        let timeout = parse_timeout(&t).map_err(|e| format!("invalid timeout: {e}"))?;
        task.timeout_ms = Some(timeout.as_millis() as u64);
    }
    if let Some(b) = parsed.backoff {
        let backoff = parse_backoff(&b).map_err(|e| format!("invalid backoff: {e}"))?;
        task.backoff_ms = backoff.as_millis() as u64;
    }
    if let Some(r) = parsed.run_at {
        task.run_at = Some(parse_time(&r).map_err(|e| format!("invalid run_at: {e}"))?);
    }
    Ok(task)
}

/// How errors name a `--batch` file.
pub(super) fn batch_name(file: &Path) -> String {
    match file == Path::new("-") {
        true => "--batch - (stdin)".to_string(),
        false => file.display().to_string(),
    }
}

/// A parse error of one batch line (or API body), its position said
/// within it: serde's "at line 1 column 41" read as a file's first line.
fn within_the_line(error: &str) -> String {
    match error.rsplit_once(" at line 1 column ") {
        Some((what, column)) => format!("{what} at column {column}"),
        None => error.to_string(),
    }
}

/// `text` without the byte-order mark some editors put first, which JSON
/// parsers may ignore (RFC 8259) and serde_json refuses ("expected value at
/// line 1 column 1", the file looking fine).
pub(super) fn without_bom(text: String) -> String {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

/// The tasks of a `--batch` file, one JSON object per line, and the line
/// each came from (blank lines are skipped, so errors name the file's line).
pub(super) fn read_batch(file: &Path) -> Result<(Vec<NewTask>, Vec<usize>)> {
    let mut reader =
        input::open(file).map_err(|e| bad(format!("--batch {}: {e}", file.display())))?;
    let (mut tasks, mut lines) = (Vec::new(), Vec::new());
    for i in 0.. {
        let what = format!("{} line {}", batch_name(file), i + 1);
        let limit_of = "a batch line's";
        let Some(line) = input::read_line(&mut reader, &what, input::CHAIN_LIMIT, limit_of)? else {
            break;
        };
        let line = match i {
            0 => without_bom(line),
            _ => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let task = match parse_batch_line(&line) {
            Ok(task) => task,
            Err(e) => {
                // The queue checks the tasks only once every line has
                // parsed: an earlier line it would refuse is the first bad
                // line, named first (checked here, on the error path only).
                let earlier = tasks.iter().zip(&lines).find_map(|(task, line)| {
                    crate::queue::check_new_task(task)
                        .err()
                        .map(|e| (*line, e.to_string()))
                });
                let (line, e) = earlier.unwrap_or((i + 1, e));
                return Err(bad(format!("{} line {line}: {e}", batch_name(file))));
            }
        };
        tasks.push(task);
        lines.push(i + 1);
    }
    if tasks.is_empty() {
        bail!(BadInput(format!(
            "--batch {}: no tasks in the file",
            file.display()
        )));
    }
    Ok((tasks, lines))
}

#[cfg(test)]
mod tests {
    use super::{parse_batch_line, shell_word};

    /// A payload left out is `{}`; one given as `null` stays `null`, as
    /// `colony submit AGENT null` and `--next` keep it (it became `{}`).
    #[test]
    fn a_batch_lines_payload_is_kept_as_given() {
        let payload = |line: &str| parse_batch_line(line).unwrap().payload;
        assert_eq!(payload(r#"{"agent": "echo"}"#), "{}");
        assert_eq!(payload(r#"{"agent": "echo", "payload": null}"#), "null");
        assert_eq!(payload(r#"{"agent": "echo", "payload": [1]}"#), "[1]");
    }

    #[test]
    fn shell_words_are_quoted_only_when_the_shell_would_change_them() {
        assert_eq!(shell_word("conf/colony.toml"), "conf/colony.toml");
        assert_eq!(shell_word("my agents"), "'my agents'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
        assert_eq!(shell_word(""), "''");
    }
}
