//! A throwaway PostgreSQL cluster for the tests of the PostgreSQL driver.
//!
//! The first call to [`fresh_database`] in a test process creates a cluster
//! in a temporary directory (`initdb`) and starts a server on a free
//! loopback port, tuned for speed over durability (no fsync). Every call
//! then creates a new, empty database in it, so tests never see each
//! other's rows. Nothing is left behind: a watchdog process waits for the
//! test process to exit, then stops the server and removes the directory
//! (a test binary runs no destructors for statics, and may be killed).
//!
//! PostgreSQL refuses to run as root; as root the server runs as the
//! `postgres` system user (which Debian's `postgresql` package creates), or
//! as `nobody` without it. Without PostgreSQL's server binaries the tests
//! that need them skip, saying so once.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The one role of the throwaway cluster that must give a password
/// ([`PASSWORD`]); see [`password_role`].
pub const PASSWORD_ROLE: &str = "colony_password";
/// Its password.
pub const PASSWORD: &str = "s3cret-pw";

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

const SKIP_NOTE: &str = "skipped: the PostgreSQL half needs PostgreSQL's server binaries \
     (Debian package `postgresql`: apt-get install postgresql)";

/// The running cluster of this test process.
struct Cluster {
    port: u16,
}

/// A URL to a fresh, empty database in this test process's throwaway
/// cluster, or `None` when PostgreSQL's server binaries are not installed
/// (then the tests that need it skip; the reason is printed once).
///
/// # Panics
/// When the binaries are there but the cluster cannot be started or the
/// database created: a broken setup fails loudly instead of skipping.
pub fn fresh_database() -> Option<String> {
    static CLUSTER: OnceLock<Option<Result<Cluster, String>>> = OnceLock::new();
    static COUNTER: AtomicU32 = AtomicU32::new(0);

    let cluster = CLUSTER.get_or_init(|| {
        let Some(bin) = server_bindir() else {
            // Straight to the file descriptor: the test harness captures
            // `eprintln!`, and this should be seen.
            let _ = writeln!(std::io::stderr(), "{SKIP_NOTE}");
            return None;
        };
        Some(start_cluster(&bin))
    });
    let cluster = match cluster.as_ref()? {
        Ok(cluster) => cluster,
        Err(why) => panic!("the throwaway PostgreSQL cluster did not start: {why}"),
    };
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let port = cluster.port;
    let created: Result<String, String> = off_runtime(move || {
        let mut admin = connect_admin(port, Duration::from_secs(10))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
            .map_err(|e| format!("creating the database {name}: {}", describe(&e)))?;
        Ok(name)
    });
    match created {
        Ok(name) => Some(format!("postgres://postgres@127.0.0.1:{port}/{name}")),
        Err(why) => panic!("{why}"),
    }
}

/// A fresh database as [`fresh_database`], owned by [`PASSWORD_ROLE`]; its
/// URL names that role and no password (which the server asks for).
pub fn fresh_database_behind_a_password() -> Option<String> {
    let url = fresh_database()?;
    let (port, name) = url
        .strip_prefix("postgres://postgres@127.0.0.1:")
        .and_then(|rest| rest.split_once('/'))
        .expect("a URL of fresh_database");
    let (port, name): (u16, String) = (port.parse().expect("a port"), name.to_string());
    let owned: Result<(), String> = off_runtime(move || {
        let mut admin = connect_admin(port, Duration::from_secs(10))?;
        let role = format!(
            "DO $$ BEGIN CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}';
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        );
        admin
            .batch_execute(&format!(
                "{role} ALTER DATABASE {name} OWNER TO {PASSWORD_ROLE};"
            ))
            .map_err(|e| format!("giving {name} to {PASSWORD_ROLE}: {}", describe(&e)))
    });
    owned.unwrap_or_else(|why| panic!("{why}"));
    Some(url.replacen(
        "postgres://postgres@",
        &format!("postgres://{PASSWORD_ROLE}@"),
        1,
    ))
}

/// True when PostgreSQL's server binaries are installed (the tests that
/// need a cluster will run rather than skip).
pub fn postgres_available() -> bool {
    server_bindir().is_some()
}

/// The directory holding `initdb` and `postgres`: `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin` (Debian's layout, where
/// neither is on `PATH`), else wherever `initdb` is on `PATH`.
fn server_bindir() -> Option<PathBuf> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let has_server =
                |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
            let from_pg_config = Command::new("pg_config")
                .arg("--bindir")
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
            if let Some(dir) = from_pg_config.filter(|d| has_server(d)) {
                return Some(dir);
            }
            let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|entry| {
                    let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((version, entry.path().join("bin")))
                })
                .filter(|(_, dir)| has_server(dir))
                .collect();
            debian.sort();
            if let Some((_, dir)) = debian.pop() {
                return Some(dir);
            }
            std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_server(dir))
        })
        .clone()
}

