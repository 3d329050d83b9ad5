//! What only the PostgreSQL driver promises: hosts whose clocks disagree
//! still agree on leases (decisions use the server's clock), and hosts
//! starting at once on a fresh database migrate it once. Every test here
//! passes at once without PostgreSQL's server binaries (the throwaway
//! cluster says once that it skipped).

mod common;
use common::{Env, TestDb, wait_for};

use std::process::{Child, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use colony::queue::{Queue, QueueError, QueueOptions};
use colony::task::{NewTask, State};

/// One hour, in the units of `COLONY_CLOCK_OFFSET_MS`.
const HOUR_MS: i64 = 3_600_000;

/// A daemon renewing its leases every 200 ms and resetting those not renewed
/// for 2 s (which it checks every 200 ms too), its clock shifted by `offset_ms`.
fn daemon_with_clock(env: &Env, offset_ms: i64) -> Child {
    let mut cmd = env.cmd();
    if offset_ms != 0 {
        cmd.env("COLONY_CLOCK_OFFSET_MS", offset_ms.to_string());
    }
    cmd.args(["daemon", "--heartbeat", "200ms", "--stale-after", "2s"])
        .args(["--poll", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A 4 s task claimed by a daemon whose clock is off by `holder_offset_ms`,
/// while a second daemon, off by `reaper_offset_ms`, reaps stale leases on
/// the same database: the live lease must survive, the task run once.
fn live_lease_survives_skew(holder_offset_ms: i64, reaper_offset_ms: i64) {
    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &["sleeper"]);
    let id = env.submit(&["sleeper", r#"{"ms": 4000}"#]);
    let mut holder = daemon_with_clock(&env, holder_offset_ms);
    wait_for("the task to be claimed", Duration::from_secs(30), || {
        env.queue().get(id).unwrap().state == State::InProgress
    });
    let holder_name = env.queue().get(id).unwrap().claimed_by.unwrap();
    let mut reaper = daemon_with_clock(&env, reaper_offset_ms);
    wait_for("the task to complete", Duration::from_secs(60), || {
        env.queue().get(id).unwrap().state.is_terminal()
    });
    let reaper_alive = reaper.try_wait().unwrap().is_none();
    for child in [&mut holder, &mut reaper] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(reaper_alive, "the reaping daemon ran all along");

    let task = env.queue().get(id).unwrap();
    let events = env.queue().events(Some(id), 0, 100).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        (task.state, task.attempts),
        (State::Complete, 1),
        "run once: {names:?}"
    );
    assert_eq!(names, ["submit", "claim", "complete"], "no lease_expired");
    assert_eq!(events[1].actor, holder_name, "the first claim held");
    // The CLI agrees.
    let shown = env.show(id);
    assert_eq!(shown["attempts"], 1);
    let listed = env.ok(&["events", "--task", &id.to_string()]);
    assert!(!listed.contains("lease_expired"), "{listed}");
}

#[test]
fn a_daemon_whose_clock_is_an_hour_fast_does_not_reset_a_live_lease() {
    live_lease_survives_skew(0, HOUR_MS);
}

#[test]
fn a_daemon_whose_clock_is_an_hour_slow_keeps_its_lease() {
    live_lease_survives_skew(-HOUR_MS, 0);
}

/// A CLI on a host whose clock is an hour off: `submit --in` counts from the
/// server's clock, as every due time does, and `status` ages from it too.
/// `--in 30m` from a clock an hour slow made a task due at once; `status`
/// from a clock an hour fast said the task just submitted waited an hour.
#[test]
fn a_cli_whose_clock_is_off_counts_delays_and_ages_by_the_servers() {
    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &[]);
    let skewed = |offset_ms: i64, args: &[&str]| -> serde_json::Value {
        let out = env
            .cmd()
            .env("COLONY_CLOCK_OFFSET_MS", offset_ms.to_string())
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for (offset_ms, delay_ms, delay) in [(-HOUR_MS, 1_800_000, "30m"), (HOUR_MS, 60_000, "1m")] {
        let id = skewed(offset_ms, &["submit", "echo", "{}", "--in", delay])["id"]
            .as_i64()
            .unwrap();
        let server_now = env.queue().now().unwrap();
        let task = env.queue().get(id).unwrap();
        assert_eq!(task.state, State::Pending, "{task:?}");
        let due_in = task.run_at - server_now;
        assert!(
            (delay_ms - 60_000..=delay_ms).contains(&due_in),
            "--in {delay} with the clock off by {offset_ms} ms: due in {due_in} ms"
        );
    }
    env.submit(&["echo", "{}"]);
    let status = skewed(HOUR_MS, &["status"]);
    let age = status["oldest_ready_age_ms"].as_i64().unwrap();
    assert!(age < 60_000, "{status}");
}

#[test]
fn ten_queues_opened_at_once_on_a_fresh_database_migrate_it_once() {
    let Some(db) = TestDb::postgres() else { return };
    let openers = 10;
    let start = Arc::new(Barrier::new(openers));
    let handles: Vec<_> = (0..openers)
        .map(|i| {
            let (url, start) = (db.url().to_string(), start.clone());
            std::thread::spawn(move || {
                let opts = QueueOptions {
                    actor: format!("opener-{i}"),
                    ..Default::default()
                };
                start.wait();
                let mut q =
                    Queue::open_with(&url, opts).unwrap_or_else(|e| panic!("opener {i}: {e}"));
                q.submit(&NewTask::new("noop", format!(r#"{{"i":{i}}}"#)))
                    .unwrap_or_else(|e| panic!("opener {i}: {e}"))
                    .id
            })
        })
        .collect();
    let mut ids: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), openers, "every opener stored its task");

    // The version a single open writes on a database of its own.
    let reference = TestDb::postgres().unwrap();
    drop(reference.open());
    let current = reference
        .raw()
        .value("SELECT version FROM colony_schema")
        .int()
        .unwrap();
    assert!(current >= 1);

    let mut raw = db.raw();
    let versions = raw.query("SELECT version FROM colony_schema");
    assert_eq!(versions.len(), 1, "one version row: {versions:?}");
    assert_eq!(versions[0][0].int(), Some(current));
    let tables = "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()";
    assert_eq!(
        raw.value(tables),
        reference.raw().value(tables),
        "the same tables as a database migrated by one host"
    );
}

/// The server drops every connection of the daemon several times while it
/// works through a backlog: the daemon reconnects, keeps its leases, retries
/// what was cut off, and every task completes exactly once.
#[test]
fn a_daemon_whose_connections_are_cut_reconnects_and_loses_nothing() {
    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &["sleeper"]);
    let batch: String = (0..200)
        .map(|i| {
            format!(
                "{{\"agent\": \"sleeper\", \"payload\": {{\"ms\": {}}}}}\n",
                // Long enough in all (~0.8 s at 16 at once) for the cuts
                // below to land while it works, however fast the machine.
                50 + i % 20
            )
        })
        .collect();
    let file = env.file("tasks.jsonl", batch);
    env.ok(&["submit", "--batch", &file]);
    let log = env.data.path().join("daemon.log");
    let mut daemon = env
        .cmd()
        .args([
            "daemon",
            "--until-idle",
            "--heartbeat",
            "200ms",
            "--poll",
            "100ms",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut admin = env.database.raw();
    let mut cuts = 0;
    while cuts < 5 && daemon.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(150));
        let cut = admin.value(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        );
        if cut.int().unwrap_or(0) > 0 {
            cuts += 1;
        }
    }
    wait_for("the daemon to finish", Duration::from_secs(120), || {
        daemon.try_wait().unwrap().is_some()
    });
    assert!(
        daemon.wait().unwrap().success(),
        "the daemon rode out the cuts"
    );
    assert!(
        cuts >= 3,
        "the connections were cut while it worked ({cuts} times)"
    );
    let queue = env.queue();
    let counts = queue.counts().unwrap();
    assert_eq!(
        counts,
        vec![("sleeper".to_string(), State::Complete, 200)],
        "every task completed"
    );
    let completions = queue
        .events(None, 0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event == "complete")
        .count();
    assert_eq!(completions, 200, "each completed once");
    // The listener's losses, said with the server's reason, once per 30 s
    // rather than once per cut.
    let log = std::fs::read_to_string(&log).unwrap();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("listening for new work:"))
        .collect();
    assert!(said.len() <= 1, "{log}");
    assert!(said.iter().all(|l| l.contains("SQLSTATE 57P01")), "{log}");
}

/// A daemon that would not look at the database for an hour (poll, watch
/// and heartbeat all an hour) still claims a task the moment another
/// connection submits it: the server pushes `NOTIFY colony_work`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_on_another_connection_wakes_an_idle_daemon_at_once() {
    use colony::orchestrator::{Daemon, DaemonConfig};
    use colony::runtime::{AgentDir, Runtime, RuntimeConfig};

    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &["echo"]);
    let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
    let mut agents = AgentDir::new(env.agents.path());
    agents.rescan(&runtime).await;
    let hour = Duration::from_secs(3600);
    let cfg = DaemonConfig {
        poll: hour,
        watch_interval: hour,
        heartbeat: hour,
        stale_after: hour * 2,
        ..DaemonConfig::default()
    };
    let queue = tokio::task::block_in_place(|| env.database.open());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let daemon = tokio::spawn(Daemon::new(queue, runtime, agents, cfg).run(stop_rx));
    // Let it start, find nothing, and go to sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = tokio::task::block_in_place(|| {
        env.database
            .open()
            .submit(&NewTask::new("echo", "{}"))
            .unwrap()
            .id
    });
    let single = states_when_finished(&env, &[id]).await;
    // Then a batch, which goes many rows per statement and notifies once.
    let batch = tokio::task::block_in_place(|| {
        let tasks = vec![NewTask::new("echo", "{}"); 3];
        let submitted = env.database.open().submit_batch(&tasks).unwrap();
        submitted.iter().map(|s| s.id).collect::<Vec<_>>()
    });
    let batched = states_when_finished(&env, &batch).await;
    stop.send(true).unwrap();
    daemon.await.unwrap().unwrap();
    assert_eq!(
        single,
        [State::Complete],
        "woken by the notification, not by a poll"
    );
    assert_eq!(
        batched,
        [State::Complete; 3],
        "woken by the batch's notification"
    );
}

