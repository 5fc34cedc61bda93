//! The `relay` binary: parses the command line, sets up logging and signals, runs the server.

use std::process::ExitCode;

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use relay::auth::Rule;
use relay::config::{parse_duration, Config, ConfigError, LogFormat, ServeArgs};
use relay::server::{ServerHandle, StartError};
use relay::tools;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// relay: an ultra-low-latency real-time edge relay (WebSocket and SSE fan-out with
/// resumable per-channel sequences).
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = QUICK_START)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

const QUICK_START: &str = "Quick start:
  relay serve --demo                  then open http://127.0.0.1:8080/ in two browser tabs
  relay genconfig > relay.toml        every option, commented, with a fresh API key and JWT secret
  relay check-config relay.toml       check it as `relay serve` would (secrets masked)
  relay serve --config relay.toml
  relay gentoken --config relay.toml --sub alice --channel 'room:*'

Every option of the relay: relay serve --help";

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay. Every option can also be set as RELAY_<OPTION> in the environment or in
    /// the --config TOML file; precedence is flag > environment > file > default.
    Serve(ServeArgs),
    /// Check a configuration as `relay serve` reads it (flags, RELAY_* environment, the file,
    /// the key and certificate files it names), print the effective settings with secrets
    /// masked, and exit with 2 listing every problem.
    CheckConfig(CheckArgs),
    /// Print a config file with every option commented and a fresh API key and JWT secret:
    /// `relay genconfig > relay.toml`.
    Genconfig,
    /// Mint a JWT the relay accepts (for tests and scripts): signed with the relay's HS256
    /// secret (read like `relay serve` reads it) or with --jwt-private-key.
    Gentoken(GentokenArgs),
}

/// Options of `relay check-config`.
#[derive(Args)]
struct CheckArgs {
    /// The TOML config file (the same as --config FILE).
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Settings (as for relay serve)")]
    serve: ServeArgs,
}

/// Options of `relay gentoken`.
#[derive(Args)]
struct GentokenArgs {
    /// The user id (`sub` claim; also the presence user).
    #[arg(long, value_name = "USER")]
    sub: String,
    /// A channel pattern the token may do everything on (subscribe, publish, presence,
    /// history); `*` matches any run of characters, e.g. `room:*`. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    channel: Vec<String>,
    /// A narrower grant, PERMS=PATTERN as for --allow (PERMS: subscribe, publish, presence,
    /// history, all, joined by `+`), e.g. `subscribe+history=news:*`. Repeatable.
    #[arg(long, value_name = "PERMS=PATTERN", value_parser = Rule::parse)]
    grant: Vec<Rule>,
    /// How long the token is valid, e.g. 15m, 1h, 7d.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1h")]
    ttl: Duration,
    /// Presence info (`info` claim): a JSON object, e.g. '{"name":"Alice"}'.
    #[arg(long, value_name = "JSON")]
    info: Option<String>,
    /// Sign with this PEM private key instead of the HS256 secret (RSA: RS256, EC P-256:
    /// ES256, P-384: ES384, Ed25519: EdDSA); the relay verifies with the public key
    /// (--jwt-public-key).
    #[arg(long, env = "RELAY_JWT_PRIVATE_KEY", value_name = "FILE")]
    jwt_private_key: Option<PathBuf>,
    /// Signing algorithm, when not the key's natural one (HS384, HS512, RS384, PS256, …).
    #[arg(long, value_name = "ALG", value_parser = tools::parse_algorithm)]
    alg: Option<jsonwebtoken::Algorithm>,
    #[command(
        flatten,
        next_help_heading = "Settings (read as relay serve reads them: the secret, audience and issuer)"
    )]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    // First, so that no arena page is faulted in as a huge page (see `no_huge_pages`).
    let huge_pages_off = no_huge_pages().err();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The subcommand's own matches: they say where each setting came from (flag, env).
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    match cli.command {
        Cmd::Serve(args) => run_serve(args, &sub, huge_pages_off),
        Cmd::CheckConfig(args) => check_config(args, &sub),
        Cmd::Genconfig => genconfig(),
        Cmd::Gentoken(args) => gentoken(args, &sub),
    }
}

/// A configuration mistake: `relay: …` on stderr and exit status 2.
fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay: {e}");
    ExitCode::from(2)
}

fn run_serve(
    args: ServeArgs,
    matches: &ArgMatches,
    huge_pages_off: Option<std::io::Error>,
) -> ExitCode {
    let config = match load_config(args, matches) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    init_tracing(config.log_format);
    if let Some(e) = huge_pages_off {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for this process");
    }
    let handle = match relay::server::start(config.clone()) {
        Ok(h) => h,
        // A key or certificate file that cannot be used is a configuration mistake.
        Err(StartError::Config(e)) => return config_error(&e),
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

/// Turns transparent huge pages off for this process, before the shards allocate. mimalloc
/// asks for huge pages on its arenas (`MADV_HUGEPAGE`), so where THP is `always` or `madvise`
/// every arena page the relay touches is a 2 MiB zero-filled fault: pages a churning history or
/// outbox frees and the allocator hands back are faulted in again 2 MiB at a time. Measured on
/// 10,000 subscribers over 1,000 channels at 8,000 publishes/s: p99 45 ms with huge pages, 7 ms
/// without, 7 % less CPU per delivery, and less RSS with the same subscribers idle
/// (benches/RESULTS.md, session 7). Linux only; a failure (an old kernel) is only logged.
#[allow(unsafe_code)]
fn no_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `--config` file's path and text, if one is given.
fn read_config_file(path: Option<&PathBuf>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    std::fs::read_to_string(path)
        .map(|text| Some((path.clone(), text)))
        .map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })
}

