//! The `kvroute` binary: parses arguments, installs logging, and runs one subcommand.
//! Everything it runs lives in the crates; the modules here only wire them together.

mod admin;
mod bench;
mod config;
mod serve;
mod shutdown;
mod sim;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Prefix-cache-aware router for LLM inference: an Envoy ext_proc endpoint picker.
/// Repeated flags: the last one wins, as upstream's pflag parses them (its chart relies on
/// a later `--ha-enable-leader-election=false` overriding an earlier flag).
#[derive(Debug, Parser)]
#[command(name = "kvroute", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` is used when unset.
    #[arg(long, global = true, env = "KVROUTE_LOG")]
    log: Option<String>,
    /// Log lines as text, or as one JSON object each (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KVROUTE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Upstream's log format flag: `json` is `--log-format json`, `console` is text.
    #[arg(long, global = true, value_enum, conflicts_with = "log_format")]
    zap_encoder: Option<ZapEncoder>,
    /// Upstream's verbosity (`-v 2` is the default): up to 2 logs info, 3 and 4 debug, 5 and
    /// more trace. `--log` and `RUST_LOG` win over it.
    #[arg(short = 'v', long = "v", global = true, value_name = "LEVEL")]
    verbosity: Option<u8>,
    /// Upstream's zap level: `debug`, `info`, `error`, or a verbosity number; wins over -v.
    #[arg(long, global = true, value_name = "LEVEL")]
    zap_log_level: Option<String>,
    /// Threads running the async request path (default: one per core the process may use).
    /// Fewer threads wake each other less: one costs a quarter less CPU per request than
    /// two where other processes share the cores (docs/operations.md).
    #[arg(long, global = true, env = "KVROUTE_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ZapEncoder {
    Json,
    Console,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Envoy's ext_proc API and pick an endpoint for each request.
    Serve(Box<serve::ServeArgs>),
    /// Run one simulated vLLM pod (OpenAI API, /metrics, KV events on ZMQ).
    Sim(sim::SimArgs),
    /// Compare routing policies on a simulated cluster, in virtual time.
    Bench(bench::BenchArgs),
    /// Every routing policy side by side on the shipped trace and a chat workload.
    Demo(bench::DemoArgs),
    /// Check a routing configuration, or print kvroute's default one.
    Config(config::ConfigCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(with_default_command(std::env::args_os().collect()));
    let filter = match (&cli.log, upstream_level(&cli)?) {
        (Some(f), _) => EnvFilter::try_new(f)?,
        (None, _) if std::env::var_os("RUST_LOG").is_some() => EnvFilter::try_from_default_env()?,
        (None, Some(level)) => EnvFilter::new(level),
        (None, None) => EnvFilter::new("info"),
    };
    let log_format = match cli.zap_encoder {
        Some(ZapEncoder::Json) => LogFormat::Json,
        Some(ZapEncoder::Console) => LogFormat::Text,
        None => cli.log_format,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        runtime.worker_threads(n.get());
    }
    let runtime = runtime.enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(*args)),
        Command::Sim(args) => runtime.block_on(sim::run(args)),
        Command::Bench(args) => bench::run_bench(&args),
        Command::Demo(args) => bench::run_demo(&args),
        Command::Config(cmd) => config::run(&cmd),
    }
}

/// The tracing level upstream's `--zap-log-level` or `-v` asks for, if either was given
/// (upstream's levels: 2 default, 3 verbose, 4 debug, 5 trace).
fn upstream_level(cli: &Cli) -> anyhow::Result<Option<&'static str>> {
    let verbosity = match cli.zap_log_level.as_deref() {
        Some("error") => return Ok(Some("error")),
        Some("info") => return Ok(Some("info")),
        Some("debug") => return Ok(Some("debug")),
        Some(n) => Some(n.parse::<u8>().map_err(|_| {
            anyhow::anyhow!("--zap-log-level {n:?}: give debug, info, error or a number")
        })?),
        None => cli.verbosity,
    };
    Ok(verbosity.map(|v| match v {
        0..=2 => "info",
        3 | 4 => "debug",
        _ => "trace",
    }))
}

/// The subcommands; a command line that names none runs `serve`.
const COMMANDS: [&str; 6] = ["serve", "sim", "bench", "demo", "config", "help"];

/// Upstream's charts run their image with the picker's flags alone (`--pool-name P …`,
/// no subcommand): that is `kvroute serve`. A line that names a subcommand, or asks only
/// for help or the version, is left as it is.
fn with_default_command(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let names_command = args
        .iter()
        .skip(1)
        .any(|a| a.to_str().is_some_and(|a| COMMANDS.contains(&a)));
    let only_asks = args.len() == 2
        && args[1]
            .to_str()
            .is_some_and(|a| ["-h", "--help", "-V", "--version"].contains(&a));
    if !names_command && !only_asks && args.len() > 1 {
        args.insert(1, "serve".into());
    }
    args
}
