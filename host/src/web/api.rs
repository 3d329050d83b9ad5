//! The JSON API: the CLI's commands over HTTP, answering in the shapes of
//! their `--json` output. Bad input is 400 with `{"error": "..."}` (the
//! message the CLI would print) and changes nothing; changes need the
//! operator's token (see [`super::auth`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::auth::{CSRF_HEADER, Caller, Denied};
use crate::cli::output;
use crate::queue::{QueueError, TaskQuery, TrailCursor};
use crate::task::State as TaskState;

/// Most rows one list request returns.
pub const MAX_LIMIT: u32 = 1000;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/tasks", get(list).post(submit))
        .route("/api/tasks/{id}", get(show))
        .route("/api/tasks/{id}/review", post(review))
        .route("/api/tasks/{id}/retry", post(retry))
        .route("/api/tasks/{id}/cancel", post(cancel))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/api/agents", get(agents))
}

/// An API error: its status and the message a person reads.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> ApiError {
        let status = match &e {
            QueueError::NotFound(_) | QueueError::Missing(_) => StatusCode::NOT_FOUND,
            QueueError::Illegal { .. }
            | QueueError::NotNow(_)
            | QueueError::DependencyFinished { .. } => StatusCode::CONFLICT,
            e if e.is_bad_input() => StatusCode::BAD_REQUEST,
            // Not "try again": the change may have been stored, and a
            // second submit without a key would make a second task.
            QueueError::CommitUnknown { .. } => {
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!(
                        "{e}; the change may have been stored: look before sending it again (a submit with a `key` is safe to repeat)"
                    ),
                };
            }
            // 503 with Retry-After: busy or unreachable, worth asking again.
            e if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            // The file deleted or replaced: no retry helps.
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let unavailable = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response =
            (self.status, axum::Json(json!({"error": self.message}))).into_response();
        if unavailable {
            // The database busy or away: worth asking again shortly.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<Denied> for ApiError {
    /// 401 without credentials, 403 with wrong ones.
    fn from(denied: Denied) -> ApiError {
        let status = match denied {
            Denied::Missing => StatusCode::UNAUTHORIZED,
            Denied::Wrong(_) => StatusCode::FORBIDDEN,
        };
        ApiError {
            status,
            message: denied.message(),
        }
    }
}

/// The largest body an API request may carry: axum's default limit, which
/// answers 413 past it.
const BODY_LIMIT_BYTES: u64 = 2 << 20;

/// Errors axum answers by itself under `/api/` (a body over the limit, a
/// method the endpoint does not take, a path it does not know) come as
/// plain text; an API client reads every error as `{"error": "..."}`.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok()?.parse::<u64>().ok());
    // Refused before reading a byte of it (a client that sent
    // `Expect: 100-continue` sends none).
    let response = match declared {
        Some(length) if length > BODY_LIMIT_BYTES => StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        _ => next.run(request).await,
    };
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!(
                "the body is larger than the API takes ({} MiB); nothing was changed",
                BODY_LIMIT_BYTES >> 20
            )
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|a| a.to_str().ok())
                .unwrap_or("another method");
            format!("{path} does not take {method}; it takes {allowed}")
        }
        StatusCode::NOT_FOUND => format!("no such endpoint: {method} {path}"),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string(),
        _ => text,
    };
    let mut answer = ApiError { status, message }.into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

/// 401 or 403, with the reason.
pub fn denied(denied: &Denied) -> Response {
    ApiError::from(denied.clone()).into_response()
}

type ApiResult = Result<Response, ApiError>;

/// The audit actor of a change, once the caller may make it.
fn authorize(
    app: &Shared,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    app.auth.may_change(caller, csrf)?;
    Ok(caller.actor())
}

/// A task id from the path: a positive integer.
pub fn task_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::bad(format!(
                "invalid task id {text:?}: ids are positive integers"
            ))
        })
}

pub fn parse_state(text: &str) -> Result<TaskState, ApiError> {
    TaskState::ALL
        .into_iter()
        .find(|s| s.as_str() == text)
        .ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad(format!(
                "invalid state {text:?}: one of {}",
                names.join(", ")
            ))
        })
}