/// The states of `ids` once all are terminal, or after 30 s.
async fn states_when_finished(env: &Env, ids: &[i64]) -> Vec<State> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let states: Vec<State> = tokio::task::block_in_place(|| {
            let q = env.database.open();
            ids.iter().map(|id| q.get(*id).unwrap().state).collect()
        });
        if states.iter().all(|s| s.is_terminal()) || std::time::Instant::now() > deadline {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two hosts submitting the same idempotency key at the same moment: the
/// second waits for the first and answers its task (`existed`) instead of
/// failing on the unique index.
/// Makes `env`'s database refuse connections for `outage` (as a server
/// restarting does) and cuts those open; answers how many were cut. Done
/// from the server's `postgres` database: a database cannot close itself.
fn refuse_connections_for(env: &Env, outage: Duration) -> i64 {
    let url = env.database.url().to_string();
    let (server, name) = url.rsplit_once('/').unwrap();
    let mut admin =
        postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls).unwrap();
    let allow = |admin: &mut postgres::Client, allow: bool| {
        let sql = format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}");
        admin.batch_execute(&sql).unwrap();
    };
    allow(&mut admin, false);
    let cut: i64 = admin
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    std::thread::sleep(outage);
    allow(&mut admin, true);
    cut
}

/// A daemon whose database goes away mid-drain keeps its runs' results,
/// stores them when it is back, and says that it is back.
#[test]
fn a_daemon_says_when_its_database_is_back() {
    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &["sleeper"]);
    let batch: String = (0..200)
        .map(|_| "{\"agent\": \"sleeper\", \"payload\": {\"ms\": 100}}\n")
        .collect();
    let file = env.file("tasks.jsonl", batch);
    env.ok(&["submit", "--batch", &file]);
    let daemon = env
        .cmd()
        .args(["daemon", "--until-idle", "--poll", "100ms"])
        .env("COLONY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it is draining (started and storing), not before it connects.
    wait_for("the first completions", Duration::from_secs(60), || {
        env.queue()
            .counts()
            .unwrap()
            .iter()
            .any(|(_, state, n)| *state == State::Complete && *n > 0)
    });
    assert!(refuse_connections_for(&env, Duration::from_millis(1500)) >= 1);
    let out = daemon.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("storing works again: the database is back"),
        "{stderr}"
    );
    assert_eq!(
        env.queue().counts().unwrap(),
        vec![("sleeper".to_string(), State::Complete, 200)]
    );
}

