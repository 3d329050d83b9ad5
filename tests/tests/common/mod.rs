//! The harness shared by the component tests: a temp agents directory, a
//! temp data directory with a real queue file, and a daemon run until idle.

#![allow(dead_code)] // each test binary uses a different part of it

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use colony::orchestrator::{Daemon, DaemonConfig, DaemonError, DaemonSummary};
use colony::queue::{AuditEvent, Queue};
use colony::runtime::{AgentDir, Runtime, RuntimeConfig};
use colony::task::{NewTask, Task};

pub struct Harness {
    pub agents: tempfile::TempDir,
    pub data: tempfile::TempDir,
    /// Where compiled components are cached.
    pub cache: PathBuf,
}

impl Harness {
    /// A fresh queue with `agents` as the agents directory and a compile
    /// cache of its own.
    pub fn new(agents: tempfile::TempDir) -> Harness {
        let data = tempfile::tempdir().unwrap();
        let cache = data.path().join("cache");
        Harness {
            agents,
            data,
            cache,
        }
    }

    /// The same, compiling into the cache every test of this binary shares.
    pub fn with_shared_cache(agents: tempfile::TempDir) -> Harness {
        Harness {
            cache: colony_tests::shared_compile_cache().to_path_buf(),
            ..Harness::new(agents)
        }
    }

    pub fn db(&self) -> PathBuf {
        self.data.path().join("colony.db")
    }

    pub fn queue(&self) -> Queue {
        Queue::open(self.db()).unwrap()
    }

    pub fn submit(&self, task: NewTask) -> i64 {
        self.queue().submit(&task).unwrap().id
    }

    pub fn runtime(&self) -> Runtime {
        Runtime::new(RuntimeConfig {
            cache_dir: Some(self.cache.clone()),
            ..Default::default()
        })
        .unwrap()
    }

    pub async fn agent_dir(&self, runtime: &Runtime) -> AgentDir {
        let mut agents = AgentDir::new(self.agents.path());
        agents.rescan(runtime).await;
        agents
    }

    /// Runs a daemon on this queue until nothing runnable remains.
    pub async fn run_until_idle(&self) -> DaemonSummary {
        self.run_until_idle_on(self.runtime()).await
    }

    /// The same, on a runtime set up by the test (with model providers, say).
    pub async fn run_until_idle_on(&self, runtime: Runtime) -> DaemonSummary {
        self.run_until_idle_with(runtime, Self::until_idle()).await
    }

    /// The settings of [`Harness::run_until_idle`], for a test to change.
    pub fn until_idle() -> DaemonConfig {
        DaemonConfig {
            poll: Duration::from_millis(50),
            heartbeat: Duration::from_millis(100),
            until_idle: true,
            ..DaemonConfig::default()
        }
    }

    /// A daemon with `cfg` on `runtime`, run until it ends (within 60 s).
    pub async fn run_until_idle_with(&self, runtime: Runtime, cfg: DaemonConfig) -> DaemonSummary {
        let agents = self.agent_dir(&runtime).await;
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let daemon = Daemon::new(self.queue(), Arc::new(runtime), agents, cfg);
        tokio::time::timeout(Duration::from_secs(60), daemon.run(stop_rx))
            .await
            .expect("daemon went idle")
            .unwrap()
    }

    /// A daemon with `cfg` on `runtime`, running in the background until
    /// the test stops it.
    pub async fn start_daemon(&self, runtime: Runtime, cfg: DaemonConfig) -> Running {
        let agents = self.agent_dir(&runtime).await;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let daemon = Daemon::new(self.queue(), Arc::new(runtime), agents, cfg);
        Running {
            stop,
            daemon: tokio::spawn(daemon.run(stop_rx)),
        }
    }

    pub fn task(&self, id: i64) -> Task {
        self.queue().get(id).unwrap()
    }

    /// Every stored run log of the task, joined.
    pub fn log(&self, id: i64) -> String {
        self.queue()
            .logs(id)
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The task's audit events named `name`.
    pub fn events(&self, id: i64, name: &str) -> Vec<AuditEvent> {
        self.queue()
            .events(Some(id), 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == name)
            .collect()
    }
}

/// A daemon started by [`Harness::start_daemon`].
pub struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    daemon: tokio::task::JoinHandle<Result<DaemonSummary, DaemonError>>,
}

impl Running {
    /// Asks it to stop, as SIGTERM does; its summary once it has (within 30 s).
    pub async fn stop(self) -> DaemonSummary {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.daemon)
            .await
            .expect("the daemon stopped within 30 s")
            .unwrap()
            .unwrap()
    }
}

/// Waits (up to 30 s, else fails naming `what`) until `done` holds.
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
