//! Commands whose reader went away: stdout and stderr are pipes whose
//! read end was closed before the command started, so every write fails
//! with EPIPE (`colony daemon 2>&1 | head`, once `head` has quit). A daemon
//! must still do its work and let go of its leases; a command must exit
//! without a panic.

mod common;
use common::Env;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use colony::task::State;

/// A pipe whose reader is already gone.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer.into()
}

/// Waits up to `limit` for `child`, killing it if it is still running.
fn wait_at_most(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_daemon_whose_log_reader_went_away_still_completes_every_task() {
    let env = Env::new(&["echo"]);
    let ids: Vec<i64> = (0..20)
        .map(|i| env.submit(&["echo", &format!(r#"{{"n":{i}}}"#)]))
        .collect();
    let daemon = env
        .cmd()
        .args(["daemon", "--until-idle", "--poll", "100ms"])
        // One line per task started: plenty of writes to fail.
        .env("COLONY_LOG", "info")
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let status = wait_at_most(daemon, Duration::from_secs(60));
    assert!(status.success(), "the daemon ended with {status}");
    let queue = env.queue();
    for id in ids {
        assert_eq!(queue.get(id).unwrap().state, State::Complete, "task {id}");
    }
}

#[test]
fn commands_whose_reader_went_away_exit_without_a_panic() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    for args in [
        &["--json", "status"][..],
        &["list"],
        &["agents"],
        &["show", "1"],
        &["events"],
    ] {
        let child = env
            .cmd()
            .args(args)
            .env("COLONY_LOG", "debug")
            .stdout(closed_pipe())
            .stderr(closed_pipe())
            .spawn()
            .unwrap();
        let status = wait_at_most(child, Duration::from_secs(30));
        // 0: the reader left (as `head` expects); 101 would be a panic.
        assert_eq!(status.code(), Some(0), "colony {args:?}");
    }
}
