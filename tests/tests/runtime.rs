//! Real guest components, built from `tests/guests`, run through the real
//! runtime and daemon against a real queue file. Assertions are on what the
//! queue recorded: state, error kind, log, result.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colony::orchestrator::{Daemon, DaemonConfig};
use colony::queue::all_readable;
use colony::runtime::{AgentDir, AgentStatus, NoHooks, RunHooks};
use colony::task::{ClaimedTask, Lease};
use colony::task::{ErrorKind, NewTask, RunOutcome, State, Task};
use colony_tests::{agents_dir_with, guest_path, write_agent};

mod common;

fn harness(fixtures: &[&str]) -> common::Harness {
    common::Harness::new(agents_dir_with(fixtures))
}
use serde_json::{Value, json};

fn new_task(agent: &str, payload: serde_json::Value) -> NewTask {
    let mut task = NewTask::new(agent, payload.to_string());
    task.backoff_ms = 1;
    task
}

fn once(agent: &str) -> NewTask {
    let mut task = new_task(agent, json!({}));
    task.max_attempts = 1;
    task
}

/// Runs `task` alone; it must fail for good as `kind`. Its id and message.
async fn fails_as(h: &common::Harness, task: NewTask, kind: ErrorKind) -> (i64, String) {
    let id = h.submit(task);
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        (task.state, error_kind(&task)),
        (State::Failed, kind),
        "{:?}",
        task.error
    );
    (id, task.error.unwrap().message)
}

fn error_kind(task: &Task) -> ErrorKind {
    task.error
        .as_ref()
        .unwrap_or_else(|| panic!("task {} has no error: {task:?}", task.id))
        .kind
}

/// A bug that panics the store job (the writer lane's transaction thread)
/// costs its batch the group commit, nothing more: the lane answers, the
/// runs are stored one by one, each task completes once, and the daemon
/// goes on claiming and ends (a lane left busy stalled it for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_store_job_loses_nothing_and_stalls_nothing() {
    let h = harness(&["echo"]);
    let ids: Vec<i64> = (0..40)
        .map(|i| h.submit(new_task("echo", json!({"i": i}))))
        .collect();
    let cfg = colony::orchestrator::DaemonConfig {
        panicking_stores: 2,
        concurrency: 4,
        ..common::Harness::until_idle()
    };
    let summary = h.run_until_idle_with(h.runtime(), cfg).await;
    assert_eq!((summary.completed, summary.lost), (40, 0), "{summary:?}");
    for id in ids {
        let task = h.task(id);
        assert_eq!(
            (task.state, task.attempts),
            (State::Complete, 1),
            "task {id}"
        );
        assert_eq!(h.events(id, "complete").len(), 1, "task {id}");
    }
}

