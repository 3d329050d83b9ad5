//! The database schema and its migrations, versioned by `PRAGMA user_version`.
//!
//! Each migration runs once, in order, inside one transaction. Released
//! migrations are never edited: a change is a new entry at the end.

use rusqlite::Connection;

use crate::queue::QueueError;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    V1,
    V2,
    V3,
    // 4: the indexes the dashboard's pages read through.
    crate::queue::dashboard::DASHBOARD_INDEXES,
    V5,
    // 6: running tasks leave the dashboard's state index.
    crate::queue::dashboard::AT_REST_INDEX,
    // 7: the lease its holder promised to renew within (see tasks::claim_in).
    LEASE_MS,
    // 8: how many tasks a chain holds, kept on its root (see
    // insert::insert_children).
    "ALTER TABLE tasks ADD COLUMN chain_tasks INTEGER NOT NULL DEFAULT 1;",
    // 9: model-token reservations count until settled, also after their
    // run ended; those of runs ended before go.
    crate::queue::journal::DROP_ENDED_RUNS_RESERVATIONS,
    // 10: a reservation names its call, which settles that one alone.
    "ALTER TABLE model_reservations ADD COLUMN seq INTEGER;",
    // 11: the overview's latest failures.
    crate::queue::dashboard::FAILED_RECENTLY_INDEX,
];

/// How long, in ms, the claim's holder promised to renew its lease within
/// (its `--stale-after`): no host resets the lease sooner, whatever its
/// own setting. NULL for claims made before it existed.
pub(crate) const LEASE_MS: &str = "ALTER TABLE tasks ADD COLUMN lease_ms INTEGER;";

// 1: tasks, dependencies, the audit trail and run logs.
const V1: &str = r#"
    CREATE TABLE tasks (
        id             INTEGER PRIMARY KEY,
        agent          TEXT    NOT NULL,
        payload        TEXT    NOT NULL,             -- JSON
        state          TEXT    NOT NULL,
        priority       INTEGER NOT NULL DEFAULT 0,   -- higher runs first
        attempts       INTEGER NOT NULL DEFAULT 0,   -- counted at claim time
        max_attempts   INTEGER NOT NULL,
        revisions      INTEGER NOT NULL DEFAULT 0,   -- review rejections so far
        max_revisions  INTEGER NOT NULL,
        review         INTEGER NOT NULL DEFAULT 0,   -- completion must pass review
        reviewer       TEXT,                         -- agent that reviews automatically
        reviews        INTEGER REFERENCES tasks(id), -- set on a review task: the task it judges
        run_at         INTEGER NOT NULL,             -- ms since epoch; pending until then
        timeout_ms     INTEGER,
        backoff_ms     INTEGER NOT NULL,
        parent_id      INTEGER REFERENCES tasks(id),
        next_tasks     TEXT,                         -- JSON list of specs, inserted on completion
        spawned        TEXT,                         -- JSON list the agent spawned, held while in review
        pending_deps   INTEGER NOT NULL DEFAULT 0,   -- dependencies not complete yet
        result         TEXT,                         -- JSON
        error_kind     TEXT,
        error_message  TEXT,
        feedback       TEXT,                         -- the last reviewer's note
        progress       TEXT,                         -- the agent's last heartbeat text
        idem_key       TEXT,
        claimed_by     TEXT,
        claim_token    INTEGER,                      -- fences every write about a claimed task
        heartbeat_at   INTEGER,                      -- last lease renewal, ms since epoch
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL,
        finished_at    INTEGER
    );
    -- Partial indexes hold only the rows in one state, so claiming, promoting
    -- and reaping stay O(log n) however many finished tasks the table keeps.
    CREATE INDEX tasks_claim   ON tasks(agent, priority DESC, id) WHERE state = 'ready';
    CREATE INDEX tasks_pending ON tasks(pending_deps, run_at)     WHERE state = 'pending';
    CREATE INDEX tasks_leases  ON tasks(heartbeat_at)             WHERE state = 'in_progress';
    CREATE INDEX tasks_parent  ON tasks(parent_id)                WHERE parent_id IS NOT NULL;
    CREATE UNIQUE INDEX tasks_key ON tasks(idem_key)              WHERE idem_key IS NOT NULL;

    CREATE TABLE task_deps (
        task_id    INTEGER NOT NULL REFERENCES tasks(id),
        depends_on INTEGER NOT NULL REFERENCES tasks(id),
        PRIMARY KEY (task_id, depends_on)
    ) WITHOUT ROWID;
    CREATE INDEX task_deps_by_dependency ON task_deps(depends_on);

    CREATE TABLE events (
        id         INTEGER PRIMARY KEY,
        at         INTEGER NOT NULL,
        task_id    INTEGER NOT NULL,
        event      TEXT    NOT NULL,
        from_state TEXT,
        to_state   TEXT    NOT NULL,
        actor      TEXT    NOT NULL,
        detail     TEXT    NOT NULL                  -- JSON object
    );
    CREATE INDEX events_by_task ON events(task_id);

    CREATE TABLE task_logs (
        id      INTEGER PRIMARY KEY,
        task_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        at      INTEGER NOT NULL,
        text    TEXT    NOT NULL
    );
    CREATE INDEX task_logs_by_task ON task_logs(task_id);
    "#;