/// Creates and starts the cluster, and the watchdog that removes it.
fn start_cluster(bin: &Path) -> Result<Cluster, String> {
    let user = server_user()?;
    // As another user the server must reach the directory: /tmp is open to
    // all, where TMPDIR may not be.
    let parent = if user.is_some() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("colony-pg-")
        .tempdir_in(&parent)
        .map_err(|e| format!("creating a directory in {}: {e}", parent.display()))?
        .keep();
    // From here on the watchdog removes the directory whatever happens.
    spawn_watchdog(&dir)?;
    if let Some(user) = &user {
        run(Command::new("chown").arg(format!("{user}:")).arg(&dir))?;
    }
    let data = dir.join("data");
    run(as_user(&user, bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .args(["-E", "UTF8", "--locale=C"]))?;
    // One role must give a password, for the tests of how a URL without one
    // fails and PGPASSWORD supplies it; every other connection is trusted.
    let hba = data.join("pg_hba.conf");
    let trusted =
        std::fs::read_to_string(&hba).map_err(|e| format!("reading {}: {e}", hba.display()))?;
    std::fs::write(
        &hba,
        format!("host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{trusted}"),
    )
    .map_err(|e| format!("writing {}: {e}", hba.display()))?;

    // A free port can be taken by someone else before the server binds it:
    // then try another.
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let log_path = dir.join(format!("postgres-{port}.log"));
        let log =
            File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut server = as_user(&user, bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for the tests leaves the
            // stopping to the watchdog.
            .process_group(0);
        let mut child = server
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.join("postgres").display()))?;
        match wait_until_ready(&mut child, port) {
            Ok(()) => {
                // Reap the child (runuser, or the server itself) when it
                // exits, so it does not linger as a zombie meanwhile.
                std::thread::spawn(move || child.wait());
                return Ok(Cluster { port });
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                last_error = format!("{why}\n--- server log ({}) ---\n{log}", log_path.display());
                if !log.contains("could not bind") && !log.contains("already in use") {
                    break;
                }
            }
        }
    }
    Err(last_error)
}

/// Waits until the server accepts connections, or fails early when it exits.
fn wait_until_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited at start ({status})"));
        }
        let attempt = off_runtime(move || connect_admin(port, Duration::from_secs(2)).map(drop));
        match attempt {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= deadline => {
                return Err(format!(
                    "the server did not accept connections within {}s: {why}",
                    START_TIMEOUT.as_secs()
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn connect_admin(port: u16, timeout: Duration) -> Result<postgres::Client, String> {
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(timeout);
    config
        .connect(postgres::NoTls)
        .map_err(|e| format!("connecting to 127.0.0.1:{port}: {}", describe(&e)))
}

/// Runs `f` on a thread of its own: the synchronous `postgres` client runs a
/// runtime of its own, which cannot start inside a test's tokio runtime.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `postgres::Error` with what the server said.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Who the server runs as: `None` for this process's own user, or the
/// system user to switch to when this process is root.
fn server_user() -> Result<Option<String>, String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("running `id -u`: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(None);
    }
    for user in ["postgres", "nobody"] {
        let exists = Command::new("id")
            .arg("-u")
            .arg(user)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if exists {
            return Ok(Some(user.to_string()));
        }
    }
    Err(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run the server as"
            .into(),
    )
}

/// `program`, run as `user` (through `runuser`) when one is given.
fn as_user(user: &Option<String>, program: PathBuf) -> Command {
    match user {
        None => Command::new(program),
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
    }
}

/// Runs a setup command to completion, its output in the error on failure.
fn run(command: &mut Command) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free loopback port: {e}"))
}

/// A detached shell that waits for this process to exit, then stops the
/// server (fast shutdown, then SIGKILL after 10 s) and removes `dir`.
fn spawn_watchdog(dir: &Path) -> Result<(), String> {
    const SCRIPT: &str = r#"
        test_pid=$1; dir=$2
        while kill -0 "$test_pid" 2>/dev/null; do sleep 1; done
        pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null)
        if [ -n "$pid" ]; then
            kill -INT "$pid" 2>/dev/null
            i=0
            while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
            kill -KILL "$pid" 2>/dev/null
        fi
        rm -rf "$dir"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("colony-pg-watchdog")
        .arg(std::process::id().to_string())
        .arg(dir)
        // Nothing inherited: a pipe held open would keep whoever reads the
        // tests' output waiting for the watchdog.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|e| format!("starting the cluster's watchdog: {e}"))
}