/// `events --follow` (a log shipper) rides out a cut connection as the
/// daemon does: it says so, reads again, and prints what was committed
/// meanwhile, nothing skipped.
#[test]
fn a_trail_follower_whose_connection_is_cut_goes_on_following() {
    use std::io::{BufRead, BufReader};
    let Some(db) = TestDb::postgres() else { return };
    let env = Env::on(db, &[]);
    let first = env.submit(&["later", "{}"]);
    let mut follower = env
        .cmd()
        .args(["events", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = lines_tx.send(line.unwrap());
        }
    });
    let submit_of = |id: i64| {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the follower printed the next event");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (event["task_id"].as_i64(), event["event"].as_str()),
            (Some(id), Some("submit")),
            "{line}"
        );
    };
    submit_of(first);
    let cut = refuse_connections_for(&env, Duration::from_millis(1500));
    assert!(cut >= 1, "the follower's connection was cut");
    let second = env.submit(&["later", "{}"]);
    submit_of(second);
    assert!(follower.try_wait().unwrap().is_none(), "still following");
    follower.kill().unwrap();
    let stderr = String::from_utf8_lossy(&follower.wait_with_output().unwrap().stderr).into_owned();
    assert!(stderr.contains("the database is unreachable"), "{stderr}");
    assert!(stderr.contains("the database is back"), "{stderr}");
}

