//! What one run owns inside its `Store`: a deny-all WASI context, a bounded
//! resource table, the memory limiter, the captured log, and the host side of
//! the `colony:agent/host` imports.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::colony::agent::{host, types};
use super::bindings_v0_1::colony::agent::{host as host_v0_1, types as types_v0_1};
use super::effects::EffectsSession;
use super::http::HttpSession;
use super::model::ModelSession;
use super::state::StateSession;
use crate::models::{Budget, ModelCall, ModelContext};
use crate::state::{Entry, Scope};
use crate::task::Lease;

/// Longest single `log` message or progress text kept; the rest is cut.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Resource handles (streams, pollables) one run may hold at once.
const MAX_RESOURCES: usize = 1024;

/// The daemon's side of a run in flight: where progress goes, and the task's
/// model journal (kept by the queue; the runtime knows no SQL).
#[wasmtime_wasi::async_trait]
pub trait RunHooks: Send + Sync {
    /// The agent of the run under `lease` called `heartbeat(progress)`.
    fn progress(&self, lease: Lease, progress: Option<String>);

    /// Returns once the run under `lease` may take it to be its own. While
    /// its daemon has not renewed it for nearly `stale_after` (a heartbeat
    /// held up by a database that stopped answering), another daemon may
    /// take the task over and run it: a model call or HTTP request waits
    /// here before it goes out, until a renewal goes through; never, for a
    /// run the daemon has stopped (lost or given back), whose abort may
    /// land a moment after the renewal.
    async fn wait_while_lease_in_doubt(&self, _lease: Lease) {}

    /// The replayable calls of the task's previous run, read before the
    /// run's first model call.
    async fn model_context(&self, _lease: Lease) -> Result<ModelContext, String> {
        Ok(ModelContext::default())
    }

    /// Sets `need` tokens aside for call `seq` against the task's budgets
    /// (the chain's and `manifest_budget`), counting what was charged and
    /// what other live runs set aside. Without a queue, only the manifest's
    /// budget applies, to this call alone.
    async fn reserve_tokens(
        &self,
        _lease: Lease,
        _seq: u32,
        need: u64,
        manifest_budget: Option<u64>,
    ) -> Result<Budget, String> {
        Ok(match manifest_budget {
            None => Budget::Unlimited,
            Some(left) if need > left => Budget::Refused {
                left,
                by: crate::models::BudgetOf::Manifest(left),
            },
            Some(left) => Budget::Reserved { left: left - need },
        })
    }

    /// Drops the token reservation of call `seq` of the run under `lease`,
    /// cut off before any request went out (see `model::UnsentReservation`):
    /// called as the run is dropped, so the write is done after, and the
    /// daemon waits for it before it ends.
    fn release_reservation_later(&self, _lease: Lease, _seq: u32) {}

    /// Stores call `call.seq` of the run under `lease`, cut off while its
    /// request was out with the provider (see `model::UnsentReservation`),
    /// its reservation kept: called as the run is dropped, like
    /// [`RunHooks::release_reservation_later`].
    fn record_cut_off_call_later(&self, _lease: Lease, _attempt: u32, _call: ModelCall) {}

    /// Appends an audit event about the run (`http_request`, ...), fenced by
    /// the lease. Never carries secrets, bodies or prompts.
    async fn record_event(
        &self,
        _lease: Lease,
        _event: &'static str,
        _detail: serde_json::Value,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Stores one model call durably (and its audit event), fenced by the lease.
    async fn record_model_call(
        &self,
        _lease: Lease,
        _attempt: u32,
        _call: &ModelCall,
    ) -> Result<(), String> {
        Ok(())
    }

    /// The committed state entry of `owner`'s `scope` (nothing without a queue).
    async fn state_get(
        &self,
        _scope: Scope,
        _owner: String,
        _key: String,
    ) -> Result<Option<Entry>, String> {
        Ok(None)
    }

    /// Committed entries of `owner`'s `scope` whose key starts with `prefix`.
    async fn state_scan(
        &self,
        _scope: Scope,
        _owner: String,
        _prefix: String,
        _limit: u32,
    ) -> Result<Vec<Entry>, String> {
        Ok(Vec::new())
    }
}

/// Hooks that ignore everything (for runs nobody watches): no journal, so
/// nothing is replayed and no budget but the manifest's applies.
pub struct NoHooks;
impl RunHooks for NoHooks {
    fn progress(&self, _: Lease, _: Option<String>) {}
}

/// The store data of one run.
pub struct RunState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryCap,
    pub(super) log: TaskLog,
    pub(super) model: ModelSession,
    pub(super) state: StateSession,
    pub(super) effects: EffectsSession,
    /// Outbound HTTP (`wasi:http`) under the agent's grant.
    pub(super) http: HttpSession,
    /// The run's claim: its progress is stored only while it holds it.
    lease: Lease,
    agent: Arc<str>,
    hooks: Arc<dyn RunHooks>,
    /// Bytes of this run's log lines copied to the host's own log so far
    /// (see [`MAX_MIRRORED_BYTES`]).
    mirrored: usize,
}

