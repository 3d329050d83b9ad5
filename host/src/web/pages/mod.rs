//! The dashboard's pages, rendered on the server with maud: every value
//! interpolated into a page is escaped, so whatever an agent wrote
//! (payload, result, logs, errors) shows as text. The pages work without
//! JavaScript; `static/app.js` only refreshes them as the queue moves.

mod agents;
mod overview;
mod review;
mod task;
mod tasks;

use axum::Router;
use axum::extract::{Extension, Form, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::Shared;
use super::api::ApiError;
use super::auth::Caller;
use crate::task::State as TaskState;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(overview::page))
        .route("/tasks", get(tasks::page))
        .route("/tasks/{id}", get(task::page))
        .route("/tasks/{id}/retry", post(task::retry))
        .route("/tasks/{id}/cancel", post(task::cancel))
        .route("/tasks/{id}/review", post(task::review))
        .route("/review", get(review::page))
        .route("/agents", get(agents::page))
        .route("/login", get(login_page).post(sign_in))
        .route("/logout", post(sign_out))
}

/// A page's frame: navigation, who is signed in, the content.
pub fn layout(title: &str, caller: &Caller, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Colony" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Colony" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/tasks" { "Tasks" }
                        a href="/review" { "Review" }
                        a href="/agents" { "Agents" }
                        a href="/metrics" { "Metrics" }
                    }
                    div.who {
                        @match caller.session() {
                            Some(session) => {
                                "signed in as " strong { (session.operator) }
                                form.inline method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(session.csrf);
                                    button type="submit" { "Sign out" }
                                }
                            }
                            None => { a href="/login" { "Sign in to act" } }
                        }
                    }
                }
                (content)
            }
        }
    }
}

/// An HTML error page.
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> PageError {
        PageError {
            status: e.status,
            message: e.message,
        }
    }
}

impl From<crate::queue::QueueError> for PageError {
    fn from(e: crate::queue::QueueError) -> PageError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = layout(
            "Error",
            &Caller::Anonymous,
            html! { main { h1 { "Error " (self.status.as_u16()) } p.error { (self.message) } p { a href="/" { "Back to the overview" } } } },
        );
        (self.status, page).into_response()
    }
}

pub type PageResult = Result<Markup, PageError>;

/// A stored time, as the CLI prints it.
pub fn time(ms: i64) -> String {
    crate::cli::output::time(ms)
}

/// How long ago, shortly ("3m 2s").
pub fn age(ms: i64) -> String {
    let secs = (ms / 1000).max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

pub fn state_badge(state: TaskState) -> Markup {
    html! { span class={ "state " (state.as_str()) } { (state.as_str()) } }
}

/// JSON, indented.
pub fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The first `max` characters, with an ellipsis when cut.
pub fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

/// The hidden field every form that changes something carries.
/// An effect's request as a reviewer needs it: the agent's headers and the
/// body's first lines, and the whole body (when text) behind a click when
/// those are not all of it.
pub fn effect_request(e: &crate::queue::EffectRow) -> Markup {
    let head = e.body_head();
    let whole = e
        .body
        .as_deref()
        .and_then(|b| std::str::from_utf8(b).ok())
        .filter(|_| head.as_ref().is_some_and(|(_, left)| *left > 0));
    html! {
        @if !e.headers.is_empty() {
            pre.headers { @for (name, value) in &e.headers { (name) ": " (value) "\n" } }
        }
        @if let Some((text, left)) = &head {
            pre { (text) @if *left > 0 { "\n… " (left) " more bytes" } }
        }
        @if let Some(text) = whole {
            details { summary { "the whole body (" (e.body_bytes()) " bytes)" } pre { (text) } }
        }
    }
}

pub fn csrf_field(caller: &Caller) -> Markup {
    html! {
        @if let Some(session) = caller.session() {
            input type="hidden" name="csrf" value=(session.csrf);
        }
    }
}

/// The review round a decision form decides on: the one its page shows,
/// so that a click on a page read before the task ran again is refused
/// rather than approving a result nobody has seen.
pub fn round_field(round: Option<i64>) -> Markup {
    html! {
        @if let Some(round) = round {
            input type="hidden" name="round" value=(round);
        }
    }
}

/// Sends a browser to sign in, back to `uri` afterwards.
pub fn to_sign_in(uri: &Uri) -> Response {
    let next = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let query = serde_urlencoded_pair("next", next);
    Redirect::to(&format!("/login?{query}")).into_response()
}

pub(in crate::web) fn serde_urlencoded_pair(name: &str, value: &str) -> String {
    let mut out = format!("{name}=");
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A local path to go back to after a form: only paths of this server.
/// Browsers drop tabs and newlines from URLs and read `\\` as `/`, so
/// anything but visible ASCII, and a second character `/` or `\\`, is
/// refused rather than turned into a link off-site.
pub fn local_path(next: Option<&str>, fallback: &str) -> String {
    match next {
        Some(p)
            if p.starts_with('/')
                && p.bytes().all(|b| b.is_ascii_graphic())
                && !matches!(p.as_bytes().get(1), Some(b'/' | b'\\')) =>
        {
            p.to_string()
        }
        _ => fallback.to_string(),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(
    Extension(caller): Extension<Caller>,
    Query(query): Query<LoginQuery>,
) -> Markup {
    login_form(&caller, query.next.as_deref(), None)
}

fn login_form(caller: &Caller, next: Option<&str>, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        caller,
        html! {
            main.narrow {
                h1 { "Sign in" }
                p { "Reading is open on loopback. To submit, review, retry or cancel, sign in with the token "
                    code { "colony serve" } " printed at start (or the one given with " code { "--token" } " / " code { "COLONY_TOKEN" } ")." }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(local_path(next, "/"));
                    label { "Your name (recorded in the audit trail)" input type="text" name="operator" required autocomplete="username"; }
                    label { "Token" input type="password" name="token" required autocomplete="current-password"; }
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// A field left out reads as empty, so the form comes back naming what is
/// wrong instead of a bare 422 from the extractor.
#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    operator: String,
    next: Option<String>,
}

pub async fn sign_in(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<LoginForm>,
) -> Response {
    match app.auth.sign_in(&form.token, &form.operator) {
        Ok((id, _)) => {
            let to = local_path(form.next.as_deref(), "/");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, app.auth.session_cookie_header(&id)),
                    (header::LOCATION, to),
                ],
            )
                .into_response()
        }
        Err(why) => (
            StatusCode::UNAUTHORIZED,
            login_form(&caller, form.next.as_deref(), Some(why)),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: Option<String>,
}

/// Ends the caller's session, when its form shows the session's CSRF
/// token: without it, another site's form could sign an operator out (the
/// cookie was cleared whatever was sent, and the session lived on).
async fn sign_out(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if let Err(denied) = app.auth.may_change(&caller, form.csrf.as_deref()) {
        return PageError::from(ApiError::from(denied)).into_response();
    }
    app.auth.sign_out(&headers);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, app.auth.expired_cookie_header()),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn only_local_paths_are_followed() {
        for good in ["/", "/tasks/3", "/tasks?state=failed&agent=a", "/review"] {
            assert_eq!(local_path(Some(good), "/x"), good);
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/%09x\n",
            "https://evil.example",
            "evil",
            "",
            "/a b",
        ] {
            assert_eq!(local_path(Some(bad), "/x"), "/x", "{bad:?}");
        }
        assert_eq!(local_path(None, "/x"), "/x");
    }
}