#[test]
fn a_key_submitted_on_two_connections_at_once_makes_one_task() {
    let Some(db) = TestDb::postgres() else { return };
    db.open(); // migrate
    let mut first = db.raw();
    first.execute("BEGIN");
    first.execute(
        "INSERT INTO tasks (agent, payload, state, max_attempts, max_revisions, run_at, backoff_ms,
                            idem_key, created_at, updated_at)
         VALUES ('echo', '{}', 'ready', 3, 3, 0, 10, 'K', 0, 0)",
    );
    let url = db.location();
    let second = std::thread::spawn(move || {
        let mut new = NewTask::new("echo", "{}");
        new.key = Some("K".into());
        Queue::open(url).unwrap().submit(&new)
    });
    std::thread::sleep(Duration::from_millis(300));
    first.execute("COMMIT");
    let submitted = second
        .join()
        .unwrap()
        .expect("the second submit answers, not fails");
    assert!(submitted.existed, "{submitted:?}");
    let ids = db.raw().query("SELECT id FROM tasks");
    assert_eq!(ids.len(), 1, "one task");
    assert_eq!(ids[0][0].int(), Some(submitted.id));
}

/// PostgreSQL hands out event ids at insert, not at commit: a follower of
/// the trail (`events --follow`, the dashboard's stream and metrics) must
/// wait at a hole rather than step past an event committed late, and step
/// over a hole a rollback left once it has waited long enough.
#[test]
fn a_trail_follower_waits_for_an_event_committed_late() {
    let Some(db) = TestDb::postgres() else { return };
    let mut queue = db.open();
    let first = queue.submit(&NewTask::new("echo", "{}")).unwrap().id;
    // A gap wait of 1 s: the steps below, until the late commit, take far
    // less on a loaded machine.
    let mut cursor = colony::queue::TrailCursor::with_gap_wait(0, Duration::from_millis(1000));
    let seen: Vec<i64> = cursor
        .next_events(&queue, None, 100)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(seen.len(), 1);

    // A transaction takes the next id and stays open; a later one commits.
    let common::Raw::Postgres(mut late) = db.raw() else {
        unreachable!()
    };
    let mut open = late.transaction().unwrap();
    let held: i64 = open
        .query_one(
            "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
             VALUES (0, $1, 'retry', 'failed', 'ready', 'late', '{}') RETURNING id",
            &[&first],
        )
        .unwrap()
        .get(0);
    let second = queue.submit(&NewTask::new("echo", "{}")).unwrap().id;
    let after_hole: Vec<i64> = queue
        .events(Some(second), 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert!(after_hole[0] > held, "the later event has the later id");
    assert!(
        cursor.next_events(&queue, None, 100).unwrap().is_empty(),
        "stepped past an open hole"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(cursor.next_events(&queue, None, 100).unwrap().is_empty());
    open.commit().unwrap();
    let ids: Vec<i64> = cursor
        .next_events(&queue, None, 100)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        ids,
        vec![held, after_hole[0]],
        "the late event, then the later one"
    );

    // A rolled-back insert leaves a hole that never fills: stepped over
    // once it has waited out the gap wait.
    let mut rolled = late.transaction().unwrap();
    rolled
        .execute(
            "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
             VALUES (0, $1, 'retry', 'failed', 'ready', 'late', '{}')",
            &[&first],
        )
        .unwrap();
    rolled.rollback().unwrap();
    let third = queue.submit(&NewTask::new("echo", "{}")).unwrap().id;
    assert!(cursor.next_events(&queue, None, 100).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(1100));
    let events = cursor.next_events(&queue, None, 100).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].task_id, third);

    // A follower started later reads that trail at once: a hole behind an
    // event written six gap waits ago is no transaction still running
    // (`events --follow` on an old trail waited 10 s at each).
    std::thread::sleep(Duration::from_millis(5000));
    let mut later = colony::queue::TrailCursor::with_gap_wait(0, Duration::from_millis(1000));
    let all = later.next_events(&queue, None, 100).unwrap();
    assert_eq!(all.last().map(|e| e.task_id), Some(third), "{all:?}");
}