// 2: model calls — budgets, chains (root_id), the replay journal — and
// durable agent state committed with completions.
const V2: &str = r#"
    ALTER TABLE tasks ADD COLUMN token_budget INTEGER;  -- tokens the task's chain may spend (set on a root)
    ALTER TABLE tasks ADD COLUMN root_id INTEGER;       -- the chain's root task; NULL on a root itself
    ALTER TABLE tasks ADD COLUMN replay_token INTEGER;  -- claim token of an interrupted run whose model calls the next run replays

    WITH RECURSIVE chain(id, root) AS (
        SELECT id, id FROM tasks WHERE parent_id IS NULL
        UNION ALL
        SELECT t.id, chain.root FROM tasks t JOIN chain ON t.parent_id = chain.id
    )
    UPDATE tasks SET root_id = (SELECT root FROM chain WHERE chain.id = tasks.id)
    WHERE parent_id IS NOT NULL;

    CREATE TABLE model_calls (
        id            INTEGER PRIMARY KEY,
        at            INTEGER NOT NULL,
        task_id       INTEGER NOT NULL,
        root_id       INTEGER NOT NULL,             -- the task's chain, for chain budgets
        agent         TEXT    NOT NULL,
        token         INTEGER NOT NULL,             -- the claim token of the run that called
        attempt       INTEGER NOT NULL,
        seq           INTEGER NOT NULL,             -- 1, 2, ... within the run
        alias         TEXT    NOT NULL,
        request_hash  TEXT    NOT NULL,
        request       TEXT    NOT NULL,             -- JSON: the prompt stays here, never in events
        reply         TEXT,                         -- JSON, when status = 'ok'
        status        TEXT    NOT NULL,             -- ok, or the model error kind
        error         TEXT,
        input_tokens  INTEGER NOT NULL,             -- charged: 0 when replayed or refused
        output_tokens INTEGER NOT NULL,
        cost_usd      REAL,
        ms            INTEGER NOT NULL,
        replayed      INTEGER NOT NULL
    );
    CREATE INDEX model_calls_by_run  ON model_calls(task_id, token, seq);
    CREATE INDEX model_calls_by_root ON model_calls(root_id);
    CREATE INDEX model_calls_by_time ON model_calls(at);

    -- Tokens set aside for model calls in flight, so that runs of one chain
    -- running at once cannot together spend past its budget. A reservation
    -- counts only while its run holds the task's lease.
    CREATE TABLE model_reservations (
        id      INTEGER PRIMARY KEY,
        task_id INTEGER NOT NULL,
        root_id INTEGER NOT NULL,
        token   INTEGER NOT NULL,                   -- the claim token of the run
        tokens  INTEGER NOT NULL
    );
    CREATE INDEX model_reservations_by_task ON model_reservations(task_id);
    CREATE INDEX model_reservations_by_root ON model_reservations(root_id);

    ALTER TABLE tasks ADD COLUMN held_state TEXT;       -- JSON list of state writes held while in review

    CREATE TABLE state (
        scope      TEXT    NOT NULL CHECK (scope IN ('agent', 'chain')),
        owner      TEXT    NOT NULL,                -- the agent's name, or the chain's root task id
        key        TEXT    NOT NULL,
        value      TEXT    NOT NULL,                -- JSON
        version    INTEGER NOT NULL,                -- 1 when first written, +1 per committed write
        updated_at INTEGER NOT NULL,
        task_id    INTEGER,                         -- the task whose completion wrote it (NULL: an operator)
        PRIMARY KEY (scope, owner, key)
    ) WITHOUT ROWID;

    -- The outbox: requests a run queued, stored with its completion and
    -- delivered at least once afterwards with a stable idempotency key.
    CREATE TABLE effects (
        id           INTEGER PRIMARY KEY,
        task_id      INTEGER NOT NULL REFERENCES tasks(id),
        seq          INTEGER NOT NULL,              -- 1, 2, ... within the run
        agent        TEXT    NOT NULL,
        method       TEXT    NOT NULL,
        url          TEXT    NOT NULL,
        headers      TEXT    NOT NULL,              -- JSON list of [name, value]
        body         BLOB,
        state        TEXT    NOT NULL CHECK (state IN ('proposed', 'pending', 'sending', 'sent', 'failed')),
        attempts     INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        next_at      INTEGER NOT NULL,              -- when a pending effect is due
        claim_token  INTEGER,                       -- fences the sender's result
        claimed_by   TEXT,
        lease_until  INTEGER,                       -- a sender that vanished is replaced after this
        status       INTEGER,                       -- the last HTTP status
        error        TEXT,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        UNIQUE (task_id, seq)
    );
    CREATE INDEX effects_due     ON effects(next_at)     WHERE state = 'pending';
    CREATE INDEX effects_sending ON effects(lease_until) WHERE state = 'sending';
    CREATE INDEX effects_state   ON effects(state, id);
    "#;

