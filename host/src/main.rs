//! The `colony` binary: parse arguments, set up logging, run, map errors to
//! exit statuses (2 for bad input, 1 for anything else, 0 when the reader
//! of stdout went away).

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

fn main() {
    // RUST_BACKTRACE=1 (set on many machines) makes every library error
    // capture the host's stack, and wasmtime's errors reach guests as text
    // (a WASI stream error's debug string): kilobytes of host frames handed
    // to an agent, and paid for on every error. Panics keep their
    // backtraces; library errors capture none unless RUST_LIB_BACKTRACE
    // asks for them.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first thing the process does, before any thread.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    // A file-size limit (`ulimit -f`, systemd's LimitFSIZE) kills a
    // process by SIGXFSZ when a write passes it, silently and holding its
    // leases; ignored, the write fails with EFBIG, which SQLite reports as
    // an I/O error: a command says so, and a daemon retries and logs it.
    // SAFETY: before any thread; SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = colony::cli::parse_args();
    let default_level = cli.command.default_log_level();
    let (filter, bad_filter) = match std::env::var("COLONY_LOG") {
        Err(_) => (EnvFilter::new(default_level), None),
        Ok(spec) => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default_level), Some((spec, e))),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        // A failed log write would otherwise be reported with `eprintln!`,
        // which panics when stderr is a closed pipe: a daemon must outlive
        // the reader of its logs.
        .log_internal_errors(false)
        .init();
    if let Some((spec, e)) = bad_filter {
        tracing::warn!("COLONY_LOG={spec:?} is not a log filter ({e}); logging at {default_level}");
    } else if let Ok(spec) = std::env::var("COLONY_LOG")
        && colony::cli::log_filter_silences_colony(&spec)
    {
        // Not through tracing: the filter turns colony's own messages off.
        let _ = writeln!(
            std::io::stderr(),
            "warning: COLONY_LOG={spec:?} sets no level for colony itself (no bare level such as `info` and no `colony=` directive), so its log lines (a daemon's errors among them) are off; e.g. COLONY_LOG=\"{default_level},{spec}\""
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let json = cli.json;
    if let Err(err) = runtime.block_on(colony::cli::run(cli)) {
        if colony::cli::is_closed_stdout(&err) {
            std::process::exit(0);
        }
        let _ = match json {
            true => writeln!(std::io::stderr(), "{}", colony::cli::error_json(&err)),
            false => writeln!(std::io::stderr(), "error: {err:#}"),
        };
        std::process::exit(colony::cli::exit_code(&err));
    }
}
