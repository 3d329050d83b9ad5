//! `colony daemon`: the orchestrator run in the foreground until a signal
//! (or, with `--until-idle`, until nothing is runnable).

use std::path::PathBuf;
use std::time::Duration;

use std::io::Write as _;

use anyhow::{Context, Result};

use super::{
    Cli, DaemonArgs, bad, identity, load_agents, load_models, open_queue, output, redacted, serve,
    warn_about_ungranted_models,
};
use crate::orchestrator::{Daemon, DaemonConfig};
use crate::queue::Queue;
use crate::runtime::FileStamp;

pub(super) async fn daemon(cli: &Cli, args: &DaemonArgs) -> Result<()> {
    let cfg = DaemonConfig {
        poll: args.poll,
        concurrency: args.concurrency,
        heartbeat: args.heartbeat,
        stale_after: args.stale_after,
        grace: args.grace,
        claim_batch: args
            .claim_batch
            .unwrap_or(crate::orchestrator::DEFAULT_CLAIM_BATCH),
        // Named, the batch is claimed ahead for every agent.
        prefetch: match args.claim_batch {
            Some(_) => crate::orchestrator::Prefetch::Always,
            None => crate::orchestrator::Prefetch::Adaptive,
        },
        effect_timeout: args.effect_timeout,
        until_idle: args.until_idle,
        ..DaemonConfig::default()
    };
    cfg.validate().map_err(bad)?;
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let web_port = match args.http {
        Some(listen) => Some((
            serve::take_port(listen, args.token.as_deref()).await?,
            listen,
        )),
        None => None,
    };
    let actor = identity("daemon");
    // Read before the configuration is: an edit while the agents load
    // (compiling for seconds) is a change too.
    let config_read = ConfigSeen::now(cli.config_path());
    let models = load_models(cli)?;
    // Headroom in the instance pool for trial instantiations of new agents
    // and for runs being torn down.
    let (runtime, agents) = load_agents(
        &cli.db,
        &cli.agents,
        args.concurrency * 2 + 8,
        models.clone(),
    )
    .await?;
    // After the configuration and the agents folder were checked: a daemon
    // refusing to start created the database all the same.
    let queue = open_queue(&cli.db, &actor)?;
    for entry in agents.entries() {
        match &entry.status {
            crate::runtime::AgentStatus::Broken(reason) => {
                say!("warning: agent {} not loaded: {reason}", entry.name)
            }
            crate::runtime::AgentStatus::Loaded(agent) => {
                warn_about_ungranted_models(agent, &runtime, cli.config_path())
            }
        }
    }
    tracing::info!(identity = %actor, db = %redacted(&cli.db), agents = ?agents.loaded_names(), "daemon started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut first_signal = Signals::listen();
    exit_on_second_signal()?;
    tokio::spawn(async move {
        let signal = first_signal.recv().await;
        tracing::info!(
            "{signal} received: finishing runs in flight (a second SIGINT or SIGTERM exits at once)"
        );
        let _ = stop_tx.send(true);
    });
    let progress = (args.until_idle && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(show_progress(cli.db.clone())));
    let (web_stop, web) = match web_port {
        Some((listener, listen)) => {
            let bound = serve::start(cli, listener, listen, args.token.clone()).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(bound.serve(async {
                let _ = stopped.await;
            }));
            (Some(stop), Some(server))
        }
        None => (None, None),
    };
    let config_watch = tokio::spawn(say_when_config_changes(
        cli.config_path().to_path_buf(),
        config_read,
    ));
    let summary = Daemon::new(queue, runtime, agents, cfg).run(stop_rx).await;
    config_watch.abort();
    if let (Some(stop), Some(server)) = (web_stop, web) {
        let _ = stop.send(());
        // Open event streams would hold a graceful shutdown forever.
        if tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .is_err()
        {
            tracing::warn!("the dashboard did not stop within 2 s; leaving it");
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        let _ = write!(std::io::stderr(), "\r\x1b[2K");
    }
    // With --http the serving line came first: the summary is a second
    // line of JSON Lines, not a pretty document after it.
    output::print_daemon_summary(&summary?, cli.json, args.http.is_some())
}

/// How often a daemon looks whether its configuration file changed.
const CONFIG_CHECK: Duration = Duration::from_secs(2);

/// The configuration file as a daemon last saw it.
struct ConfigSeen {
    stamp: Option<FileStamp>,
    content: Option<Vec<u8>>,
}

impl ConfigSeen {
    fn now(path: &std::path::Path) -> ConfigSeen {
        ConfigSeen {
            stamp: FileStamp::of(path),
            content: std::fs::read(path).ok(),
        }
    }
}

/// Says when the configuration file changes under the daemon, which read it
/// at start and goes on with what it read: an edit was ignored without a
/// word, and one that broke the file was found only at the next start.
/// Judged once the file has held still for a check (an editor that writes
/// in place is not caught half-way) and by its content (a `touch` is no
/// change).
async fn say_when_config_changes(path: PathBuf, mut seen: ConfigSeen) {
    let mut moving = seen.stamp;
    loop {
        tokio::time::sleep(CONFIG_CHECK).await;
        let stamp = FileStamp::of(&path);
        if stamp == seen.stamp {
            continue;
        }
        if stamp != moving {
            moving = stamp;
            continue;
        }
        let now = ConfigSeen::now(&path);
        let changed = now.content != seen.content;
        seen = now;
        if !changed {
            continue;
        }
        let file = path.display();
        match (&seen.content, super::models_of(&path)) {
            (None, _) => {
                tracing::warn!("{file} was removed; this daemon goes on with what it read at start")
            }
            (Some(_), Ok(_)) => tracing::warn!(
                "{file} changed; this daemon goes on with what it read at start: restart it to apply the change"
            ),
            (Some(_), Err(e)) => tracing::warn!(
                "{file} changed and does not load ({e:#}); this daemon goes on with what it read at start, and will refuse to start again until the file is fixed"
            ),
        }
    }
}

/// With `--until-idle` in a terminal: one status line of the work left,
/// redrawn twice a second, read through its own connection.
pub(super) async fn show_progress(db: PathBuf) {
    let Ok(queue) = Queue::open(&db) else { return };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(backlog) = queue.backlog() else {
            continue;
        };
        let sum =
            |f: fn(&crate::queue::Backlog) -> u64| backlog.iter().map(|(_, b)| f(b)).sum::<u64>();
        let (ready, running, waiting) = (
            sum(|b| b.ready),
            sum(|b| b.in_progress),
            sum(|b| b.scheduled + b.blocked),
        );
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[2K{running} in progress, {ready} ready, {waiting} waiting (backoff, schedule or dependencies)"
        );
    }
}

pub(super) async fn wait_for_signal() -> &'static str {
    Signals::listen().recv().await
}