// 3: the state column accepts only the states of the transition table.
// (SQLite cannot add a CHECK to an existing table without copying it;
// the triggers refuse the same writes.) Dropped by migration 5.
const V3: &str = r#"
    CREATE TRIGGER tasks_state_insert BEFORE INSERT ON tasks
    WHEN NEW.state NOT IN ('pending', 'ready', 'in_progress', 'review', 'complete', 'failed', 'cancelled')
    BEGIN SELECT RAISE(ABORT, 'tasks.state must be one of the task states'); END;
    CREATE TRIGGER tasks_state_update BEFORE UPDATE OF state ON tasks
    WHEN NEW.state NOT IN ('pending', 'ready', 'in_progress', 'review', 'complete', 'failed', 'cancelled')
    BEGIN SELECT RAISE(ABORT, 'tasks.state must be one of the task states'); END;
    "#;

// 5: the triggers of migration 3 go. The transition table in `task.rs` is
// what every state write of colony asks; the triggers also refused a state
// written by hand, at ~20 µs per updated row (a BEFORE trigger makes every
// UPDATE of `state` a two-pass, statement-journaled write: two thirds of a
// claim's time). A CHECK constraint would still double the cost of each
// state write (SQLite plans an UPDATE of a CHECKed column in two passes
// through a temporary table; measured 9.0 vs 4.8 µs per row). A row whose
// state was edited to something unknown is reported as unreadable, naming
// it, and is neither claimed nor counted as runnable. PostgreSQL keeps its
// CHECK, which costs it nothing measurable.
const V5: &str = r#"
    DROP TRIGGER IF EXISTS tasks_state_insert;
    DROP TRIGGER IF EXISTS tasks_state_update;
    "#;