/// `?limit=`: 1 to [`MAX_LIMIT`], `None` when absent or empty.
fn parse_limit(text: Option<&str>) -> Result<Option<u32>, ApiError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "invalid limit {text:?}: a number from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

/// `?state=&agent=&limit=&before=&q=`, read by hand so that each mistake
/// is named.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub state: Option<String>,
    pub agent: Option<String>,
    pub limit: Option<String>,
    pub before: Option<String>,
    pub q: Option<String>,
}

impl ListParams {
    pub fn query(&self, default_limit: u32) -> Result<TaskQuery, ApiError> {
        let nonempty = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        let limit = parse_limit(self.limit.as_deref())?.unwrap_or(default_limit);
        Ok(TaskQuery {
            state: nonempty(&self.state).map(|s| parse_state(&s)).transpose()?,
            agent: nonempty(&self.agent),
            text: nonempty(&self.q),
            before: nonempty(&self.before)
                .map(|b| task_id(&b))
                .transpose()
                .map_err(|e| ApiError::bad(format!("invalid before: {}", e.message)))?,
            limit,
        })
    }
}

/// A query string that does not parse, said without the framework's
/// "Failed to deserialize query string:" before serde's own words.
pub(crate) fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    let text = e.body_text();
    let why = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(&text);
    ApiError::bad(format!("invalid query string: {why}"))
}

async fn list(
    State(app): State<Shared>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let query = params.map_err(query_error)?.query(50)?;
    let page_query = query.clone();
    let (value, next_before) = app
        .store
        .run(None, move |queue| {
            let page = queue.task_page(&page_query)?;
            let usages = output::usages_of(queue, &page.tasks)?;
            Ok((output::tasks_json(&page.tasks, &usages), page.next_before))
        })
        .await?;
    let mut response = axum::Json(value).into_response();
    // The next page, when there may be one: with a search (`q`) a page can
    // hold fewer rows than asked, or none, and still have older matches,
    // so a client cannot tell the end by the page's length or last id.
    if let Some(before) = next_before {
        let link = format!(
            "</api/tasks?{}>; rel=\"next\"",
            next_page_query(&query, before, true)
        );
        if let Ok(value) = header::HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// The query string of the page after `query`'s, older than `before`
/// (`limit` kept when `with_limit`).
pub fn next_page_query(query: &TaskQuery, before: i64, with_limit: bool) -> String {
    let mut pairs = vec![("before", before.to_string())];
    if let Some(state) = query.state {
        pairs.push(("state", state.as_str().to_string()));
    }
    if let Some(agent) = &query.agent {
        pairs.push(("agent", agent.clone()));
    }
    if let Some(text) = &query.text {
        pairs.push(("q", text.clone()));
    }
    if with_limit {
        pairs.push(("limit", query.limit.to_string()));
    }
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| super::pages::serde_urlencoded_pair(k, v))
        .collect();
    encoded.join("&")
}

async fn show(State(app): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let id = task_id(&id)?;
    let value = app
        .store
        .run(None, move |queue| {
            Ok(output::task_detail_json(&output::TaskDetail::load(
                queue, id,
            )?))
        })
        .await?;
    Ok(axum::Json(value).into_response())
}

/// The body as UTF-8 text.
fn text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| ApiError::bad(format!("the body is not UTF-8: {e}")))
}

/// A JSON body of type `T`, naming the field at fault; an empty body is `{}`.
fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let text = text(body)?.trim();
    let text = if text.is_empty() { "{}" } else { text };
    // serde reads a struct from an array too (`[]` took every default) and
    // names the Rust type in its refusal of anything else.
    if !text.starts_with('{') {
        return Err(ApiError::bad(
            "the body must be a JSON object ({\"field\": value, ...}) or empty",
        ));
    }
    crate::cli::parse_naming_field(text).map_err(ApiError::bad)
}