/// A batch refused for a dependency on its third line stores nothing and
/// takes no event ids: its first two tasks' events took ids and gave them
/// back at the rollback, and every follower of the trail waited 10 s at
/// the hole.
#[test]
fn a_batch_refused_for_a_dependency_leaves_no_hole_in_the_trail() {
    let Some(db) = TestDb::postgres() else { return };
    let mut queue = db.open();
    let first = queue.submit(&NewTask::new("echo", "{}")).unwrap().id;
    let last_event = |queue: &Queue| queue.events(None, 0, 100).unwrap().last().unwrap().id;
    let before = last_event(&queue);
    let mut batch = vec![NewTask::new("echo", "{}"); 3];
    batch[2].depends_on = vec![first + 1000];
    let err = queue.submit_batch(&batch).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    queue.submit(&NewTask::new("echo", "{}")).unwrap();
    assert_eq!(
        last_event(&queue),
        before + 1,
        "an id was taken and given back"
    );
}

/// The model journal's ids come from a sequence too: `/metrics` waits at a
/// call committed after a later one rather than leaving its tokens and
/// cost out of the counters for good.
#[test]
fn metrics_count_a_model_call_committed_late() {
    let Some(db) = TestDb::postgres() else { return };
    let queue = db.open();
    let metrics = colony::web::metrics::Metrics::new();
    metrics.render(&queue).unwrap();
    let insert = |tokens: i64| {
        format!(
            "INSERT INTO model_calls (at, task_id, root_id, agent, token, attempt, seq, alias,
                 request_hash, request, status, input_tokens, output_tokens, ms, replayed)
             VALUES ((EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT, 1, 1, 'writer', 1, 1, 1,
                     'fast', 'h', 'null', 'ok', {tokens}, 0, 1, 0)"
        )
    };
    let input_tokens = |text: &str| -> String {
        text.lines()
            .find(|l| {
                l.starts_with("colony_model_tokens_total{") && l.contains("direction=\"input\"")
            })
            .unwrap_or("none")
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let mut late = db.raw();
    late.execute("BEGIN");
    late.execute(&insert(5000));
    db.raw().execute(&insert(100));
    // The later call (written now: a hole behind an old row is stepped over)
    // waits behind the open one (until it commits, or for the gap wait if
    // it rolls back).
    assert_eq!(input_tokens(&metrics.render(&queue).unwrap()), "none");
    late.execute("COMMIT");
    assert_eq!(input_tokens(&metrics.render(&queue).unwrap()), "5100");
}

/// A role granted the tables but not the tasks' id sequence (a schema
/// owned by an administrator) submits batches too: one task per statement,
/// since it may not draw ids itself, in the batch's order.
#[test]
fn a_role_without_the_sequence_grant_still_submits_batches() {
    let Some(db) = TestDb::postgres() else { return };
    drop(db.open()); // migrated by the owner
    let common::Raw::Postgres(mut admin) = db.raw() else {
        unreachable!()
    };
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE colony_tables_only LOGIN;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public
                TO colony_tables_only;",
        )
        .unwrap();
    let url = db.url().replacen("postgres@", "colony_tables_only@", 1);
    let mut q = Queue::open(&url).unwrap();
    common::submit_numbered_batch(&mut q, 5);
}

