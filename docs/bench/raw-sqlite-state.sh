#!/usr/bin/env bash
# What state costs a hand-written SQLite loop: ../shared/bench/raw-sqlite's
# `batch` mode (claim 64 per transaction, complete them in one) against the
# same loop whose completions also do what one state `get` + `set` needs at
# the least: read a key's version and insert the entry and one audit row.
# Alternates the two PAIRS times (the machine drifts) and prints each ratio
# and their median. Reference for `colony bench --capabilities`'s
# `state_get_set_ratio` (README, "And what a run with state costs").
#
#   docs/bench/raw-sqlite-state.sh            # PAIRS=5 N=20000 THREADS=8
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
raw=${RAW_SQLITE:-$here/../../../shared/bench/raw-sqlite}
PAIRS=${PAIRS:-5}; N=${N:-20000}; THREADS=${THREADS:-8}
work=${WORK:-/tmp/raw-sqlite-state}
rm -rf "$work/src" && mkdir -p "$work/data" && cp -r "$raw/Cargo.toml" "$raw/Cargo.lock" "$raw/src" "$work/"
patch -s -d "$work" -p1 <<'PATCH'
--- a/src/main.rs
+++ b/src/main.rs
@@ -46,7 +46,7 @@
     let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
     let batch: i64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
     let db = args.get(5).cloned().unwrap_or_else(|| "data/queue.db".to_string());
-    assert!(mode == "single" || mode == "batch", "mode must be single|batch");
+    assert!(mode == "batch" || mode == "batchstate", "mode must be batch|batchstate");
 
     for suffix in ["", "-wal", "-shm"] {
         let _ = std::fs::remove_file(format!("{db}{suffix}"));
@@ -62,7 +62,10 @@
     c.execute_batch(
         "CREATE TABLE tasks(id INTEGER PRIMARY KEY, state TEXT NOT NULL, payload TEXT,
                             claimed_by TEXT, attempts INT NOT NULL DEFAULT 0, updated_at INT);
-         CREATE INDEX tasks_state_id ON tasks(state, id);",
+         CREATE INDEX tasks_state_id ON tasks(state, id);
+         CREATE TABLE state(scope TEXT NOT NULL, owner TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
+                            version INTEGER NOT NULL, PRIMARY KEY(scope, owner, key)) WITHOUT ROWID;
+         CREATE TABLE events(id INTEGER PRIMARY KEY, task_id INT, detail TEXT);",
     )
     .unwrap();
 
@@ -99,7 +102,8 @@
         let mode = mode.clone();
         handles.push(std::thread::spawn(move || {
             let me = format!("worker-{w}");
-            let limit = if mode == "single" { 1 } else { batch };
+            let limit = batch;
+            let with_state = mode == "batchstate";
             let mut done = 0u64;
             barrier.wait();
             loop {
@@ -132,6 +135,18 @@
                         )?;
                         let ts = now_ms();
                         for id in &ids {
+                            if with_state {
+                                let key = format!("k{id}");
+                                let version: Option<i64> = {
+                                    let mut get = tx.prepare_cached("SELECT version FROM state WHERE scope = 'agent' AND owner = 'a' AND key = ?1")?;
+                                    let mut rows = get.query(params![key])?;
+                                    match rows.next()? { Some(r) => Some(r.get(0)?), None => None }
+                                };
+                                let mut set = tx.prepare_cached("INSERT INTO state (scope, owner, key, value, version) VALUES ('agent', 'a', ?1, '1', ?2)")?;
+                                set.execute(params![key, version.unwrap_or(0) + 1])?;
+                                let mut event = tx.prepare_cached("INSERT INTO events (task_id, detail) VALUES (?1, ?2)")?;
+                                event.execute(params![id, format!("{{\"key\":\"{key}\"}}")])?;
+                            }
                             let changed = st.execute(params![id, me, ts])?;
                             assert_eq!(changed, 1);
                         }
PATCH
CARGO_TARGET_DIR=$work/target cargo build --release --quiet --manifest-path "$work/Cargo.toml"
bin=$work/target/release/raw-sqlite-bench
rate() { "$bin" "$1" "$N" "$THREADS" 64 "$work/data/queue.db" | grep -o 'jobs_per_s=[0-9.]*' | cut -d= -f2; }
ratios=()
for _ in $(seq 1 "$PAIRS"); do
    plain=$(rate batch); with=$(rate batchstate)
    ratio=$(python3 -c "print(f'{$with / $plain:.2f}')")
    echo "batch $plain  batch+state $with  ratio $ratio"
    ratios+=("$ratio")
done
python3 -c "import statistics, sys; print('median ratio', statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