async fn submit(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let actor = authorize(&app, &caller, &headers)?;
    let line = text(&body)?.trim();
    if line.is_empty() {
        return Err(ApiError::bad(
            "the body is empty: send one task as one line of `submit --batch`, e.g. {\"agent\": \"writer\", \"payload\": {}}",
        ));
    }
    if line.lines().filter(|l| !l.trim().is_empty()).count() > 1 {
        return Err(ApiError::bad(
            "the body holds more than one line: send one task per request (one line of `submit --batch`)",
        ));
    }
    let task = crate::cli::parse_batch_line(line).map_err(ApiError::bad)?;
    // As `colony submit` warns: a task for an agent with no component waits.
    let warnings = crate::cli::missing_agent_warnings(&app.agents_dir, std::slice::from_ref(&task));
    let submitted = app
        .store
        .run(actor, move |queue| queue.submit(&task))
        .await?;
    let mut answer = json!({"id": submitted.id});
    if submitted.existed {
        answer["existed"] = json!(true);
    }
    if !warnings.is_empty() {
        answer["warnings"] = json!(warnings);
    }
    Ok(if submitted.existed {
        (StatusCode::OK, axum::Json(answer)).into_response()
    } else {
        (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/tasks/{}", submitted.id))],
            axum::Json(answer),
        )
            .into_response()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    verdict: Verdict,
    #[serde(default)]
    note: Option<String>,
    /// The review round decided on (`review_round` in the task's JSON):
    /// refused with 409 if the task has run again since.
    #[serde(default)]
    round: Option<i64>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approve,
    Reject,
}

/// Approves or rejects as `colony review` does, on review `round` if given.
pub fn apply_review(
    queue: &mut crate::queue::Queue,
    id: i64,
    verdict: Verdict,
    note: Option<&str>,
    round: Option<i64>,
) -> Result<TaskState, QueueError> {
    let note = note.map(str::trim).filter(|n| !n.is_empty());
    match verdict {
        Verdict::Approve => queue.approve_round(id, note, round),
        Verdict::Reject => queue.reject_round(id, note.unwrap_or("rejected without a note"), round),
    }
}

async fn review(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let actor = authorize(&app, &caller, &headers)?;
    let id = task_id(&id)?;
    let body: ReviewBody = json_body(&body)?;
    let approve = matches!(body.verdict, Verdict::Approve);
    let (to, task) = app
        .store
        .run(actor, move |queue| {
            let to = apply_review(queue, id, body.verdict, body.note.as_deref(), body.round)?;
            // An approval that did not take says why, as the CLI does.
            let task = (approve && to != TaskState::Complete)
                .then(|| queue.get(id))
                .transpose()?;
            Ok((to, task))
        })
        .await?;
    let mut answer = output::moved_json(id, to);
    if let Some(task) = task {
        answer["note"] = json!(format!(
            "the approval did not take{}",
            output::approval_did_not_take(&task)
        ));
    }
    Ok(axum::Json(answer).into_response())
}

async fn retry(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let actor = authorize(&app, &caller, &headers)?;
    let id = task_id(&id)?;
    /// `{"token_budget": N}`: the chain's new budget (see `colony retry`).
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RetryBody {
        #[serde(default)]
        token_budget: Option<u64>,
    }
    let RetryBody { token_budget } = json_body(&body)?;
    let to = app
        .store
        .run(actor, move |queue| {
            queue.retry_with_token_budget(id, token_budget)
        })
        .await?;
    Ok(axum::Json(output::moved_json(id, to)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let actor = authorize(&app, &caller, &headers)?;
    let id = task_id(&id)?;
    let body: CancelBody = json_body(&body)?;
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "cancelled by a user".into());
    let ids = app
        .store
        .run(actor, move |queue| queue.cancel(id, &reason))
        .await?;
    Ok(axum::Json(json!({"cancelled": ids})).into_response())
}

async fn status(State(app): State<Shared>) -> ApiResult {
    let report = app
        .store
        .run(None, |queue| output::StatusReport::load(queue))
        .await?;
    let mut agents = app.agents.lock().await;
    agents.rescan(&app.runtime).await;
    Ok(axum::Json(output::status_json(&report, &agents)).into_response())
}

async fn agents(State(app): State<Shared>) -> ApiResult {
    let mut agents = app.agents.lock().await;
    agents.rescan(&app.runtime).await;
    Ok(axum::Json(output::agents_json(&agents)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    since: Option<String>,
    task: Option<String>,
    limit: Option<String>,
}

/// `GET /api/events`: a JSON array of events after `since`; with
/// `Accept: text/event-stream`, those and every later one as they happen,
/// the stream ending after `limit` events when one is given.
async fn events(
    State(app): State<Shared>,
    headers: HeaderMap,
    params: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(query_error)?;
    let since = match params
        .since
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad(format!("invalid since {text:?}: an event id, 0 or more"))
            })?,
    };
    // Task 0 holds the operators' own writes (`colony state set`), as in
    // `colony events --task 0`.
    let task = params
        .task
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| if t == "0" { Ok(0) } else { task_id(t) })
        .transpose()?;
    let asked = parse_limit(params.limit.as_deref())?;
    if let Some(id) = task.filter(|&id| id != 0) {
        // An unknown task is bad input, not an empty trail (as in the CLI).
        app.store
            .run(None, move |queue| queue.get(id).map(|_| ()))
            .await?;
    }
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if streaming {
        // A reconnecting EventSource says where it stopped.
        let resume = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|id| *id >= 0);
        let most = asked.map_or(usize::MAX, |n| n as usize);
        return Ok(follow(app, task, resume.unwrap_or(since), most).into_response());
    }
    let limit = asked.unwrap_or(MAX_LIMIT);
    let events = app
        .store
        .run(None, move |queue| queue.events(task, since, limit))
        .await?;
    let values: Vec<Value> = events.iter().map(output::event_json).collect();
    let mut response = axum::Json(values).into_response();
    // A full page may have more after it: where to ask (a page cut at the
    // limit said nothing of the rest).
    if let Some(last) = events.last().filter(|_| events.len() == limit as usize) {
        let mut next = format!("/api/events?since={}", last.id);
        if let Some(id) = task {
            next.push_str(&format!("&task={id}"));
        }
        if let Some(n) = asked {
            next.push_str(&format!("&limit={n}"));
        }
        if let Ok(value) = header::HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// Server-Sent Events: each audit event as `id: N` and its JSON, read
/// through a [`TrailCursor`] (so an event whose transaction commits late is
/// not skipped), every half second once caught up; `most` of them.
fn follow(
    app: Shared,
    task: Option<i64>,
    since: i64,
    most: usize,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    // Ids moved over per read: one task's events are a few among many, so
    // its follower moves over more at once.
    let step: u32 = if task.is_some() { 10_000 } else { 500 };
    let stream = futures_util::stream::unfold(
        (app, TrailCursor::new(since), Vec::<Event>::new()),
        move |(app, mut cursor, mut pending)| async move {
            loop {
                if let Some(event) = pending.pop() {
                    return Some((Ok(event), (app, cursor, pending)));
                }
                let mut moved = cursor.clone();
                let read = app
                    .store
                    .run(None, move |queue| {
                        let events = moved.next_events(queue, task, step)?;
                        Ok((moved, events))
                    })
                    .await;
                match read {
                    Ok((moved, events)) => {
                        // Caught up (or at a hole): wait for more. Not after
                        // a full step with nothing for this task: a task's
                        // page fell minutes behind a busy trail that way.
                        let advanced = moved.last() - cursor.last();
                        cursor = moved;
                        if advanced < i64::from(step) {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        pending = events
                            .iter()
                            .rev()
                            .map(|e| {
                                Event::default()
                                    .id(e.id.to_string())
                                    .data(output::event_json(e).to_string())
                            })
                            .collect();
                    }
                    Err(e) => {
                        tracing::warn!("following the audit trail: {e}");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        },
    );
    Sse::new(futures_util::StreamExt::take(stream, most)).keep_alive(KeepAlive::default())
}