/// A run whose task panicked (a bug in a host call) is a crash with its
/// attempt spent, also when the daemon is stopped before a heartbeat has
/// noticed it: given back, a task that panics the host at every run never
/// used up its attempts under a daemon restarted often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_panicked_is_a_crash_even_when_the_daemon_stops_at_once() {
    let h = harness(&["echo"]);
    let id = h.submit(once("echo"));
    let cfg = colony::orchestrator::DaemonConfig {
        panicking_runs: 1,
        poll: Duration::from_millis(50),
        heartbeat: Duration::from_secs(60),
        stale_after: Duration::from_secs(120),
        grace: Duration::from_secs(1),
        ..Default::default()
    };
    let daemon = h.start_daemon(h.runtime(), cfg).await;
    common::wait_for("the claim", || !h.events(id, "claim").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let summary = daemon.stop().await;
    assert_eq!((summary.released, summary.failed), (0, 1), "{summary:?}");
    let task = h.task(id);
    assert_eq!((task.state, task.attempts), (State::Failed, 1));
    assert_eq!(error_kind(&task), ErrorKind::Crash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_completes_with_its_payload_and_log() {
    let h = harness(&["echo"]);
    let id = h.submit(new_task("echo", json!({"hello": "world"})));
    let summary = h.run_until_idle().await;
    assert_eq!(summary.completed, 1);
    let task = h.task(id);
    assert_eq!(task.state, State::Complete);
    let result = task.result.unwrap();
    assert_eq!(result["echo"], json!({"hello": "world"}));
    assert_eq!(result["attempt"], 1);
    assert!(
        h.log(id).contains(&format!("[info] echo got task {id}")),
        "{}",
        h.log(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_guest_times_out_within_its_deadline() {
    let h = harness(&["spin"]);
    let mut task = once("spin");
    task.timeout_ms = Some(1000);
    let id = h.submit(task);
    let started = Instant::now();
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        (task.state, error_kind(&task)),
        (State::Failed, ErrorKind::Timeout)
    );
    assert!(task.error.unwrap().message.contains("1s deadline"));
    // Deadline + 1 s, plus daemon start-up (loading the component).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_spinning_guest_does_not_block_other_runs_on_one_thread() {
    let h = harness(&["spin", "echo"]);
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let (spin, echo) = (
        agents.loaded("spin").unwrap(),
        agents.loaded("echo").unwrap(),
    );
    let input = |agent: &str, timeout_ms| ClaimedTask {
        lease: Lease {
            task_id: 1,
            token: 1,
        },
        agent: agent.into(),
        chain: 1,
        payload: "{}".into(),
        attempt: 1,
        max_attempts: 1,
        parent_result: None,
        feedback: None,
        timeout_ms,
    };
    // 4 s: an echo that waited for the spinner takes that long, one that
    // did not a few ms (under 2 s however loaded the machine).
    let spin_task = input("spin", Some(4000));
    let spinning = runtime.run(&spin, &spin_task, Arc::new(NoHooks));
    let echoing = async {
        let report = runtime
            .run(&echo, &input("echo", None), Arc::new(NoHooks))
            .await;
        (report, Instant::now())
    };
    let started = Instant::now();
    let (spun, (echoed, echo_done)) = tokio::join!(spinning, echoing);
    assert!(
        matches!(echoed.outcome, RunOutcome::Success { .. }),
        "{:?}",
        echoed.outcome
    );
    assert!(
        echo_done - started < Duration::from_secs(2),
        "echo waited for the spinner: {:?}",
        echo_done - started
    );
    match spun.outcome {
        RunOutcome::Failure(e) => assert_eq!(e.kind, ErrorKind::Timeout),
        other => panic!("spin should time out, got {other:?}"),
    }
    assert!(spun.elapsed < Duration::from_secs(6), "{:?}", spun.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_out_of_memory_and_others_keep_working() {
    let h = harness(&["membomb", "echo"]);
    std::fs::write(h.agents.path().join("membomb.toml"), "memory_mb = 32\n").unwrap();
    let bomb = h.submit(once("membomb"));
    let echo = h.submit(new_task("echo", json!(1)));
    h.run_until_idle().await;
    let task = h.task(bomb);
    assert_eq!(
        (task.state, error_kind(&task)),
        (State::Failed, ErrorKind::OutOfMemory)
    );
    assert!(
        task.error
            .unwrap()
            .message
            .contains("over its cap of 32 MiB (`memory_mb` in its manifest)")
    );
    assert_eq!(h.task(echo).state, State::Complete);
}

/// The instance pool keeps a finished run's memory resident for the next run
/// in its slot, resetting only the pages it wrote (up to a few MiB; beyond
/// that, pages go back to the kernel): no run may find what an earlier one
/// left, below that bound or above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_finds_nothing_an_earlier_run_left_in_its_memory() {
    let h = harness(&["residue"]);
    // One slot, so every run reuses the memory of the one before it.
    let runtime = colony::runtime::Runtime::new(colony::runtime::RuntimeConfig {
        cache_dir: Some(h.cache.clone()),
        max_concurrent_runs: 1,
        ..Default::default()
    })
    .unwrap();
    let agents = h.agent_dir(&runtime).await;
    let residue = agents.loaded("residue").unwrap();
    let pristine = json!({"data": 0x5EED, "bss_dirty": 0, "heap_dirty": 0});
    for heap_mib in [1, 1, 2, 24, 1, 24, 24, 3, 1] {
        let task = ClaimedTask {
            lease: Lease {
                task_id: 1,
                token: 1,
            },
            agent: "residue".into(),
            chain: 1,
            payload: heap_mib.to_string(),
            attempt: 1,
            max_attempts: 1,
            parent_result: None,
            feedback: None,
            timeout_ms: None,
        };
        let report = runtime.run(&residue, &task, Arc::new(NoHooks)).await;
        match report.outcome {
            RunOutcome::Success { output, .. } => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&output).unwrap(),
                pristine,
                "a run with {heap_mib} MiB of heap found an earlier run's memory"
            ),
            other => panic!("residue should succeed, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_recursion_is_a_stack_overflow() {
    let h = harness(&["recurse"]);
    let id = h.submit(once("recurse"));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        (task.state, error_kind(&task)),
        (State::Failed, ErrorKind::StackOverflow),
        "{:?}",
        task.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_crash_with_the_panic_message() {
    let h = harness(&["panic"]);
    let (id, message) = fails_as(&h, once("panic"), ErrorKind::Crash).await;
    assert!(
        message.contains("the guest panicked") && message.contains("fixture panic: boom"),
        "{message}"
    );
    assert!(h.log(id).contains("fixture panic: boom"));
}

/// A run may spawn at most 1,000 tasks carrying 8 MiB of payload in all:
/// past either, nothing is spawned and the run fails as invalid output (one
/// completion writing a million children held the write lock for 18 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_spawning_too_many_tasks_spawns_none() {
    let h = harness(&["stateful"]);
    let many: Vec<Value> = (0..1001).map(|i| json!({"n": i})).collect();
    let too_many = h.submit(new_task("stateful", json!({"spawn": many})));
    let too_heavy = h.submit(new_task(
        "stateful",
        json!({"spawn_blobs": 9, "blob_bytes": 1_000_000}),
    ));
    let enough: Vec<Value> = (0..1000).map(|i| json!({"n": i})).collect();
    let fine = h.submit(new_task("stateful", json!({"spawn": enough})));
    h.run_until_idle().await;
    for (id, says) in [
        (too_many, "spawned 1001 tasks; a run may spawn at most 1000"),
        (too_heavy, "a run's may carry at most 8388608"),
    ] {
        let task = h.task(id);
        assert_eq!(
            (task.state, error_kind(&task)),
            (State::Failed, ErrorKind::InvalidOutput)
        );
        assert!(task.error.unwrap().message.contains(says));
        assert!(h.queue().children(id).unwrap().is_empty());
    }
    assert_eq!(h.task(fine).state, State::Complete);
    assert_eq!(h.queue().children(fine).unwrap().len(), 1000);
}

/// A run's heartbeat progress reaches its task through the daemon's own
/// heartbeat, under the run's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_progress_is_stored_while_it_runs() {
    let h = harness(&["heartbeat"]);
    let id = h.submit(new_task("heartbeat", json!({"linger_ms": 1500})));
    let db = h.db();
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let task = colony::queue::Queue::open(&db).unwrap().get(id).unwrap();
            if task.state == State::InProgress && task.progress.as_deref() == Some("step 3/3") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    });
    h.run_until_idle().await;
    assert!(
        watcher.join().unwrap(),
        "the progress was never seen while the run lingered"
    );
    assert_eq!(h.task(id).state, State::Complete);
}

/// A compile-cache file someone else could have written is never loaded:
/// deserializing compiled code runs it unchecked. Here `permanent`'s
/// compiled code is put under `echo`'s cache name and left writable by
/// others; the host compiles `echo` afresh, and its task completes (loading
/// the planted file, it ran `permanent` and failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_cache_file_others_could_write_is_not_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let cwasm_files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "cwasm"));
        files
    };
    let h = harness(&["echo"]);
    h.agent_dir(&h.runtime()).await;
    let echo_cached = cwasm_files(&h.cache).remove(0);
    let other = harness(&["permanent"]);
    other.agent_dir(&other.runtime()).await;
    let permanent_cached = cwasm_files(&other.cache).remove(0);
    std::fs::copy(&permanent_cached, &echo_cached).unwrap();
    std::fs::set_permissions(&echo_cached, std::fs::Permissions::from_mode(0o666)).unwrap();

    let id = h.submit(once("echo"));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Complete, "{:?}", task.error);
}

