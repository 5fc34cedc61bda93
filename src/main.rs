//! The `relay` binary: parses the command line, sets up logging and signals, runs the server.

use std::process::ExitCode;

use clap::{ArgMatches, Parser, Subcommand};
use relay::config::{Config, ConfigError, LogFormat, ServeArgs};
use relay::server::{ServerHandle, StartError};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// relay: an ultra-low-latency real-time edge relay (WebSocket and SSE fan-out with
/// resumable per-channel sequences).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay. Every option can also be set as RELAY_<OPTION> in the environment or in
    /// the --config TOML file; precedence is flag > environment > file > default.
    Serve(ServeArgs),
}

fn main() -> ExitCode {
    let (args, matches) = parse_cli();
    let config = match load_config(args, &matches) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    let handle = match relay::server::start(config.clone()) {
        Ok(h) => h,
        // A key or certificate file that cannot be used is a configuration mistake.
        Err(StartError::Config(e)) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match serve(&config, handle) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line; `relay --help` also lists every `serve` option. Returns the
/// `serve` options and their matches (which say where each value came from).
fn parse_cli() -> (ServeArgs, ArgMatches) {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    let serve_help = cmd
        .find_subcommand_mut("serve")
        .map(|c| c.render_help().to_string())
        .unwrap_or_default();
    let cmd = cmd.after_help(format!("`relay serve` options:\n\n{serve_help}"));
    let matches = cmd.get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Cmd::Serve(args) = cli.command;
    // `serve` is the only subcommand, and clap requires one.
    let serve = matches
        .subcommand_matches("serve")
        .cloned()
        .unwrap_or_default();
    (args, serve)
}

/// The settings: flags and environment over the `--config` file over the defaults.
fn load_config(args: ServeArgs, matches: &ArgMatches) -> Result<Config, ConfigError> {
    let text = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let file = args.config.as_deref().zip(text.as_deref());
    Config::load(args.settings, matches, file)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the started server until SIGTERM or SIGINT, then shuts it down.
fn serve(config: &Config, handle: ServerHandle) -> anyhow::Result<()> {
    let shards = config.effective_shards();
    tracing::info!(addr = %handle.local_addr(), shards, "relay started");
    // The one stdout line: scripts and tests read the bound address from it.
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // With TLS, SIGHUP reloads the certificate; installed before the listening line so
        // that a reload right after start cannot kill the process.
        let mut hup = match config.tls_cert {
            Some(_) => Some(signal(SignalKind::hangup())?),
            None => None,
        };
        println!("listening on {scheme}://{}", handle.local_addr());
        let drain = loop {
            tokio::select! {
                _ = term.recv() => break true,
                _ = int.recv() => break false,
                Some(()) = async { hup.as_mut()?.recv().await } => match handle.reload_tls() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate"),
                },
            }
        };
        if drain && !config.drain_period.is_zero() {
            // Load balancers see /readyz fail and stop sending new clients here; the clients
            // already here are told to go only then, so that they reconnect elsewhere.
            tracing::info!(period = ?config.drain_period, "SIGTERM: draining (/readyz 503)");
            handle.drain();
            tokio::select! {
                _ = tokio::time::sleep(config.drain_period) => {}
                _ = term.recv() => tracing::info!("SIGTERM again: drain cut short"),
                _ = int.recv() => tracing::info!("SIGINT: drain cut short"),
            }
        }
        tracing::info!("shutting down: closing listeners, WebSockets (1012) and SSE streams");
        anyhow::Ok(())
    })?;
    handle.shutdown();
    handle.join();
    tracing::info!("stopped");
    Ok(())
}