/// SIGTERM, SIGINT and SIGHUP, listened to from when this is made. SIGHUP
/// (a closed terminal or ssh session) stops as gracefully as the others:
/// left to its default it killed the daemon on the spot, every task it
/// held left to wait out its lease. Not when it is ignored, as under
/// `nohup`: that asked the process to survive the hangup.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).expect("installing a SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("installing a SIGINT handler"),
            hup: (!hangup_ignored())
                .then(|| signal(SignalKind::hangup()).expect("installing a SIGHUP handler")),
        }
    }

    /// Waits for the next signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        let hup = async {
            match &mut self.hup {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = hup => "SIGHUP",
        }
    }
}

/// Whether this process was started with SIGHUP ignored (`nohup`), read
/// before any handler of ours replaces that.
fn hangup_ignored() -> bool {
    static IGNORED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        // SAFETY: a query only (no new action); `old` is a plain struct
        // the call fills in.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
        }
    })
}

/// When the first stop signal came (CLOCK_MONOTONIC, ns; 0: none yet).
static FIRST_SIGNAL_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A signal this soon after the first is the same Ctrl-C delivered twice
/// (the terminal's to the process group, and a wrapper's such as npm or a
/// shell script forwarding it), not a second press.
const SAME_SIGNAL_WITHIN_NS: u64 = 50_000_000;

/// Makes a second SIGINT or SIGTERM exit at once (a SIGHUP never does),
/// from the signal handler itself. Through tokio it could not be relied
/// on: two signals that came before the runtime got round to the first
/// (its workers busy with spinning guests) were one wake-up, and the
/// daemon waited out its grace.
fn exit_on_second_signal() -> Result<()> {
    /// Notes the first stop signal; returns when it came and when this
    /// one did, if this is not the first.
    fn note_signal() -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime is async-signal-safe and writes `now` only.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let now = (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64 + 1;
        match FIRST_SIGNAL_AT.compare_exchange(0, now, SeqCst, SeqCst) {
            Ok(_) => None, // the first: tokio's handler starts the graceful stop
            Err(first) => Some((first, now)),
        }
    }
    // A hangup never exits at once: a dropped ssh session sends two (the
    // shell's to its jobs, the kernel's when the shell exits) as far apart
    // as the shell's exit takes, and one may come during a stop's grace.
    fn on_hangup() {
        note_signal();
    }
    fn on_signal() {
        let Some((first, now)) = note_signal() else {
            return;
        };
        if now.saturating_sub(first) < SAME_SIGNAL_WITHIN_NS {
            return;
        }
        const SAID: &[u8] =
            b"second signal: exiting now; leases held will expire and be reset by another daemon\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe, and SAID is
        // a static buffer.
        unsafe {
            libc::write(2, SAID.as_ptr().cast(), SAID.len());
            libc::_exit(130);
        }
    }
    let hup = (!hangup_ignored()).then_some((libc::SIGHUP, on_hangup as fn()));
    let handlers = [
        (libc::SIGTERM, on_signal as fn()),
        (libc::SIGINT, on_signal),
    ];
    for (signal, handler) in handlers.into_iter().chain(hup) {
        // SAFETY: the handlers only touch an atomic and call the
        // async-signal-safe functions above.
        unsafe { signal_hook_registry::register(signal, handler) }
            .context("installing the second-signal handler")?;
    }
    Ok(())
}