/// The schema version this build brings a database to.
pub fn newest_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// What a refusal of a file that is not a queue advises (`colony migrate`,
/// whose file is its --from, leaves it out).
pub const ANOTHER_DB: &str =
    "; give another --db (`colony submit` and `colony daemon` create a new file)";

/// Refuses a file that is not a colony queue before anything writes to
/// it (a migration, even the switch to WAL): not SQLite at all, a SQLite
/// database of something else (tables, or a schema version, but no
/// `tasks`), colony's tables without their schema version (a restore
/// through `sqlite3 .dump`, which leaves it out); and, for a command that
/// only reads or changes an existing queue (`must_exist`), a file that
/// holds no queue yet.
pub fn refuse_what_is_not_a_queue(
    conn: &Connection,
    path: &str,
    must_exist: bool,
) -> Result<(), QueueError> {
    let probe = conn.query_row(
        "SELECT (SELECT user_version FROM pragma_user_version),
                EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tasks'),
                (SELECT group_concat(name, ', ') FROM
                    (SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
                     ORDER BY name LIMIT 5))",
        [],
        |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        },
    );
    let not_a_queue = |why: String| QueueError::NotAQueue {
        path: path.to_string(),
        why,
    };
    const ANOTHER: &str = ANOTHER_DB;
    match probe {
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
            Err(not_a_queue(format!(
                "it is not a SQLite database (SQLite says: file is not a database){ANOTHER}"
            )))
        }
        Err(e) => Err(e.into()),
        Ok((0, true, _)) => Err(not_a_queue(
            "it has colony's tables but no schema version (PRAGMA user_version is 0, as after a \
             restore through `sqlite3 .dump`, which leaves it out); set the version of the \
             database it came from (`sqlite3 OLD.db 'PRAGMA user_version'`) with \
             `sqlite3 FILE 'PRAGMA user_version = N'`"
                .into(),
        )),
        Ok((version, false, tables)) if version > 0 || tables.is_some() => {
            Err(not_a_queue(format!(
                "it is a SQLite database of something else ({}schema version {version}, no colony tasks table){ANOTHER}",
                tables.map_or(String::new(), |t| format!("tables {t}; "))
            )))
        }
        Ok((_, false, _)) if must_exist => Err(QueueError::Missing(format!(
            "database {path}: it holds no queue yet, so no task was ever submitted there \
             (`colony submit` and `colony daemon` make it one)"
        ))),
        Ok(_) => Ok(()),
    }
}