/// A guest's own failure message is cut to 8 KiB, saying how much was left
/// out: it is stored with the task and its event on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_failure_message_is_cut() {
    let h = harness(&["stateful"]);
    let mut task = new_task(
        "stateful",
        json!({"end": "huge_failure", "bytes": 5_000_000}),
    );
    task.max_attempts = 1;
    let id = h.submit(task);
    h.run_until_idle().await;
    let message = h.task(id).error.unwrap().message;
    assert_eq!(
        message.len(),
        8192 + " [message cut: 4991808 more bytes]".len()
    );
    assert!(
        message.ends_with(" [message cut: 4991808 more bytes]"),
        "{}",
        &message[8000..]
    );
}

/// A guest that calls `exit` (as Python's `sys.exit` does) instead of
/// returning an outcome is said to have done so: it was blamed on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_exits_is_said_to_have_exited() {
    let h = harness(&["panic"]);
    let mut task = new_task("panic", json!({"exit": 3}));
    task.max_attempts = 1;
    let (_, message) = fails_as(&h, task, ErrorKind::Crash).await;
    assert_eq!(
        message,
        "the guest called exit (reporting failure; WASI 0.2 carries no exit code) instead of returning an outcome, after writing to stderr: fixture exiting with 3"
    );
}

/// A crash after a flood of stderr (warnings filling the log's cap) is
/// still explained: its message quotes stderr's end, not its start, and
/// the log keeps that end too. The panic was in neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_flood_of_stderr_still_says_why() {
    let h = harness(&["panic"]);
    let mut task = new_task("panic", json!({"noise": 3000}));
    task.max_attempts = 1;
    let (id, message) = fails_as(&h, task, ErrorKind::Crash).await;
    assert!(message.starts_with("the guest panicked: "), "{message}");
    assert!(message.contains("fixture panic: boom"), "{message}");
    assert!(message.contains("processing item 2999"), "{message}");
    let log = h.log(id);
    assert!(log.contains("[log truncated:"), "{log}");
    assert!(
        log.contains("fixture panic: boom"),
        "the log keeps the end: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_of_output_are_truncated_and_the_task_completes() {
    let h = harness(&["loud"]);
    let id = h.submit(once("loud"));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Complete, "{:?}", task.error);
    let log = h.log(id);
    assert!(log.contains("--- stdout ---") && log.contains("--- stderr ---"));
    assert!(log.contains("[log truncated:"), "the log says it was cut");
    assert!(
        log.contains("x… [5904 more bytes dropped: one log message keeps 4 KiB]"),
        "a long message says it was cut"
    );
    assert!(
        log.len() < 3 * (64 + 4) * 1024 + 1024,
        "log kept {} bytes",
        log.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_back_off_then_succeed() {
    let h = harness(&["flaky"]);
    let id = h.submit(new_task("flaky", json!({})));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!((task.state, task.attempts), (State::Complete, 3));
    assert_eq!(task.result.unwrap()["succeeded_on_attempt"], 3);
    let events = h.queue().events(Some(id), 0, 100).unwrap();
    let retries: Vec<_> = events.iter().filter(|e| e.event == "retry_later").collect();
    assert_eq!(retries.len(), 2);
    assert!(
        retries
            .iter()
            .all(|e| e.detail["kind"] == "retryable" && e.detail["retry_in_ms"].is_number())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_fails_at_once() {
    let h = harness(&["permanent"]);
    let id = h.submit(new_task("permanent", json!({})));
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        (task.state, task.attempts, error_kind(&task)),
        (State::Failed, 1, ErrorKind::Permanent)
    );
    assert!(task.error.unwrap().message.contains("can never work"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_environment_and_network_are_denied() {
    let h = harness(&["escape"]);
    let id = h.submit(once("escape"));
    h.run_until_idle().await;
    let result = h.task(id).result.expect("escape reports what it tried");
    for probe in ["file", "env", "socket"] {
        let said = result[probe].as_str().unwrap();
        assert!(said.starts_with("denied"), "{probe} was not denied: {said}");
    }
}

/// A manifest's read_only_dir is resolved and confined when the agent
/// loads; replaced by a link to a folder outside before a run, it is not
/// mounted there: the run fails saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_dir_replaced_by_a_link_after_loading_is_not_mounted() {
    let h = harness(&["echo"]);
    let data = h.agents.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        h.agents.path().join("echo.toml"),
        "read_only_dir = \"data\"\n",
    )
    .unwrap();
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    assert!(agents.loaded("echo").is_some(), "loaded with its folder");
    let outside = tempfile::tempdir().unwrap();
    std::fs::rename(&data, h.agents.path().join("data-old")).unwrap();
    std::os::unix::fs::symlink(outside.path(), &data).unwrap();
    let id = h.submit(once("echo"));
    // Polling (and with it the folder's rescan) far off: the run uses the
    // agent as it loaded.
    let cfg = DaemonConfig {
        poll: Duration::from_secs(30),
        ..common::Harness::until_idle()
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let daemon = Daemon::new(h.queue(), Arc::new(runtime), agents, cfg);
    tokio::time::timeout(Duration::from_secs(60), daemon.run(stop_rx))
        .await
        .expect("daemon went idle")
        .unwrap();
    let task = h.task(id);
    assert_eq!(task.state, State::Failed, "{task:?}");
    let message = task.error.unwrap().message;
    assert!(
        message.contains("is no longer the folder the manifest named"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_children_run_after_their_parent() {
    let h = harness(&["spawner", "echo"]);
    let payload = json!({"children": [
        {"agent": "echo", "payload": {"n": 1}},
        {"agent": "echo", "payload": {"n": 2}, "priority": 5},
    ]});
    let id = h.submit(new_task("spawner", payload));
    h.run_until_idle().await;
    assert_eq!(h.task(id).result, Some(json!({"spawned": 2})));
    let children = all_readable(h.queue().children(id).unwrap()).unwrap();
    assert_eq!(children.len(), 2);
    for child in &children {
        assert_eq!(child.state, State::Complete);
        assert_eq!(
            child.result.as_ref().unwrap()["parent_result"],
            json!({"spawned": 2})
        );
    }
    assert_eq!(children[1].priority, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_output_fails_permanently_and_applies_nothing() {
    let h = harness(&["garbage", "badspawn"]);
    let garbage = h.submit(new_task("garbage", json!({})));
    let badspawn = h.submit(new_task("badspawn", json!({})));
    // Not UTF-8 at all: the canonical ABI refuses it as the host reads the
    // output, which used to be reported as "the run failed in the host".
    let not_utf8 = h.submit(new_task("garbage", json!("not utf-8")));
    h.run_until_idle().await;
    let message = h.task(not_utf8).error.unwrap().message;
    assert!(
        message.starts_with("the guest passed text that is not valid UTF-8 to the host"),
        "{message}"
    );
    for id in [garbage, badspawn, not_utf8] {
        let task = h.task(id);
        assert_eq!(
            (task.state, task.attempts, error_kind(&task)),
            (State::Failed, 1, ErrorKind::InvalidOutput)
        );
        assert!(task.result.is_none());
        assert!(h.queue().children(id).unwrap().is_empty());
    }
    assert!(
        h.task(badspawn)
            .error
            .unwrap()
            .message
            .contains("spawn[0].payload")
    );
}

struct Recorder(Mutex<Vec<Option<String>>>);
impl RunHooks for Recorder {
    fn progress(&self, _lease: Lease, progress: Option<String>) {
        self.0.lock().unwrap().push(progress);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_progress_and_logs_keep_every_level() {
    let h = harness(&["heartbeat"]);
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let input = ClaimedTask {
        lease: Lease {
            task_id: 7,
            token: 1,
        },
        agent: "heartbeat".into(),
        chain: 7,
        payload: "{}".into(),
        attempt: 1,
        max_attempts: 3,
        parent_result: None,
        feedback: None,
        timeout_ms: None,
    };
    let report = runtime
        .run(
            &agents.loaded("heartbeat").unwrap(),
            &input,
            recorder.clone(),
        )
        .await;
    assert!(matches!(report.outcome, RunOutcome::Success { .. }));
    let progress = recorder.0.lock().unwrap().clone();
    assert_eq!(
        progress,
        vec![
            Some("step 1/3".into()),
            Some("step 2/3".into()),
            Some("step 3/3".into())
        ]
    );
    for level in ["trace", "debug", "info", "warn", "error"] {
        assert!(
            report.log.contains(&format!("[{level}] {level} line")),
            "{}",
            report.log
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_components_are_reported_and_skipped() {
    let h = harness(&["echo"]);
    write_agent(h.agents.path(), "garbage_bytes", b"this is not wasm at all");
    write_agent(h.agents.path(), "core_module", b"\0asm\x01\0\0\0");
    write_agent(h.agents.path(), "empty", b"");
    std::fs::copy(
        guest_path("other_world"),
        h.agents.path().join("other_world.wasm"),
    )
    .unwrap();
    std::fs::copy(
        guest_path("echo"),
        h.agents.path().join("bad_manifest.wasm"),
    )
    .unwrap();
    std::fs::write(
        h.agents.path().join("bad_manifest.toml"),
        "timeout = \"5s\"\nmemroy_mb = 3\n",
    )
    .unwrap();

    std::fs::copy(
        guest_path("echo"),
        h.agents.path().join("escape_manifest.wasm"),
    )
    .unwrap();
    std::fs::write(
        h.agents.path().join("escape_manifest.toml"),
        "read_only_dir = \"..\"\n",
    )
    .unwrap();

    // Manifests that are not files of the folder: a FIFO (reading it would
    // block the loading), a link out of the folder (its content would be
    // quoted in the error), one too large to be a manifest.
    for name in ["fifo_manifest", "linked_manifest", "huge_manifest"] {
        std::fs::copy(
            guest_path("echo"),
            h.agents.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    let fifo = h.agents.path().join("fifo_manifest.toml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "PROVIDER_KEY = \"sk-do-not-show\"\n").unwrap();
    std::os::unix::fs::symlink(
        secret_file.path(),
        h.agents.path().join("linked_manifest.toml"),
    )
    .unwrap();
    std::fs::write(
        h.agents.path().join("huge_manifest.toml"),
        "# padding\n".repeat(10_000),
    )
    .unwrap();

    // Limits in their bounds, but less than the component needs to start.
    for (name, manifest) in [
        ("tiny_memory", "memory_mb = 1\n"),
        ("little_fuel", "fuel = 1\n"),
    ] {
        std::fs::copy(
            guest_path("echo"),
            h.agents.path().join(format!("{name}.wasm")),
        )
        .unwrap();
        std::fs::write(h.agents.path().join(format!("{name}.toml")), manifest).unwrap();
    }

    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let reason = |name: &str| match &agents.entries().find(|e| e.name == name).unwrap().status {
        AgentStatus::Broken(reason) => reason.clone(),
        AgentStatus::Loaded(_) => panic!("{name} should not load"),
    };
    assert!(
        reason("fifo_manifest").contains("fifo_manifest.toml: not a regular file"),
        "{}",
        reason("fifo_manifest")
    );
    let linked = reason("linked_manifest");
    assert!(
        linked.contains("outside the agents folder") && !linked.contains("sk-do-not-show"),
        "{linked}"
    );
    assert!(
        reason("huge_manifest").contains("larger than a manifest may be (64 KiB)"),
        "{}",
        reason("huge_manifest")
    );
    assert!(
        reason("garbage_bytes").contains("garbage_bytes.wasm: it is not a WebAssembly file"),
        "{}",
        reason("garbage_bytes")
    );
    assert!(
        reason("empty").contains("empty.wasm: the file is empty"),
        "{}",
        reason("empty")
    );
    assert!(
        reason("core_module").contains("it is a core wasm module, not a component"),
        "{}",
        reason("core_module")
    );
    // What is missing, from wasmtime's causes, and how to build against it.
    let other = reason("other_world");
    assert!(
        other.contains("colony:agent/handler") && other.contains("colony wit --out DIR"),
        "{other}"
    );
    let escape = reason("escape_manifest");
    assert!(
        escape.contains("read_only_dir") && escape.contains("outside the agents directory"),
        "{escape}"
    );
    let manifest = reason("bad_manifest");
    assert!(
        manifest.contains("bad_manifest.toml") && manifest.contains("memroy_mb"),
        "{manifest}"
    );
    let tiny = reason("tiny_memory");
    assert!(
        tiny.contains("larger than the 1 MiB it may use: raise `memory_mb` in")
            && tiny.contains("tiny_memory.toml"),
        "{tiny}"
    );
    let little = reason("little_fuel");
    assert!(
        little.contains("needs more than the `fuel = 1` of") && little.contains("little_fuel.toml"),
        "{little}"
    );
    assert_eq!(agents.loaded_names(), vec!["echo"]);

    // Tasks for broken agents wait, untouched; echo still runs.
    let waiting = h.submit(new_task("other_world", json!({})));
    let echo = h.submit(new_task("echo", json!({})));
    let summary = h.run_until_idle().await;
    assert_eq!(h.task(echo).state, State::Complete);
    let task = h.task(waiting);
    assert_eq!((task.state, task.attempts), (State::Ready, 0));
    assert_eq!(
        summary.left_for_missing_agents,
        vec![("other_world".to_string(), 1)]
    );
}

/// An until-idle daemon says what it left and why: blocked on a dependency
/// in review is not the same as an agent missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_tells_blocked_tasks_from_missing_agents() {
    let h = harness(&["echo"]);
    let mut held = new_task("echo", json!({}));
    held.review = true;
    let held = h.submit(held);
    let mut after = new_task("echo", json!({}));
    after.depends_on = vec![held];
    let after = h.submit(after);
    let missing = h.submit(new_task("nowhere", json!({})));
    let summary = h.run_until_idle().await;
    assert_eq!(h.task(held).state, State::Review);
    assert_eq!(h.task(after).state, State::Pending);
    assert_eq!(h.task(missing).state, State::Ready);
    assert_eq!(summary.left_blocked, vec![("echo".to_string(), 1)]);
    assert_eq!(
        summary.left_for_missing_agents,
        vec![("nowhere".to_string(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_appear_change_and_disappear_without_a_restart() {
    let h = harness(&[]);
    let runtime = h.runtime();
    let mut agents = AgentDir::new(h.agents.path());
    assert!(agents.rescan(&runtime).await.is_empty());

    std::fs::copy(guest_path("permanent"), h.agents.path().join("worker.wasm")).unwrap();
    let report = agents.rescan(&runtime).await;
    assert_eq!(report.loaded, vec!["worker"]);
    let old = agents.loaded("worker").unwrap();

    // Same content, touched: nothing to reload.
    let file = std::fs::File::options()
        .write(true)
        .open(h.agents.path().join("worker.wasm"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    assert!(agents.rescan(&runtime).await.is_empty());
    assert!(Arc::ptr_eq(&agents.loaded("worker").unwrap(), &old));

    // Replaced by another component: the new version is loaded; the old Arc
    // (held by a run in flight) still works.
    std::fs::copy(guest_path("echo"), h.agents.path().join("worker.wasm")).unwrap();
    let report = agents.rescan(&runtime).await;
    assert_eq!(report.loaded, vec!["worker"]);
    assert_ne!(agents.loaded("worker").unwrap().hash, old.hash);

    // A manifest replaced by another of the same size and modification time
    // (a release folder of reproducible builds, a swapped symlink) is
    // another file: read again. It was kept, old limits and all.
    let manifest = h.agents.path().join("worker.toml");
    std::fs::write(&manifest, "timeout = \"90s\"\n").unwrap();
    assert_eq!(agents.rescan(&runtime).await.loaded, vec!["worker"]);
    let modified = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    let next = h.agents.path().join("next.tmp");
    std::fs::write(&next, "timeout = \"10s\"\n").unwrap();
    let file = std::fs::File::options().write(true).open(&next).unwrap();
    file.set_modified(modified).unwrap();
    drop(file);
    std::fs::rename(&next, &manifest).unwrap();
    assert_eq!(agents.rescan(&runtime).await.loaded, vec!["worker"]);
    assert_eq!(
        agents.loaded("worker").unwrap().limits.timeout,
        Duration::from_secs(10)
    );

    std::fs::remove_file(h.agents.path().join("worker.wasm")).unwrap();
    assert_eq!(agents.rescan(&runtime).await.removed, vec!["worker"]);
    assert!(agents.loaded("worker").is_none());
}

/// A folder that cannot be listed for a moment (too many open files, a
/// network file system) is not an empty one: its agents stay loaded. It
/// unloaded every agent, and the daemon stopped claiming their tasks. A
/// folder removed takes its agents with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_folder_that_cannot_be_listed_keeps_its_agents() {
    let h = harness(&[]);
    let runtime = h.runtime();
    let folder = h.agents.path().join("fleet");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(guest_path("echo"), folder.join("worker.wasm")).unwrap();
    let mut agents = AgentDir::new(&folder);
    assert_eq!(agents.rescan(&runtime).await.loaded, vec!["worker"]);
    // Listing it fails (not a directory, for a moment).
    let away = h.agents.path().join("away");
    std::fs::rename(&folder, &away).unwrap();
    std::fs::write(&folder, "not a folder").unwrap();
    assert!(agents.rescan(&runtime).await.is_empty());
    assert!(
        agents.loaded("worker").is_some(),
        "unloaded on a failed listing"
    );
    // Back: nothing changed, nothing reloaded.
    std::fs::remove_file(&folder).unwrap();
    std::fs::rename(&away, &folder).unwrap();
    assert!(agents.rescan(&runtime).await.is_empty());
    // Removed: its agents go.
    std::fs::remove_dir_all(&folder).unwrap();
    assert_eq!(agents.rescan(&runtime).await.removed, vec!["worker"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_by_content_hash() {
    let h = harness(&["echo"]);
    let runtime = h.runtime();
    let agents = h.agent_dir(&runtime).await;
    let hash = agents.loaded("echo").unwrap().hash.clone();
    let cached: Vec<_> = std::fs::read_dir(h.data.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(cached.len(), 1);
    assert!(cached[0].to_string_lossy().starts_with(&hash));

    // A second runtime loads from the cache and the agent works.
    let id = h.submit(new_task("echo", json!({"again": true})));
    h.run_until_idle().await;
    assert_eq!(h.task(id).state, State::Complete);
}