/// A TCP proxy to the test server that, once armed, forwards the client's
/// next `COMMIT`, lets the server act on it, and cuts the client's
/// connection before the answer reaches it: a commit the client cannot
/// confirm, though it happened.
struct CommitCutter {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl CommitCutter {
    fn start(upstream_port: u16) -> CommitCutter {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let armed_for_proxy = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let mut server = TcpStream::connect(("127.0.0.1", upstream_port)).unwrap();
                let held = Arc::new(AtomicBool::new(false));
                // Server to client, unless the answer is being held back.
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                let held_back = held.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from_server.read(&mut buf) {
                        if n == 0
                            || held_back.load(Ordering::SeqCst)
                            || to_client.write_all(&buf[..n]).is_err()
                        {
                            return;
                        }
                    }
                });
                let armed = armed_for_proxy.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        let commit = buf[..n].windows(6).any(|w| w == b"COMMIT");
                        if commit && armed.swap(false, Ordering::SeqCst) {
                            held.store(true, Ordering::SeqCst);
                            server.write_all(&buf[..n]).unwrap();
                            std::thread::sleep(Duration::from_millis(300));
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = server.shutdown(Shutdown::Both);
                            return;
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        CommitCutter { port, armed }
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The connection lost while the server commits a claim: the claimer cannot
/// know the claims were made, so it never runs them; left alone they would
/// sit in_progress until a lease reset spent their attempt (with one
/// attempt, failing tasks that never ran). The claimer is told the commit
/// is unknown, with its claim tokens, and gives those claims back.
#[test]
fn claims_whose_commit_is_unconfirmed_are_given_back_unstarted() {
    let Some(db) = TestDb::postgres() else { return };
    let mut q = db.open();
    for _ in 0..3 {
        let mut task = NewTask::new("echo", "{}");
        task.max_attempts = 1;
        q.submit(&task).unwrap();
    }
    let url = db.location().to_string_lossy().into_owned();
    let port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let cutter = CommitCutter::start(port);
    let proxied = url.replace(&format!(":{port}/"), &format!(":{}/", cutter.port));
    let mut claimer = Queue::open(&proxied).unwrap();
    cutter.arm();
    let err = claimer
        .finish_and_claim(&[], &[("echo".into(), 3)])
        .unwrap_err();
    let QueueError::CommitUnknown { claim_tokens, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(err.is_transient(), "{err}");
    let claimed = db
        .raw()
        .query("SELECT id FROM tasks WHERE state = 'in_progress'");
    assert_eq!(claimed.len(), 3, "the claims did commit");

    let released = q.release_unconfirmed_claims(claim_tokens).unwrap();
    assert_eq!(released, vec![1, 2, 3]);
    for id in released {
        let task = q.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Ready, 0), "{task:?}");
        let release = q
            .events(Some(id), 0, 10)
            .unwrap()
            .into_iter()
            .find(|e| e.event == "release")
            .unwrap();
        assert_eq!(release.detail["started"], false, "{release:?}");
    }
    assert!(
        q.release_unconfirmed_claims(claim_tokens)
            .unwrap()
            .is_empty(),
        "given back once"
    );
}

/// A backend terminated while it commits (`pg_terminate_backend`, a
/// restart with `-m fast`) answers COMMIT with a FATAL error (SQLSTATE
/// 57P01), after which the transaction may or may not have committed: the
/// caller is told it cannot know, with the claim tokens to give back, as
/// for a connection lost. It was told nothing was stored: a daemon's claims
/// that did commit sat leased until a reset spent their attempt, and a CLI
/// submit said "unavailable: try again" of tasks it had stored.
#[test]
fn a_backend_terminated_during_commit_leaves_the_commit_unknown() {
    let Some(db) = TestDb::postgres() else { return };
    let mut q = db.open();
    for _ in 0..3 {
        q.submit(&NewTask::new("echo", "{}")).unwrap();
    }
    // Fires at COMMIT, in the committing backend, which it terminates.
    let mut raw = db.raw();
    raw.execute(
        "CREATE FUNCTION end_own_backend() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_terminate_backend(pg_backend_pid());
             PERFORM pg_sleep(5);
             RETURN NULL;
         END $$",
    );
    raw.execute(
        "CREATE CONSTRAINT TRIGGER end_at_commit AFTER INSERT OR UPDATE ON tasks
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION end_own_backend()",
    );
    let mut claimer = db.open();
    let err = claimer
        .finish_and_claim(&[], &[("echo".into(), 3)])
        .unwrap_err();
    let QueueError::CommitUnknown { claim_tokens, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(!claim_tokens.is_empty(), "the claims' tokens: {err:?}");
    // The server's FATAL (57P01) when the client reads it before the
    // socket closes; "connection closed" when the close wins the race.
    let said = err.to_string();
    assert!(
        said.contains("57P01") || said.contains("connection closed"),
        "{err}"
    );

    let mut submitter = db.open();
    let err = submitter.submit(&NewTask::new("echo", "{}")).unwrap_err();
    assert!(matches!(err, QueueError::CommitUnknown { .. }), "{err:?}");
}

/// A person's verdict cancels the reviewer tasks still to answer, but not
/// one whose row another transaction holds (its own completion, which locks
/// the reviewer before the judged task: waiting for it would deadlock; or a
/// heartbeat, a claim). The verdict goes through at once either way, and a
/// reviewer skipped is cancelled after it once its row is free (it ran on,
/// spending its chain's budget on a verdict that could not count); one held
/// throughout runs on.
#[test]
fn a_verdict_does_not_wait_for_a_reviewer_row_another_transaction_holds() {
    let Some(db) = TestDb::postgres() else { return };
    let mut q = db.open();
    let mut new = NewTask::new("writer", "{}");
    new.reviewer = Some("critic".into());
    let judged = q.submit(&new).unwrap().id;
    let lease = q.claim("writer", 1).unwrap().remove(0).lease;
    q.finish(
        lease,
        colony::task::RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: false,
        },
        "",
    )
    .unwrap();
    let reviewer = q.claim("critic", 1).unwrap().remove(0).lease.task_id;

    let mut holder = db.raw();
    holder.execute("BEGIN");
    holder.execute(&format!(
        "SELECT id FROM tasks WHERE id = {reviewer} FOR UPDATE"
    ));
    // Waiting for the row would end in a lock timeout: the approval failed.
    assert_eq!(q.approve(judged, None).unwrap(), State::Complete);
    holder.execute("ROLLBACK");
    assert_eq!(q.get(reviewer).unwrap().state, State::InProgress);

    // A row held only for a moment (a heartbeat's): cancelled once free.
    let (judged, reviewer) = reviewed_by_a_running_critic(&mut q);
    let holder = hold_for_a_moment(&db, reviewer);
    assert_eq!(q.reject(judged, "again").unwrap(), State::Ready);
    holder.join().unwrap();
    let cancelled = q.get(reviewer).unwrap();
    assert_eq!(cancelled.state, State::Cancelled, "{cancelled:?}");

    // Likewise a cancel of the judged task, which names both. (The
    // rejected one, ready again, is out of the way first.)
    q.cancel(judged, "done with it").unwrap();
    let (judged, reviewer) = reviewed_by_a_running_critic(&mut q);
    let holder = hold_for_a_moment(&db, reviewer);
    assert_eq!(
        q.cancel(judged, "no longer needed").unwrap(),
        vec![judged, reviewer]
    );
    holder.join().unwrap();
    assert_eq!(q.get(reviewer).unwrap().state, State::Cancelled);
}

/// Locks task `id`'s row in another transaction for 200 ms, returning once
/// it is held (as a heartbeat or a claim holds one for a moment).
fn hold_for_a_moment(db: &TestDb, id: i64) -> std::thread::JoinHandle<()> {
    let (locked, is_locked) = std::sync::mpsc::channel();
    let mut holder = db.raw();
    let holding = std::thread::spawn(move || {
        holder.execute("BEGIN");
        holder.execute(&format!("SELECT id FROM tasks WHERE id = {id} FOR UPDATE"));
        locked.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        holder.execute("ROLLBACK");
    });
    is_locked.recv().unwrap();
    holding
}

/// A `writer` task held for review by a `critic` whose run has started:
/// the judged task's id and the reviewer's.
fn reviewed_by_a_running_critic(q: &mut Queue) -> (i64, i64) {
    let mut new = NewTask::new("writer", "{}");
    new.reviewer = Some("critic".into());
    let judged = q.submit(&new).unwrap().id;
    let lease = q.claim("writer", 1).unwrap().remove(0).lease;
    let outcome = colony::task::RunOutcome::Success {
        output: "{}".into(),
        spawn: vec![],
        needs_review: false,
    };
    q.finish(lease, outcome, "").unwrap();
    (
        judged,
        q.claim("critic", 1).unwrap().remove(0).lease.task_id,
    )
}

/// A URL without the password the server asks for fails at once as an
/// error no retry helps (it said "cannot reach", kind unavailable), and
/// PGPASSWORD gives it, as libpq's does: a password that stays out of argv
/// and of COLONY_DB. Neither password is ever printed.
#[test]
fn a_missing_password_is_no_outage_and_pgpassword_gives_it() {
    use colony_tests::postgres::PASSWORD;
    let Some(url) = colony_tests::postgres::fresh_database_behind_a_password() else {
        return;
    };
    let env = Env::new(&["echo"]);
    // Refused with exit 1 and kind error (no retry helps), saying `why`,
    // and never printing either password.
    let refused = |vars: &[(&str, &str)], why: &str| {
        let out = env
            .cmd()
            .args(["--json", "--db", &url, "list"])
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !said.contains(PASSWORD) && !said.contains("wrong-pw"),
            "{said}"
        );
        let error: serde_json::Value =
            serde_json::from_str(said.trim()).unwrap_or_else(|e| panic!("{e}: {said}"));
        assert_eq!(error["kind"], "error", "{error}");
        assert!(error["error"].as_str().unwrap().contains(why), "{error}");
    };
    refused(&[], "password missing");
    refused(
        &[("PGPASSWORD", "wrong-pw")],
        "password authentication failed",
    );
    let id = env.ok_with_env(
        &["--db", &url, "submit", "echo", "{}"],
        &[("PGPASSWORD", PASSWORD)],
    );
    let id: i64 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    let shown = env.ok_with_env(
        &["--json", "--db", &url, "show", &id.to_string()],
        &[("PGPASSWORD", PASSWORD)],
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["id"], id);
}