/// Most bytes of one run's log lines also written to the host's log: a
/// guest logging in a loop filled the daemon's stderr with 4 GB in 20 s.
/// The task's own log keeps its lines up to its cap.
const MAX_MIRRORED_BYTES: usize = 16 << 10;

impl RunState {
    #[allow(clippy::too_many_arguments)] // one per capability the run holds
    pub fn new(
        lease: Lease,
        chain: i64,
        agent: Arc<str>,
        memory_bytes: usize,
        log: TaskLog,
        hooks: Arc<dyn RunHooks>,
        model: ModelSession,
        http: HttpSession,
        read_only_dir: Option<&std::path::Path>,
    ) -> wasmtime::Result<RunState> {
        // Deny-all: no args, no env, no preopens, closed stdin, and sockets
        // refused outright (WASI's default would still allow creating them).
        let mut builder = WasiCtx::builder();
        builder
            .stdout(log.stream(Stream::Stdout))
            .stderr(log.stream(Stream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some(dir) = read_only_dir {
            // Resolved (and confined to the agents folder) when the agent
            // loaded; a folder moved or replaced by a link since would be
            // followed wherever it now leads.
            if dir.canonicalize().ok().as_deref() != Some(dir) {
                wasmtime::bail!(
                    "its read_only_dir {} is no longer the folder the manifest named when the agent loaded (moved, or replaced by a link); not mounted",
                    dir.display()
                );
            }
            builder.preopened_dir(dir, "/data", wasmtime_wasi::FsPerms::ReadOnly)?;
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Ok(RunState {
            wasi: builder.build(),
            table,
            limiter: MemoryCap::new(memory_bytes),
            log,
            model,
            state: StateSession::new(hooks.clone(), agent.clone(), chain),
            effects: EffectsSession::default(),
            http,
            lease,
            agent,
            hooks,
            mirrored: 0,
        })
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for RunState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http.ctx,
            table: &mut self.table,
            hooks: &mut self.http.policy,
        }
    }
}

impl types::Host for RunState {}

impl host::Host for RunState {
    fn heartbeat(&mut self, progress: Option<String>) {
        let progress = progress.map(|p| bounded_message(p, "a progress text"));
        self.hooks.progress(self.lease, progress);
    }

    fn log(&mut self, level: types::Level, message: String) {
        self.log_line(level, message);
    }
}

// Agents built against the released 0.1.0 contract get the same host.
impl types_v0_1::Host for RunState {}

impl host_v0_1::Host for RunState {
    fn heartbeat(&mut self, progress: Option<String>) {
        host::Host::heartbeat(self, progress);
    }

    fn log(&mut self, level: types_v0_1::Level, message: String) {
        let level = match level {
            types_v0_1::Level::Trace => types::Level::Trace,
            types_v0_1::Level::Debug => types::Level::Debug,
            types_v0_1::Level::Info => types::Level::Info,
            types_v0_1::Level::Warn => types::Level::Warn,
            types_v0_1::Level::Error => types::Level::Error,
        };
        self.log_line(level, message);
    }
}

/// A guest's log message or progress text (`what`) cut to
/// [`MAX_MESSAGE_BYTES`], saying how much was dropped (progress was cut with
/// a bare `…`, where the defaults table promises the count).
fn bounded_message(text: String, what: &str) -> String {
    let full = text.len();
    let mut text = truncate(text, MAX_MESSAGE_BYTES);
    if full > MAX_MESSAGE_BYTES {
        // Cut at a character boundary, then marked with '…'.
        let dropped = full - (text.len() - '…'.len_utf8());
        text.push_str(&format!(
            " [{dropped} more bytes dropped: {what} keeps {} KiB]",
            MAX_MESSAGE_BYTES >> 10
        ));
    }
    text
}

impl RunState {
    fn log_line(&mut self, level: types::Level, message: String) {
        let message = bounded_message(message, "one log message");
        self.mirror_to_host_log(level, &message);
        let name = match level {
            types::Level::Trace => "trace",
            types::Level::Debug => "debug",
            types::Level::Info => "info",
            types::Level::Warn => "warn",
            types::Level::Error => "error",
        };
        self.log.line(name, &message);
    }
}

impl RunState {
    /// Copies a log line to the host's log, up to [`MAX_MIRRORED_BYTES`]
    /// per run, line breaks escaped (a guest's `\n` followed by text shaped
    /// like the host's own line would forge one).
    fn mirror_to_host_log(&mut self, level: types::Level, message: &str) {
        // Lines the host's log filter hides do not use up the allowance.
        let shown = match level {
            types::Level::Trace => {
                tracing::enabled!(target: "colony::agent", tracing::Level::TRACE)
            }
            types::Level::Debug => {
                tracing::enabled!(target: "colony::agent", tracing::Level::DEBUG)
            }
            types::Level::Info => tracing::enabled!(target: "colony::agent", tracing::Level::INFO),
            types::Level::Warn => tracing::enabled!(target: "colony::agent", tracing::Level::WARN),
            types::Level::Error => {
                tracing::enabled!(target: "colony::agent", tracing::Level::ERROR)
            }
        };
        if !shown || self.mirrored > MAX_MIRRORED_BYTES {
            return;
        }
        self.mirrored += message.len();
        let (task, agent) = (self.lease.task_id, &*self.agent);
        if self.mirrored > MAX_MIRRORED_BYTES {
            tracing::info!(target: "colony::agent", task, agent, "this run's further log lines are in its task log only");
            return;
        }
        let message = message.replace('\r', "\\r").replace('\n', "\\n");
        match level {
            types::Level::Trace => {
                tracing::trace!(target: "colony::agent", task, agent, "{message}")
            }
            types::Level::Debug => {
                tracing::debug!(target: "colony::agent", task, agent, "{message}")
            }
            types::Level::Info => tracing::info!(target: "colony::agent", task, agent, "{message}"),
            types::Level::Warn => tracing::warn!(target: "colony::agent", task, agent, "{message}"),
            types::Level::Error => {
                tracing::error!(target: "colony::agent", task, agent, "{message}")
            }
        }
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when
/// anything was cut: a guest's text kept to a bounded size.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        s.truncate(s.floor_char_boundary(max));
        s.push('…');
    }
    s
}

// ----- memory ---------------------------------------------------------------

/// Caps linear memory — all of a run's memories together — and remembers a
/// denial: a Rust guest whose `memory.grow` fails aborts with a plain
/// `unreachable`, so the trap alone cannot tell an out-of-memory run from
/// any other crash.
pub struct MemoryCap {
    cap: usize,
    in_use: usize,
    pub(super) denied: Option<usize>,
}

impl MemoryCap {
    fn new(cap: usize) -> MemoryCap {
        MemoryCap {
            cap,
            in_use: 0,
            denied: None,
        }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.in_use - current.min(self.in_use) + desired;
        if total > self.cap {
            self.denied = Some(total);
            return Ok(false);
        }
        self.in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        8
    }
}

// ----- the captured log -------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A run's log: `log` calls, stdout and stderr, each kept up to a bound.
/// Past the bound, bytes are counted and dropped, never refused: a guest must
/// not trap because it printed too much (wasmtime-wasi's `MemoryOutputPipe`
/// would trap).
#[derive(Clone)]
pub struct TaskLog(Arc<Mutex<LogBuffers>>);

struct LogBuffers {
    lines: Capped,
    stdout: Capped,
    stderr: Capped,
}

/// The last bytes of a stream kept past its cap: what a run said just
/// before it crashed (a Python traceback, a panic) comes after whatever
/// it printed first, which may fill the cap.
pub const LOG_TAIL_BYTES: usize = 4096;

/// One stream of a run's log: its first `cap` bytes, and the last
/// [`LOG_TAIL_BYTES`] of those dropped after them.
struct Capped {
    kept: Vec<u8>,
    cap: usize,
    dropped: usize,
    /// The end of the dropped bytes: between `LOG_TAIL_BYTES` and twice
    /// that once full (trimmed in steps, not on every write).
    tail: Vec<u8>,
}

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped {
            kept: Vec::new(),
            cap,
            dropped: 0,
            tail: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        let take = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..take]);
        let past = &bytes[take..];
        if past.is_empty() {
            return;
        }
        self.dropped += past.len();
        self.tail
            .extend_from_slice(&past[past.len().saturating_sub(LOG_TAIL_BYTES)..]);
        if self.tail.len() > 2 * LOG_TAIL_BYTES {
            self.tail.drain(..self.tail.len() - LOG_TAIL_BYTES);
        }
    }

    /// The dropped bytes that are still at hand, at most the last
    /// [`LOG_TAIL_BYTES`].
    fn dropped_tail(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(LOG_TAIL_BYTES)..]
    }

    /// The stream's last `max` bytes, dropped ones included.
    fn last(&self, max: usize) -> Vec<u8> {
        let tail = self.dropped_tail();
        let mut last = Vec::with_capacity(max.min(self.kept.len() + tail.len()));
        // The end of what was kept runs on into the tail only when nothing
        // between them was lost.
        if tail.len() < max && tail.len() == self.dropped {
            let from_kept = max - tail.len();
            last.extend_from_slice(&self.kept[self.kept.len().saturating_sub(from_kept)..]);
        }
        last.extend_from_slice(&tail[tail.len().saturating_sub(max)..]);
        last
    }

    fn render(&self, title: &str, out: &mut String) {
        if self.kept.is_empty() && self.dropped == 0 {
            return;
        }
        if !title.is_empty() {
            out.push_str(&format!("--- {title} ---\n"));
        }
        out.push_str(&String::from_utf8_lossy(&self.kept));
        if !out.ends_with('\n') {
            out.push('\n');
        }
        if self.dropped > 0 {
            let tail = self.dropped_tail();
            out.push_str(&format!(
                "[log truncated: {} more bytes dropped after the first {} bytes; the last {} of them follow]\n",
                self.dropped,
                self.cap,
                tail.len()
            ));
            out.push_str(&String::from_utf8_lossy(tail));
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
    }
}

