//! `kvroute config`: check a routing configuration, print the defaults; and the watch that
//! reloads `--config-file` while serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kvroute_extproc::Admission;
use kvroute_index::{PrefixIndex, Shared};
use kvroute_scheduler::config::{DEFAULT_APPROX, DEFAULT_PD, DEFAULT_PRECISE};
use kvroute_scheduler::{BuildContext, SchedulerHandle};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::serve::build_config;

/// How often `--config-file` is looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub(crate) struct ConfigCommand {
    #[command(subcommand)]
    command: ConfigAction,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Parse and build an `EndpointPickerConfig`; exit 1 with the error (plugin type and
    /// line) when it cannot run.
    Check {
        /// The YAML file.
        file: PathBuf,
        /// The pods' KV-cache block size, as `kvroute serve --block-size` would get it.
        #[arg(long, default_value_t = 16)]
        block_size: usize,
    },
    /// Print kvroute's default configuration (the file `kvroute serve` runs without one).
    Default {
        /// The default for a pool that publishes KV events (`--kv-events-port`).
        #[arg(long, conflicts_with = "disaggregated")]
        precise: bool,
        /// kvroute's configuration for a pool split into prefill and decode pods
        /// (`llm-d.ai/role`), to run with `--config-file`.
        #[arg(long)]
        disaggregated: bool,
    },
}

pub(crate) fn run(cmd: &ConfigCommand) -> anyhow::Result<()> {
    match &cmd.command {
        ConfigAction::Check { file, block_size } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Checked as if KV events were followed, so precise plugins build too.
            let mut ctx = BuildContext::new(*block_size);
            ctx.precise_index = Some(Arc::new(Shared::new(PrefixIndex::new())));
            let (_, scheduler, admission) = build_config(&text, &ctx)
                .with_context(|| format!("{} cannot be used", file.display()))?;
            let mut out = match &admission.flow {
                Some(flow) => format!(
                    "admission: flow control, {} configured priority bands, TTL {:?} (no endpoint: {:?})\n",
                    flow.bands.len(),
                    flow.ttl,
                    flow.no_endpoint_ttl
                ),
                None => {
                    "admission: sheddable requests (priority < 0) refused while saturated\n".into()
                }
            };
            for p in scheduler.profiles() {
                out.push_str(&format!("profile {}:", p.name()));
                for (plugin, weight) in p.plugins() {
                    match weight {
                        Some(w) => out.push_str(&format!(" {}×{w}", plugin.type_name())),
                        None => out.push_str(&format!(" {}", plugin.type_name())),
                    }
                }
                out.push('\n');
            }
            write_stdout(&format!("{}: ok\n{out}", file.display()))
        }
        ConfigAction::Default {
            precise,
            disaggregated,
        } => write_stdout(match (*precise, *disaggregated) {
            (_, true) => DEFAULT_PD,
            (true, false) => DEFAULT_PRECISE,
            (false, false) => DEFAULT_APPROX,
        }),
    }
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Reloads of `--config-file` by result (`applied`, `refused`).
pub(crate) type Reloads = Family<[(&'static str, &'static str); 1], Counter>;

/// Registers `kvroute_config_reloads_total`.
pub(crate) fn register_reloads(prom: &mut prometheus_client::registry::Registry) -> Reloads {
    let reloads = Reloads::default();
    prom.register(
        "config_reloads",
        "Changes of the routing configuration file, by whether they were applied or refused",
        reloads.clone(),
    );
    reloads
}

/// Re-reads `path` every couple of seconds; a changed configuration that builds replaces the
/// running one (requests in progress finish with the old one; requests waiting in the
/// flow-control queue stay there under the new settings), one that does not is logged and
/// the running one stays.
pub(crate) async fn watch(
    path: PathBuf,
    mut current: String,
    ctx: BuildContext,
    (handle, admission): (Arc<SchedulerHandle>, Arc<Admission>),
    reloads: Reloads,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(text) = changed(&path, &current).await {
            match build_config(&text, &ctx) {
                Ok((_, scheduler, settings)) => {
                    handle.store(scheduler);
                    admission.configure(settings);
                    reloads.get_or_create(&[("result", "applied")]).inc();
                    info!(file = %path.display(), "routing configuration reloaded");
                }
                Err(e) => {
                    reloads.get_or_create(&[("result", "refused")]).inc();
                    error!(
                        file = %path.display(),
                        error = %e,
                        "routing configuration refused; the running one stays"
                    );
                }
            }
            current = text;
        }
    }
}

/// The file's text if it differs from `current` (an unreadable file counts as unchanged).
async fn changed(path: &Path, current: &str) -> Option<String> {
    match tokio::fs::read_to_string(path).await {
        Ok(text) if text != current => Some(text),
        Ok(_) => None,
        Err(e) => {
            error!(file = %path.display(), error = %e, "cannot read the routing configuration");
            None
        }
    }
}