/// A URL the driver would read otherwise than its messages show, or whose
/// settings colony cannot meet, is refused before any connection: an @ in
/// the password (the driver sent the rest of the password to DNS as part of
/// the host name) and sslmode=require (colony connects without TLS).
#[test]
fn a_url_read_two_ways_or_asking_for_tls_is_refused_before_connecting() {
    let env = Env::new(&["echo"]);
    for (url, says) in [
        (
            "postgres://colony:p@ssLEAK@127.0.0.1:1/fleet",
            "more than one @ before the host",
        ),
        (
            "postgres://colony@127.0.0.1:1/fleet?sslmode=require",
            "colony connects without TLS",
        ),
    ] {
        let out = env.run(&["--db", url, "list"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {said}");
        assert!(said.contains(says), "{url}: {said}");
        assert!(!said.contains("ssLEAK"), "{url}: {said}");
    }
}

/// Two copies into one empty database at once: one copies, the other waits
/// for it and then finds the target not empty (it failed on a duplicate id,
/// a raw database error).
#[test]
fn two_migrates_into_one_empty_database_at_once_copy_once() {
    let Some(target) = TestDb::postgres() else {
        return;
    };
    let sources: Vec<TestDb> = (0..2).map(|_| TestDb::sqlite()).collect();
    for source in &sources {
        common::submit_numbered_batch(&mut source.open(), 3000);
    }
    let barrier = Arc::new(Barrier::new(2));
    let results: Vec<Result<colony::queue::CopyReport, QueueError>> = std::thread::scope(|s| {
        let copies: Vec<_> = sources
            .iter()
            .map(|source| {
                let (barrier, target) = (barrier.clone(), &target);
                s.spawn(move || {
                    let (from, mut to) = (source.open(), target.open());
                    barrier.wait();
                    from.copy_into(&mut to)
                })
            })
            .collect();
        copies.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let copied = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(copied, 1, "{results:?}");
    let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(refused.to_string().contains("is not empty"), "{refused}");
    assert_eq!(
        target
            .open()
            .counts()
            .unwrap()
            .iter()
            .map(|c| c.2)
            .sum::<u64>(),
        3000
    );
}
