//! `colony daemon`: the orchestrator run in the foreground until a signal
//! (or, with `--until-idle`, until nothing is runnable).

use std::path::PathBuf;
use std::time::Duration;

use std::io::Write as _;

use anyhow::Result;

use super::{
    Cli, DaemonArgs, bad, identity, load_agents, load_models, open_queue, output, redacted, serve,
    warn_about_ungranted_models,
};
use crate::orchestrator::{Daemon, DaemonConfig};
use crate::queue::Queue;

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
    let actor = identity("daemon");
    let queue = open_queue(&cli.db, &actor)?;
    // Headroom in the instance pool for trial instantiations of new agents
    // and for runs being torn down.
    let models = load_models(cli)?;
    let (runtime, agents) = load_agents(
        &cli.db,
        &cli.agents,
        args.concurrency * 2 + 8,
        models.clone(),
    )
    .await?;
    for entry in agents.entries() {
        match &entry.status {
            crate::runtime::AgentStatus::Broken(reason) => {
                say!("warning: agent {} not loaded: {reason}", entry.name)
            }
            crate::runtime::AgentStatus::Loaded(agent) => warn_about_ungranted_models(
                &agent.name,
                &agent.limits.models,
                models.as_deref(),
                cli.config_path(),
            ),
        }
    }
    tracing::info!(identity = %actor, db = %redacted(&cli.db), agents = ?agents.loaded_names(), "daemon started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "signal received: finishing runs in flight (send another signal to exit at once)"
        );
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        say!("second signal: exiting now; leases held will expire and be reset by another daemon");
        std::process::exit(130);
    });
    let progress = (args.until_idle && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(show_progress(cli.db.clone())));
    let (web_stop, web) = match args.http {
        Some(listen) => {
            let bound = serve::start(cli, listen, args.token.clone()).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(bound.serve(async {
                let _ = stopped.await;
            }));
            (Some(stop), Some(server))
        }
        None => (None, None),
    };
    let summary = Daemon::new(queue, runtime, agents, cfg).run(stop_rx).await;
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
    output::print_daemon_summary(&summary?, cli.json)
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

pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