impl TaskLog {
    /// A log keeping up to `cap` bytes of each of: log lines, stdout, stderr.
    pub fn new(cap: usize) -> TaskLog {
        TaskLog(Arc::new(Mutex::new(LogBuffers {
            lines: Capped::new(cap),
            stdout: Capped::new(cap),
            stderr: Capped::new(cap),
        })))
    }

    fn stream(&self, which: Stream) -> LogStream {
        LogStream {
            log: self.clone(),
            which,
        }
    }

    /// One `log` call: each line of a message that spans several carries
    /// the level too, so that no line of it reads as a line of its own (a
    /// forged "2026-01-01T00:00:00Z ERROR colony::orchestrator: ..." in
    /// `colony show`).
    pub(super) fn line(&self, level: &str, message: &str) {
        let lines = 1 + message.matches('\n').count();
        let mut text = String::with_capacity(message.len() + (level.len() + 4) * lines);
        for part in message.split('\n') {
            text.push('[');
            text.push_str(level);
            text.push_str("] ");
            text.push_str(part);
            text.push('\n');
        }
        self.0.lock().unwrap().lines.push(text.as_bytes());
    }

    fn write(&self, which: Stream, bytes: &[u8]) {
        let mut buffers = self.0.lock().unwrap();
        match which {
            Stream::Stdout => buffers.stdout.push(bytes),
            Stream::Stderr => buffers.stderr.push(bytes),
        }
    }

