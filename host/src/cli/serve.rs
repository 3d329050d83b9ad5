//! `colony serve`, and the web server a daemon starts with `--http`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;

use super::{BadInput, Cli, identity, load_agents, load_models, open_queue, redacted};
use crate::web::{self, StartError, WebConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The address to listen on: IP:PORT or HOST:PORT (localhost:7070).
    /// Off loopback, --token is required.
    #[arg(long, default_value = web::DEFAULT_LISTEN, env = "COLONY_LISTEN", hide_env_values = true, value_parser = super::args::parse_listen)]
    pub listen: SocketAddr,
    /// The token that submitting, reviewing, retrying and cancelling need
    /// (as `Authorization: Bearer TOKEN`, or to sign in at /login): at
    /// least 16 characters. A random one is generated and printed when none
    /// is given.
    #[arg(long, env = "COLONY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Checks the token and takes the dashboard's port: first, before anything
/// opens --db, so that a port already taken fails with no database file
/// created.
pub async fn take_port(listen: SocketAddr, token: Option<&str>) -> Result<TcpListener> {
    if let Some(token) = token
        && token.trim().len() < 16
    {
        return Err(BadInput(
            "--token (or COLONY_TOKEN) must be at least 16 characters: it is all that stands between the network and the queue".into(),
        )
        .into());
    }
    if token.is_none() && !listen.ip().is_loopback() {
        return Err(BadInput(StartError::NoTokenOffLoopback(listen).to_string()).into());
    }
    Ok(web::listen(listen).await?)
}

/// Opens the dashboard on a port [`take_port`] took and prints where it
/// is; the returned server serves once awaited.
pub async fn start(
    cli: &Cli,
    listener: TcpListener,
    listen: SocketAddr,
    token: Option<String>,
) -> Result<web::Bound> {
    // Opened once as every command opens it: the checks of --db, and errors
    // that name the file (the dashboard's own pool said "file is not a
    // database" of a file it did not name).
    drop(open_queue(&cli.db, &identity("web"))?);
    // The operator's models, for /metrics to start the counters of granted
    // aliases at 0. A broken configuration is the daemon's to refuse; the
    // dashboard runs without it.
    let models = load_models(cli).unwrap_or_else(|e| {
        tracing::warn!("{e:#}; /metrics shows model counters from their first call");
        None
    });
    let (runtime, agents) = load_agents(&cli.db, &cli.agents, 2, models).await?;
    let config = WebConfig {
        listen,
        token: token.map(|t| t.trim().to_string()),
        db: cli.db.clone(),
        agents,
        runtime,
        actor: identity("web"),
        sync: super::sqlite_sync(),
    };
    let bound = web::bind(config, listener).await.map_err(|e| match e {
        StartError::NoTokenOffLoopback(_) => anyhow::Error::from(BadInput(e.to_string())),
        StartError::Queue(q) => q.into(),
        other => anyhow::Error::from(other),
    })?;
    announce(&bound, &cli.db, cli.json);
    Ok(bound)
}

/// Where the dashboard is, and the token if one was generated: on stderr
/// for a person, or with `--json` one JSON line on stdout for a script
/// (which could not read the generated token out of the prose).
fn announce(bound: &web::Bound, db: &Path, json: bool) {
    if json {
        let line = serde_json::json!({
            "url": format!("http://{}/", bound.addr),
            "queue": redacted(db),
            "token": bound.generated_token.then_some(&bound.token),
        });
        // Not println!, which panics on a closed stdout.
        let _ = writeln!(std::io::stdout().lock(), "{line}");
        return;
    }
    say!(
        "colony dashboard on http://{}/ (queue {}; metrics at /metrics, API at /api)",
        bound.addr,
        redacted(db)
    );
    if bound.generated_token {
        say!(
            "token for changes (sign in at /login, or send `Authorization: Bearer TOKEN`): {}",
            bound.token
        );
    }
}

/// How long a stop waits for requests in flight; open event streams
/// (every task page has one) never finish on their own.
const STOP_GRACE: Duration = Duration::from_secs(2);

pub async fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let listener = take_port(args.listen, args.token.as_deref()).await?;
    let bound = start(cli, listener, args.listen, args.token.clone()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = bound.serve(async {
        let _ = stopped.await;
    });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.context("serving the dashboard"),
        _ = super::wait_for_signal() => {}
    }
    let _ = stop.send(());
    match tokio::time::timeout(STOP_GRACE, server).await {
        Ok(result) => result.context("serving the dashboard"),
        Err(_) => Ok(()), // streams still open: they end with the process
    }
}
