//! The `colony` binary: parse arguments, set up logging, run, map errors to
//! exit statuses (2 for bad input, 1 for anything else, 0 when the reader
//! of stdout went away).

fn main() {
    let cli = colony::cli::parse_args();
    let default_level = cli.command.default_log_level();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COLONY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    if let Err(err) = runtime.block_on(colony::cli::run(cli)) {
        if colony::cli::is_closed_stdout(&err) {
            std::process::exit(0);
        }
        eprintln!("error: {err:#}");
        std::process::exit(colony::cli::exit_code(&err));
    }
}