/// Brings the database to the newest schema this build knows.
/// `note`: log an upgrade of an older schema.
pub fn migrate(conn: &mut Connection, path: &str, note: bool) -> Result<(), QueueError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = newest_version();
    if found > known {
        return Err(QueueError::SchemaTooNew {
            path: path.to_string(),
            found,
            known,
        });
    }
    let mut upgraded = false;
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        let now: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now as usize > version {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as u32 + 1)?;
        tx.commit()?;
        upgraded = true;
    }
    if upgraded && note {
        crate::queue::note_schema_upgrade(path, found, known);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database as a colony of schema version `version` left it.
    fn at_version(version: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for (v, sql) in MIGRATIONS[..version].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", v as u32 + 1)
                .unwrap();
        }
        conn
    }

    fn insert_task(conn: &Connection, state: &str) {
        conn.execute(
            "INSERT INTO tasks (agent, payload, state, max_attempts, max_revisions, run_at,
                                backoff_ms, created_at, updated_at)
             VALUES ('a', '{}', ?1, 3, 3, 0, 1000, 0, 0)",
            [state],
        )
        .unwrap();
    }

    fn triggers(conn: &Connection) -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'trigger'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn the_state_triggers_go_and_the_rows_stay() {
        let mut conn = at_version(4);
        insert_task(&conn, "ready");
        assert_eq!(triggers(&conn), 2);
        migrate(&mut conn, "test.db", false).unwrap();
        assert_eq!(triggers(&conn), 0);
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        let state: String = conn
            .query_row("SELECT state FROM tasks WHERE id = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(state, "ready");
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn every_migration_runs_from_an_empty_file_and_each_released_version() {
        for version in 0..MIGRATIONS.len() {
            let mut conn = at_version(version);
            if version >= 1 {
                insert_task(&conn, "pending");
            }
            migrate(&mut conn, "test.db", false).unwrap();
            let now: u32 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(now as usize, MIGRATIONS.len(), "from version {version}");
        }
    }

    /// Before migration 9 a reservation stopped counting when its run
    /// ended; from it on it counts until settled. Upgrading changes no
    /// budget: the reservations of ended runs go, a live run's stays.
    #[test]
    fn migration_9_drops_the_reservations_of_ended_runs_only() {
        let mut conn = at_version(8);
        insert_task(&conn, "in_progress");
        insert_task(&conn, "failed");
        conn.execute_batch(
            "UPDATE tasks SET claim_token = 7 WHERE id = 1;
             UPDATE tasks SET claim_token = 9 WHERE id = 2;
             INSERT INTO model_reservations (task_id, root_id, token, tokens) VALUES
                 (1, 1, 7, 100),  -- the live run's
                 (1, 1, 6, 200),  -- an earlier run of the same task
                 (2, 2, 9, 300);  -- the last run of a task that failed",
        )
        .unwrap();
        migrate(&mut conn, "test.db", false).unwrap();
        let left: Vec<(i64, i64)> = conn
            .prepare("SELECT token, tokens FROM model_reservations ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(left, vec![(7, 100)]);
    }

    /// What SQLite plans for `sql` on the newest schema, a line per step.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// Migration 6 took running tasks out of the state index: every read by
    /// state must still go through an index that holds only the tasks it
    /// looks for, never walk the history (a million rows) to find them.
    #[test]
    fn reads_by_state_never_walk_the_history() {
        use crate::queue::dashboard::{TaskQuery, page_filter};
        use crate::queue::reads::{BACKLOG_SQL, LEASES_BY_HOLDER_SQL, counts_sql};
        use crate::task::State;

        let mut conn = at_version(0);
        migrate(&mut conn, "test.db", false).unwrap();
        let mut statements = vec![counts_sql(), LEASES_BY_HOLDER_SQL.to_string()];
        statements.extend(BACKLOG_SQL.map(String::from));
        for state in State::ALL {
            for agent in [None, Some("a".to_string())] {
                let page = page_filter(&TaskQuery {
                    state: Some(state),
                    agent,
                    ..TaskQuery::default()
                });
                statements.extend([page.select(50), page.search(50, 3), page.window_end()]);
            }
        }
        // The overview's latest failures: through their own index, unsorted.
        let latest = plan(&conn, &crate::queue::dashboard::recent_failures_sql());
        assert_eq!(
            latest,
            vec!["SEARCH tasks USING INDEX tasks_failed_recently (state=?)"],
            "{latest:#?}"
        );
        for sql in &statements {
            let plan = plan(&conn, sql);
            for step in &plan {
                let walks = step == "SCAN tasks"
                    || step.starts_with("SCAN tasks USING INDEX tasks_by_agent")
                    // By id through the table, for a state it holds few of.
                    || (step.starts_with("SEARCH tasks USING INTEGER PRIMARY KEY (rowid<")
                        && sql.contains("state = '"));
                assert!(
                    !walks,
                    "this read walks the history:\n{sql}\nplan: {plan:#?}"
                );
            }
        }
    }
}