    /// The last bytes written to stderr, for crash messages (a Rust panic,
    /// a Python traceback, a JavaScript exception is printed there just
    /// before the trap), at most `max`: from the start of a line when a
    /// cut one fits.
    pub fn stderr_tail(&self, max: usize) -> String {
        let last = self.0.lock().unwrap().stderr.last(max);
        let text = String::from_utf8_lossy(&last);
        let whole_lines = match text.find('\n') {
            Some(end) if last.len() == max && end < max / 2 => &text[end + 1..],
            _ => &text,
        };
        whole_lines.trim().to_string()
    }

    /// The whole log as text: log lines, then stdout and stderr sections.
    pub fn render(&self) -> String {
        let buffers = self.0.lock().unwrap();
        let mut out = String::new();
        buffers.lines.render("", &mut out);
        buffers.stdout.render("stdout", &mut out);
        buffers.stderr.render("stderr", &mut out);
        out
    }
}

/// A guest's stdout or stderr, writing into the [`TaskLog`].
struct LogStream {
    log: TaskLog,
    which: Stream,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream {
            log: self.log.clone(),
            which: self.which,
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogStream {
            log: self.log.clone(),
            which: self.which,
        })
    }
}

/// Room reported to the guest per write; any amount is accepted.
const WRITE_BUDGET: usize = 64 * 1024;

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.log.write(self.which, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.write(self.which, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_up_to_its_cap_and_says_what_it_dropped() {
        let log = TaskLog::new(12);
        log.write(Stream::Stdout, b"0123456789ab");
        log.write(Stream::Stdout, b"cd");
        log.write(Stream::Stderr, b"err");
        log.line("info", "hi");
        let text = log.render();
        assert!(text.starts_with("[info] hi\n"), "{text}");
        assert!(
            text.contains("--- stdout ---\n0123456789ab\n[log truncated: 2 more bytes"),
            "{text}"
        );
        assert!(text.contains("--- stderr ---\nerr\n"), "{text}");
        assert_eq!(log.stderr_tail(2), "rr");
    }

    /// What a run wrote last, past its cap (the traceback after a flood of
    /// warnings), is in its log and in its crash message: they kept only
    /// the first bytes.
    #[test]
    fn the_end_of_a_stream_past_its_cap_is_kept() {
        let log = TaskLog::new(64);
        for i in 0..2000 {
            log.write(Stream::Stderr, format!("WARNING: item {i}\n").as_bytes());
        }
        log.write(
            Stream::Stderr,
            b"Traceback (most recent call last):\nValueError: the real problem\n",
        );
        let tail = log.stderr_tail(600);
        assert!(
            tail.starts_with("WARNING: item "),
            "from a line's start: {tail}"
        );
        assert!(
            tail.ends_with("Traceback (most recent call last):\nValueError: the real problem"),
            "{tail}"
        );
        assert!(tail.len() <= 600);
        let text = log.render();
        assert!(
            text.contains(&format!("; the last {LOG_TAIL_BYTES} of them follow]\n")),
            "{text}"
        );
        assert!(text.ends_with("ValueError: the real problem\n"), "{text}");
        assert!(
            text.len() < 64 + LOG_TAIL_BYTES + 200,
            "bounded: {}",
            text.len()
        );
        // Below the cap the tail is the kept bytes'; just past it, the two join.
        let log = TaskLog::new(8);
        log.write(Stream::Stderr, b"0123456789");
        assert_eq!(log.stderr_tail(5), "56789");
        assert_eq!(log.stderr_tail(100), "0123456789");
    }

    #[test]
    fn long_progress_says_how_much_it_dropped() {
        let progress = bounded_message("é".repeat(5000), "a progress text");
        assert!(
            progress.ends_with("… [5904 more bytes dropped: a progress text keeps 4 KiB]"),
            "{}",
            &progress[progress.len() - 80..]
        );
        assert_eq!(bounded_message("short".into(), "x"), "short");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".to_string(), 2), "h…");
        assert_eq!(truncate("abc".to_string(), 5), "abc");
    }
}