/// The settings: flags and environment over the `--config` file over the defaults.
fn load_config(args: ServeArgs, matches: &ArgMatches) -> Result<Config, ConfigError> {
    let file = read_config_file(args.config.as_ref())?;
    let file = file.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
    Config::load(args.settings, matches, file)
}

fn check_config(args: CheckArgs, matches: &ArgMatches) -> ExitCode {
    let path = match (&args.file, &args.serve.config) {
        (Some(a), Some(b)) if a != b => {
            return config_error(&format_args!(
                "two config files: {} and --config {} (RELAY_CONFIG?)",
                a.display(),
                b.display()
            ))
        }
        (a, b) => a.as_ref().or(b.as_ref()),
    };
    let file = match read_config_file(path) {
        Ok(f) => f,
        Err(e) => return config_error(&e),
    };
    let file = file.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
    let (config, mut problems) = Config::load_all(args.serve.settings, matches, file);
    if let Err(more) = relay::server::prepare(&config) {
        problems.extend(more);
    }
    if problems.is_empty() {
        print!("{}", tools::effective_toml(&config));
        eprintln!(
            "relay: the configuration is good{}",
            path.map_or(String::new(), |p| format!(" ({})", p.display()))
        );
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("relay: {p}");
    }
    eprintln!(
        "relay: {} problem{} found",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    ExitCode::from(2)
}

fn genconfig() -> ExitCode {
    let mut failed = None;
    let text = tools::genconfig(|| match random_hex(32) {
        Ok(h) => h,
        Err(e) => {
            failed = Some(e);
            String::new()
        }
    });
    if let Some(e) = failed {
        eprintln!("relay: cannot read random bytes from /dev/urandom: {e}");
        return ExitCode::FAILURE;
    }
    print!("{text}");
    ExitCode::SUCCESS
}

/// `n` random bytes from the operating system, as hex.
fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn gentoken(args: GentokenArgs, matches: &ArgMatches) -> ExitCode {
    let file = match read_config_file(args.serve.config.as_ref()) {
        Ok(f) => f,
        Err(e) => return config_error(&e),
    };
    let file = file.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
    let (config, mut problems) = Config::load_all(args.serve.settings, matches, file);
    if args.jwt_private_key.is_some() {
        // The relay holds the public key, not this command: an audience or issuer without a
        // configured key is fine here.
        problems.retain(|p| !matches!(p, ConfigError::Invalid { key: "jwt", .. }));
    }
    if let Some(e) = problems.first() {
        return config_error(e);
    }
    let mut grants = Vec::new();
    for pattern in &args.channel {
        match Rule::parse(&format!("all={pattern}")) {
            Ok(r) => grants.push(r),
            Err(e) => return config_error(&format_args!("--channel {pattern:?}: {e}")),
        }
    }
    grants.extend(args.grant);
    if grants.is_empty() {
        eprintln!(
            "relay: note: the token grants no channel (only what the relay's --allow rules \
             give); add --channel PATTERN or --grant PERMS=PATTERN"
        );
    }
    let info = match args.info.as_deref().map(serde_json::from_str) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return config_error(&format_args!("--info is not JSON: {e}")),
    };
    let spec = tools::TokenSpec {
        sub: args.sub,
        grants,
        ttl: args.ttl,
        info,
        audience: config.jwt_audience.clone(),
        issuer: config.jwt_issuer.clone(),
    };
    let pem;
    let key = match (&args.jwt_private_key, &config.jwt_secret) {
        (Some(path), _) => {
            pem = match std::fs::read(path) {
                Ok(p) => p,
                Err(source) => {
                    return config_error(&tools::MintError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            };
            tools::SigningKey::Pem { path, pem: &pem }
        }
        (None, Some(secret)) => tools::SigningKey::Secret(secret),
        (None, None) => return config_error(&tools::MintError::NoKey),
    };
    let now = relay::auth::unix_now();
    let token = tools::claims(&spec, now).and_then(|c| tools::sign(&c, &key, args.alg));
    match token {
        Ok(t) => {
            println!("{t}");
            let until = std::time::UNIX_EPOCH + Duration::from_secs(now + spec.ttl.as_secs());
            eprintln!(
                "relay: token for {:?}, valid until {} ({})",
                spec.sub,
                humantime::format_rfc3339_seconds(until),
                humantime::format_duration(spec.ttl)
            );
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
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
        if config.demo {
            println!(
                "demo: open {scheme}://{}/ in two browser tabs",
                browsable(handle.local_addr())
            );
        }
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

/// An address a browser on this machine can open: the loopback address for a node that
/// listens on every interface.
fn browsable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        ip if !ip.is_unspecified() => addr,
        std::net::IpAddr::V4(_) => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        std::net::IpAddr::V6(_) => (Ipv6Addr::LOCALHOST, addr.port()).into(),
    }
}
