//! `kvroute serve`: the ext_proc server, its gRPC health service and the admin port, over
//! endpoints from a static list or file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use kvroute_discovery::{Discovery, DiscoveryMetrics, MetricsAuth, PoolSpec, Source};
use kvroute_endpoints::{
    InFlightCollector, LoadCollector, PoolCollector, Registry, ScrapeConfig, ScrapeMetrics, Scraper,
};
use kvroute_events::{EventMetrics, IndexCollector, SubscriberConfig, Subscriptions};
use kvroute_extproc::{
    Admission, AdmissionCollector, BodySendMode, DEFAULT_DECISION_QUEUE,
    DEFAULT_INLINE_DECISION_BYTES, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_STREAMS, ExtProcConfig,
    ExtProcService, Metrics, Router, Tls, TlsSettings, TlsVersion, UpstreamAdmissionCollector,
    UpstreamMetrics, default_decision_threads,
};
use kvroute_index::{PrefixIndex, Shared};
use kvroute_scheduler::admission::AdmissionSettings;
use kvroute_scheduler::config::{DEFAULT_APPROX, DEFAULT_PRECISE, LEAST_IN_FLIGHT};
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, SchedulerHandle, Tokenizers};
use kvroute_tokens::ModelTokenizer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, info, warn};

use crate::{admin, shutdown};

/// Streams Envoy may reset before kvroute has accepted them, per connection, before the
/// connection is closed. h2's default (20, a guard against rapid-reset floods) is crossed as
/// soon as a burst of clients disconnects at once (seen: 150), and closing the connection
/// then fails every other request on it with a 500. Envoy opens at most 1,024 requests to a
/// cluster by default (its circuit breaker), so that many resets are a burst, not a flood.
const MAX_PENDING_ACCEPT_RESETS: usize = 1_024;

/// The gRPC service name Envoy's health checks ask about.
const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address of the ext_proc gRPC server (and its gRPC health service).
    #[arg(long, default_value = "0.0.0.0:9002", env = "KVROUTE_GRPC_ADDR")]
    grpc_addr: SocketAddr,
    /// Upstream's form of --grpc-addr: the ext_proc port on every interface.
    #[arg(long, conflicts_with = "grpc_addr")]
    grpc_port: Option<u16>,
    /// gRPC health alone, on this port of the ext_proc address's interface (what the
    /// kubelet's probes ask: `liveness` is SERVING while the process runs; `readiness`,
    /// `inference-extension`, `""` and the ext_proc service name once the endpoints were
    /// listed and until SIGTERM).
    #[arg(long, default_value_t = 9003)]
    grpc_health_port: u16,
    /// Address of the admin HTTP server: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:9090", env = "KVROUTE_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Upstream's form of --admin-addr: kvroute's own /metrics (and probes) port on every
    /// interface.
    #[arg(long, conflicts_with = "admin_addr")]
    metrics_port: Option<u16>,
    #[command(flatten)]
    endpoints: EndpointArgs,
    #[command(flatten)]
    pool: PoolArgs,
    /// Request bodies larger than this are answered 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES, env = "KVROUTE_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Routing policy, when no configuration is given.
    #[arg(long, value_enum, default_value_t = Policy::Prefix)]
    policy: Policy,
    #[command(flatten)]
    config: ConfigArgs,
    /// Fallback endpoints listed after the primary (`ip:port,ip:port…`). Only for data planes
    /// that walk the list; Envoy's original-destination cluster needs exactly one (0).
    #[arg(long, default_value_t = 0)]
    fallback_endpoints: usize,
    /// Body mode assumed when Envoy does not announce its processing modes (Envoy before
    /// 1.34 sends no `protocol_config`); set it to what the ext_proc filter is configured with.
    #[arg(long, value_enum, default_value_t = BodyMode::FullDuplexStreamed)]
    assume_body_mode: BodyMode,
    /// When a configured plugin tokenizes, bodies larger than this (bytes) are parsed,
    /// tokenized and scheduled on the blocking decision pool instead of an async worker
    /// (without tokenization, only bodies over 1 MiB are).
    #[arg(long, default_value_t = DEFAULT_INLINE_DECISION_BYTES)]
    inline_decision_bytes: usize,
    /// Threads of the blocking decision pool (default: one fewer than the cores, at least 1).
    #[arg(long, default_value_t = default_decision_threads())]
    decision_threads: usize,
    /// Decisions that may wait for the pool; beyond that a request is answered 503 at once.
    #[arg(long, default_value_t = DEFAULT_DECISION_QUEUE)]
    decision_queue: usize,
    /// ext_proc streams open at once; a stream beyond is refused (RESOURCE_EXHAUSTED, so
    /// Envoy's failure mode answers its request), counted as outcome too_many_streams.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS)]
    max_streams: usize,
    /// A stream whose request is not answered (routed or refused) this long after it opened
    /// is ended (DEADLINE_EXCEEDED, counted as outcome request_timeout): a client trickling
    /// its body holds it no longer. The response is bounded by the data plane's timeouts.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    stream_request_timeout: Duration,
    /// Seconds open streams get to finish after SIGTERM before the process exits.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// After SIGTERM, health answers NOT_SERVING and /readyz 503 while new requests are
    /// still served for this long, so that the data plane's health checks and Kubernetes'
    /// endpoint removal stop sending before the listener closes; then open streams drain
    /// (--shutdown-grace-secs). Set it above the health check's time to notice (the shipped
    /// Envoy config: 2 checks 2 s apart). SIGINT skips it.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lame_duck: Duration,
    /// Upstream's name for --lame-duck: how long ext_proc keeps serving after SIGTERM has
    /// turned health NOT_SERVING.
    #[arg(long, value_parser = parse_duration, conflicts_with = "lame_duck")]
    drain_timeout: Option<Duration>,
    #[command(flatten)]
    upstream: UpstreamArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Empty arguments are ignored: KServe's scheduler template renders `""` for flags it
    /// leaves out. Anything else here is refused.
    #[arg(hide = true, num_args = 0..)]
    empty: Vec<String>,
    #[command(flatten)]
    events: EventArgs,
    #[command(flatten)]
    scrape: ScrapeArgs,
}

/// Reading each pod's `/metrics` (upstream's flags).
#[derive(Debug, Args)]
struct ScrapeArgs {
    /// How often each endpoint's metrics are read (at least 50ms).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    refresh_metrics_interval: Duration,
    /// A scrape older than this is not used for scoring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    metrics_staleness_threshold: Duration,
    /// The pods' metrics port (default: the endpoint's own port, as vLLM serves it).
    #[arg(long)]
    model_server_metrics_port: Option<u16>,
    /// The pods' metrics path (default: the configuration's `metrics-data-source` path,
    /// else /metrics).
    #[arg(long)]
    model_server_metrics_path: Option<String>,
    /// The pods' metrics scheme; kvroute scrapes over `http` only.
    #[arg(long, default_value = "http", value_parser = ["http"])]
    model_server_metrics_scheme: String,
    /// Read for compatibility (it applies to `https` scrapes, which kvroute does not make).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    model_server_metrics_https_insecure_skip_verify: Option<bool>,
}

/// Upstream's flags for what kvroute does differently, accepted so that upstream's charts
/// and manifests run kvroute unchanged; each says at start what it means here.
/// TLS on the ext_proc port (upstream's flags and defaults).
#[derive(Debug, Args)]
struct TlsArgs {
    /// Serve ext_proc over TLS (`--secure-serving=false`: plaintext). On by default, as
    /// upstream's picker, whose data planes connect over TLS without verifying.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", require_equals = true, action = clap::ArgAction::Set)]
    secure_serving: bool,
    /// A directory with `tls.crt` and `tls.key` (PEM); without it a self-signed
    /// certificate is made at start.
    #[arg(long)]
    cert_path: Option<PathBuf>,
    /// Re-read the files under --cert-path when they change (every 2 s).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", require_equals = true, action = clap::ArgAction::Set)]
    enable_cert_reload: bool,
    /// The oldest TLS version accepted: `VersionTLS12` or `VersionTLS13` (`VersionTLS10`
    /// and `VersionTLS11` read as 1.2, the oldest kvroute speaks).
    #[arg(long, default_value = "VersionTLS12", value_parser = ["VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13"])]
    tls_min_version: String,
}

impl TlsArgs {
    /// The TLS the ext_proc port serves, if any.
    fn tls(&self) -> anyhow::Result<Option<Tls>> {
        if !self.secure_serving {
            anyhow::ensure!(
                self.cert_path.is_none(),
                "--cert-path needs --secure-serving (on by default)"
            );
            return Ok(None);
        }
        let settings = TlsSettings {
            cert_dir: self.cert_path.clone(),
            reload: self.enable_cert_reload,
            min_version: if self.tls_min_version == "VersionTLS13" {
                TlsVersion::Tls13
            } else {
                TlsVersion::Tls12
            },
        };
        if self.cert_path.is_none() {
            info!(
                "ext_proc serves TLS with a self-signed certificate (give --cert-path for your own)"
            );
        }
        Ok(Some(
            Tls::new(settings).context("TLS on the ext_proc port")?,
        ))
    }
}

#[derive(Debug, Args)]
struct UpstreamArgs {
    /// Leader election: kvroute runs active-active (every replica routes), so none is held.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    ha_enable_leader_election: Option<bool>,
    /// Trace export: kvroute emits no traces; `true` is refused rather than ignored.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    tracing: Option<bool>,
    /// Authenticate /metrics: the caller's bearer token is reviewed by the API server
    /// (TokenReview) and its user must be allowed `get` on `/metrics` (SubjectAccessReview),
    /// as upstream's picker asks; needs a cluster source (--pool-name or
    /// --endpoint-selector) and the ClusterRole in deploy/kubernetes/metrics-auth.yaml.
    /// Off unless asked: the probes and an unauthenticated scrape keep working.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    metrics_endpoint_auth: Option<bool>,
    /// Alpha plugins: kvroute gates none, so every plugin it knows is allowed.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    allow_experimental_plugins: Option<bool>,
    /// Ignore the data plane's subset hint (`envoy.lb.subset_hint`) and choose among every
    /// endpoint.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    disable_endpoint_subset_filter: Option<bool>,
    /// Health on the ext_proc port: kvroute serves it there always (and on
    /// --grpc-health-port).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    health_checking: Option<bool>,
}

impl UpstreamArgs {
    /// Refuses what kvroute cannot honour, and says what the rest mean here.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tracing != Some(true),
            "--tracing: kvroute emits no traces; pass --tracing=false"
        );
        if self.ha_enable_leader_election == Some(true) {
            info!(
                "--ha-enable-leader-election: kvroute runs active-active, every replica routes; no leader is elected"
            );
        }
        Ok(())
    }
}

/// A duration as Go writes one: `50ms`, `2s`, `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Precise routing from the pods' vLLM KV events (`--kv-events-config` on each pod).
#[derive(Debug, Args)]
struct EventArgs {
    /// Subscribe to each endpoint's KV events on this port (vLLM's default endpoint is
    /// tcp://*:5557); without it, routing is approximate only.
    #[arg(long, env = "KVROUTE_KV_EVENTS_PORT")]
    kv_events_port: Option<u16>,
    /// Each endpoint's replay port (vLLM's `replay_endpoint`), to fill gaps in the stream.
    #[arg(long, env = "KVROUTE_KV_REPLAY_PORT")]
    kv_replay_port: Option<u16>,
    /// Topic prefix to subscribe to (vLLM's `topic`; empty: all).
    #[arg(long, default_value = "", env = "KVROUTE_KV_EVENTS_TOPIC")]
    kv_events_topic: String,
    /// The pods' KV-cache block size, tokens (vLLM's `--block-size`; its default is 16).
    #[arg(long, default_value_t = 16, env = "KVROUTE_BLOCK_SIZE")]
    block_size: usize,
    /// An endpoint serving requests with no KV events for this long is scored as
    /// approximate until its events resume.
    #[arg(long, default_value_t = 10)]
    kv_events_silence_secs: u64,
    /// A pod whose event or replay socket announces a ZMQ frame longer than this (bytes)
    /// has that connection cut (and counted) rather than the memory reserved.
    #[arg(long, default_value_t = kvroute_events::DEFAULT_MAX_FRAME_BYTES)]
    kv_events_max_frame_bytes: u64,
    /// A KV-event batch that would decode into more entries than this (events, block
    /// hashes, token ids) is refused, counted, and the pod's entries dropped (its stream
    /// goes on from the next batch).
    #[arg(long, default_value_t = kvroute_events::DEFAULT_MAX_BATCH_ENTRIES)]
    kv_events_max_batch_entries: usize,
    /// A replay (`--kv-replay-port`) bringing back more payload bytes than this is
    /// abandoned and counted; the stream resyncs as after an unfilled gap.
    #[arg(long, default_value_t = kvroute_events::DEFAULT_MAX_REPLAY_BYTES)]
    kv_events_max_replay_bytes: usize,
    /// Tokenizers for precise routing of text and chat prompts: `DIR/<model>/tokenizer.json`
    /// (and `tokenizer_config.json` for the chat template) for each model name requests
    /// use (`Qwen/Qwen3-8B` is `DIR/Qwen/Qwen3-8B/`); `DIR/tokenizer.json` serves any other
    /// name. Local files only (a mounted volume in a cluster); nothing is downloaded.
    #[arg(long, env = "KVROUTE_TOKENIZERS_DIR")]
    tokenizers_dir: Option<PathBuf>,
    /// LoRA adapters the pods serve, `adapter=base-model` comma-separated: requests naming
    /// an adapter are tokenized as its base model and matched against blocks vLLM computed
    /// under that adapter.
    #[arg(long, value_delimiter = ',', env = "KVROUTE_LORA_ADAPTERS")]
    lora_adapters: Vec<String>,
}

/// `adapter=base` pairs.
fn parse_adapters(pairs: &[String]) -> anyhow::Result<Vec<(&str, &str)>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .with_context(|| format!("--lora-adapters: {pair:?} is not adapter=base-model"))
        })
        .collect()
}

/// Every tokenizer under `dir`, named by its directory's path relative to `dir`.
fn load_tokenizers(dir: &std::path::Path) -> anyhow::Result<Tokenizers> {
    fn load(dir: &std::path::Path) -> anyhow::Result<Option<Arc<ModelTokenizer>>> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read(&config_path) {
            Ok(c) => Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
        };
        let model = ModelTokenizer::new(&bytes, config.as_deref())
            .with_context(|| format!("loading {}", json.display()))?;
        Ok(Some(Arc::new(model)))
    }
    let mut tokenizers = Tokenizers::new();
    if let Some(t) = load(dir)? {
        tokenizers.set_default(t);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?;
        for entry in entries {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            if let Some(t) = load(&path)? {
                let name = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                info!(model = %name, "tokenizer loaded");
                tokenizers.insert(name, t);
            }
            stack.push(path);
        }
    }
    anyhow::ensure!(
        !tokenizers.is_empty(),
        "no tokenizer.json under {}",
        dir.display()
    );
    Ok(tokenizers)
}

/// The routing configuration: an `EndpointPickerConfig` (upstream's flags).
#[derive(Debug, Args)]
#[group(multiple = false)]
pub(crate) struct ConfigArgs {
    /// An `EndpointPickerConfig` YAML file; re-read when it changes (a bad one is refused
    /// and the running configuration stays).
    #[arg(long, env = "KVROUTE_CONFIG_FILE")]
    pub(crate) config_file: Option<PathBuf>,
    /// An `EndpointPickerConfig` given inline.
    #[arg(long, env = "KVROUTE_CONFIG_TEXT")]
    pub(crate) config_text: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    /// kvroute's default profile: approximate prefix-cache affinity (3) against load (4);
    /// with --kv-events-port, precise (2) and approximate (2) affinity, predicted TTFT (4)
    /// and load (2).
    Prefix,
    /// Fewest requests in flight.
    LeastInFlight,
}

impl Policy {
    /// The built-in configuration of this policy.
    fn config(self, precise: bool) -> &'static str {
        match self {
            Self::Prefix if precise => DEFAULT_PRECISE,
            Self::Prefix => DEFAULT_APPROX,
            Self::LeastInFlight => LEAST_IN_FLIGHT,
        }
    }
}

/// What a routing configuration builds into: the parsed configuration (for what it says
/// beyond scheduling: the scrape path), the scheduler, and how requests are admitted.
pub(crate) type Built = (
    EndpointPickerConfig,
    kvroute_scheduler::Scheduler,
    AdmissionSettings,
);

/// Parses and builds `text`, logging what kvroute reads but does not act on.
pub(crate) fn build_config(
    text: &str,
    ctx: &BuildContext,
) -> Result<Built, kvroute_scheduler::ConfigError> {
    let config = EndpointPickerConfig::parse(text)?;
    let ignored = config.ignored_sections();
    if !ignored.is_empty() {
        info!(sections = ?ignored, "configuration sections read but not acted on (kvroute's flags set them, or their feature gate is off)");
    }
    let gates: Vec<&str> = config.feature_gates().collect();
    if !gates.is_empty() {
        info!(?gates, "feature gates read; kvroute acts on flowControl");
    }
    if let Some(scheme) = config.metrics_scheme()
        && scheme != "http"
    {
        warn!(
            scheme,
            "metrics-data-source scheme: kvroute scrapes over http"
        );
    }
    let scheduler = config.build_from(text, ctx)?;
    let admission = config.admission_from(text)?;
    Ok((config, scheduler, admission))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BodyMode {
    FullDuplexStreamed,
    Buffered,
    Streamed,
}

impl From<BodyMode> for BodySendMode {
    fn from(m: BodyMode) -> Self {
        match m {
            BodyMode::FullDuplexStreamed => Self::FullDuplexStreamed,
            BodyMode::Buffered => Self::Buffered,
            BodyMode::Streamed => Self::Streamed,
        }
    }
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct EndpointArgs {
    /// Static endpoints: `ip:port` or `name=ip:port`, comma-separated.
    #[arg(long, env = "KVROUTE_ENDPOINTS")]
    endpoints: Option<String>,
    /// A YAML file listing endpoints (`endpoints: [{address, name, labels}]`).
    #[arg(long)]
    endpoints_file: Option<PathBuf>,
    /// Follow this `InferencePool` (in --pool-namespace) and the pods it selects, through
    /// the Kubernetes API (in-cluster service account, else KUBECONFIG).
    #[arg(long)]
    pool_name: Option<String>,
    /// Follow the pods matching this label selector (`app=vllm,tier=a`) without an
    /// `InferencePool`, on --endpoint-target-ports.
    #[arg(long, requires = "endpoint_target_ports")]
    endpoint_selector: Option<String>,
}

/// Where the pool lives and how it is read (upstream's flags).
#[derive(Debug, Args)]
struct PoolArgs {
    /// Namespace of the pool and its pods.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pool_namespace: String,
    /// API group of the `InferencePool`: `inference.networking.k8s.io` (v1) or
    /// `inference.networking.x-k8s.io` (v1alpha2).
    #[arg(long, default_value = "inference.networking.k8s.io")]
    pool_group: String,
    /// Target ports of the pods for --endpoint-selector, comma-separated; each port is a
    /// data-parallel rank.
    #[arg(long, value_delimiter = ',')]
    endpoint_target_ports: Vec<u16>,
}

/// Where endpoints come from, once the flags are checked.
enum EndpointSource {
    Static(Vec<kvroute_core::Endpoint>),
    Cluster(Source),
}

impl EndpointSource {
    fn from_args(args: &EndpointArgs, pool: &PoolArgs) -> anyhow::Result<Self> {
        Ok(match args {
            EndpointArgs {
                endpoints: Some(list),
                ..
            } => Self::Static(kvroute_endpoints::parse_list(list)?),
            EndpointArgs {
                endpoints_file: Some(path),
                ..
            } => Self::Static(kvroute_endpoints::load_file(path)?),
            EndpointArgs {
                pool_name: Some(name),
                ..
            } => Self::Cluster(Source::Pool {
                name: name.clone(),
                group: pool.pool_group.parse()?,
            }),
            EndpointArgs {
                endpoint_selector: Some(selector),
                ..
            } => Self::Cluster(Source::Selector(PoolSpec::from_flags(
                selector,
                &pool.endpoint_target_ports,
            )?)),
            _ => anyhow::bail!(
                "give --endpoints, --endpoints-file, --pool-name or --endpoint-selector"
            ),
        })
    }
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    args.upstream.check()?;
    if let Some(stray) = args.empty.iter().find(|a| !a.trim().is_empty()) {
        anyhow::bail!("unexpected argument {stray:?}");
    }
    let tls = args.tls.tls()?;
    // The port flags listen on every interface, IPv6 and IPv4 (as upstream's ":port"); the
    // address flags on exactly what they name.
    let grpc_addr = args.grpc_port.map_or(args.grpc_addr, every_interface);
    let admin_addr = args.metrics_port.map_or(args.admin_addr, every_interface);
    let health_addr = SocketAddr::new(grpc_addr.ip(), args.grpc_health_port);
    let lame_duck = args.drain_timeout.unwrap_or(args.lame_duck);
    let source = EndpointSource::from_args(&args.endpoints, &args.pool)?;
    let registry = Arc::new(Registry::new());
    let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
    // True once the endpoints were read in full: at once for a static list, after the first
    // full list of the pool's pods for a cluster source.
    let (listed_tx, listed) = watch::channel(false);
    let mut metrics_auth = None;
    let discovery = match source {
        EndpointSource::Static(endpoints) => {
            anyhow::ensure!(
                args.upstream.metrics_endpoint_auth != Some(true),
                "--metrics-endpoint-auth reviews tokens with the Kubernetes API server: it needs --pool-name or --endpoint-selector"
            );
            registry.replace(endpoints);
            listed_tx.send_replace(true);
            None
        }
        EndpointSource::Cluster(source) => {
            let client = Discovery::infer_client()
                .await
                .context("connecting to the Kubernetes API server")?;
            if args.upstream.metrics_endpoint_auth == Some(true) {
                metrics_auth = Some(MetricsAuth::new(client.clone()));
            }
            Some(Discovery::new(
                client,
                args.pool.pool_namespace.clone(),
                source,
                DiscoveryMetrics::register(&mut prom),
            ))
        }
    };

    // Upstream's metric names, whole (no prefix), beside kvroute's own.
    let mut upstream_prom = prometheus_client::registry::Registry::default();
    let priorities = discovery
        .as_ref()
        .map(|d| Arc::new(d.objectives()) as Arc<dyn kvroute_core::Priorities>);
    let metrics = Metrics::register(&mut prom).with_upstream(UpstreamMetrics::register(
        &mut upstream_prom,
        priorities.clone(),
    ));
    registry.subscribe(Arc::new(metrics.clone()));
    upstream_prom.register_collector(Box::new(PoolCollector::new(
        Arc::clone(&registry),
        args.endpoints.pool_name.clone().unwrap_or_default(),
        args.scrape.metrics_staleness_threshold,
    )));
    prom.register_collector(Box::new(InFlightCollector::new(Arc::clone(&registry))));

    anyhow::ensure!(
        args.events.block_size > 0,
        "--block-size must be at least 1"
    );
    let index = Arc::new(Shared::new(PrefixIndex::new()));
    let mut tokenizers = match &args.events.tokenizers_dir {
        Some(dir) => load_tokenizers(dir)?,
        None => Tokenizers::new(),
    };
    for (adapter, base) in parse_adapters(&args.events.lora_adapters)? {
        tokenizers.insert_adapter(adapter, base);
    }
    let subscriptions = args.events.kv_events_port.map(|port| {
        Subscriptions::new(
            SubscriberConfig {
                port,
                replay_port: args.events.kv_replay_port,
                topic: args.events.kv_events_topic.clone(),
                block_size: args.events.block_size,
                silence: Duration::from_secs(args.events.kv_events_silence_secs.max(1)),
                max_frame: args.events.kv_events_max_frame_bytes,
                max_batch_entries: args.events.kv_events_max_batch_entries,
                max_replay_bytes: args.events.kv_events_max_replay_bytes,
                ..SubscriberConfig::default()
            },
            Arc::clone(&index),
            EventMetrics::register(&mut prom),
        )
    });
    if subscriptions.is_some() {
        prom.register_collector(Box::new(IndexCollector(Arc::clone(&index))));
    }
    let mut ctx = BuildContext::new(args.events.block_size);
    ctx.staleness = args.scrape.metrics_staleness_threshold;
    ctx.tokenizers = tokenizers;
    ctx.precise_index = subscriptions.as_ref().map(|_| Arc::clone(&index));
    let text = match (&args.config.config_file, &args.config.config_text) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --config-file {}", path.display()))?,
        (None, Some(text)) => text.clone(),
        (None, None) => args.policy.config(subscriptions.is_some()).to_owned(),
    };
    let (config, scheduler, admission) =
        build_config(&text, &ctx).context("routing configuration")?;
    if admission.flow.is_some() {
        info!("flow control on: requests wait in priority bands while the pool is saturated");
    }
    let admission = Admission::new(Arc::clone(&registry), priorities, admission);
    registry.subscribe(Arc::clone(&admission) as Arc<dyn kvroute_endpoints::EndpointsListener>);
    prom.register_collector(Box::new(AdmissionCollector(Arc::clone(&admission))));
    upstream_prom.register_collector(Box::new(UpstreamAdmissionCollector::new(
        Arc::clone(&admission),
        args.endpoints.pool_name.clone().unwrap_or_default(),
    )));
    let metrics_path = config.metrics_path().map(str::to_owned);
    let scheduler = Arc::new(SchedulerHandle::new(scheduler));
    registry.subscribe(Arc::clone(&scheduler) as Arc<dyn kvroute_endpoints::EndpointsListener>);
    let scrape_config = ScrapeConfig {
        interval: args
            .scrape
            .refresh_metrics_interval
            .max(Duration::from_millis(50)),
        staleness: args.scrape.metrics_staleness_threshold,
        port: args.scrape.model_server_metrics_port,
        path: args
            .scrape
            .model_server_metrics_path
            .clone()
            .or(metrics_path)
            .unwrap_or_else(|| "/metrics".to_owned()),
        expected_block_size: u32::try_from(args.events.block_size).ok(),
        ..ScrapeConfig::default()
    };
    let scraper = Scraper::new(scrape_config, ScrapeMetrics::register(&mut prom));
    prom.register_collector(Box::new(LoadCollector::new(Arc::clone(&registry))));
    let reloads = crate::config::register_reloads(&mut prom);

    let router = Router::new(
        Arc::clone(&registry),
        Arc::clone(&scheduler),
        ExtProcConfig {
            max_body_bytes: args.max_body_bytes,
            assumed_body_mode: args.assume_body_mode.into(),
            inline_decision_bytes: args.inline_decision_bytes,
            decision_threads: args.decision_threads.max(1),
            decision_queue: args.decision_queue,
            max_streams: args.max_streams,
            subset_filter: args.upstream.disable_endpoint_subset_filter != Some(true),
            request_timeout: args.stream_request_timeout,
        },
        metrics,
    );

    // Bind every port before serving anything, so a taken port fails the start cleanly.
    let grpc_listener = bind(grpc_addr)
        .await
        .with_context(|| format!("binding ext_proc address {grpc_addr}"))?;
    let health_listener = bind(health_addr)
        .await
        .with_context(|| format!("binding gRPC health address {health_addr}"))?;
    let admin_listener = bind(admin_addr)
        .await
        .with_context(|| format!("binding admin address {admin_addr}"))?;
    info!(
        grpc = %grpc_listener.local_addr()?,
        health = %health_listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        endpoints = registry.len(),
        kv_events = ?args.events.kv_events_port,
        "kvroute serving"
    );

    let token = CancellationToken::new();
    // Cancelled at the signal, before `token`: readiness goes first (lame duck).
    let draining = CancellationToken::new();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    let discovering =
        discovery.map(|d| tokio::spawn(d.run(Arc::clone(&registry), listed_tx, token.clone())));
    let mut ready_rx = listed.clone();
    let ready_reporter = reporter.clone();
    let serving = tokio::spawn(async move {
        if ready_rx.wait_for(|listed| *listed).await.is_ok() {
            set_health(&ready_reporter, ServingStatus::Serving).await;
            info!("endpoints listed: serving");
        }
    });

    let grpc_shutdown = token.clone();
    let health = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(
                kvroute_extproc::incoming(health_listener),
                token.clone().cancelled_owned(),
            ),
    );
    let grpc_server = tonic::transport::Server::builder()
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .add_service(health_service)
        .add_service(
            ExtProcService::new(router)
                .with_admission(Arc::clone(&admission))
                .into_server(),
        );
    let grpc = match &tls {
        Some(tls) => tokio::spawn(grpc_server.serve_with_incoming_shutdown(
            tls.incoming(grpc_listener, token.clone()),
            grpc_shutdown.cancelled_owned(),
        )),
        None => tokio::spawn(grpc_server.serve_with_incoming_shutdown(
            kvroute_extproc::incoming(grpc_listener),
            grpc_shutdown.cancelled_owned(),
        )),
    };
    let cert_reload = tls.map(|tls| tokio::spawn(tls.watch(token.clone())));
    let admin_state = Arc::new(admin::AdminState {
        metrics: [prom, upstream_prom],
        listed,
        metrics_auth,
        draining: draining.clone(),
    });
    let admin = tokio::spawn(admin::serve(admin_listener, admin_state, token.clone()));
    let events = subscriptions.map(|s| tokio::spawn(s.run(Arc::clone(&registry), token.clone())));
    let scrapes = tokio::spawn(scraper.run(Arc::clone(&registry), token.clone()));
    let dispatcher = tokio::spawn(Arc::clone(&admission).run(token.clone()));
    let reload = args.config.config_file.clone().map(|path| {
        tokio::spawn(crate::config::watch(
            path,
            text,
            ctx,
            (Arc::clone(&scheduler), admission),
            reloads,
            token.clone(),
        ))
    });

    let stop = shutdown::wait(&token).await?;
    serving.abort();
    draining.cancel();
    set_health(&reporter, ServingStatus::NotServing).await;
    if stop == shutdown::Stop::Term && !lame_duck.is_zero() {
        info!(
            ?lame_duck,
            "health NOT_SERVING; routing on until the lame duck period ends"
        );
        tokio::time::sleep(lame_duck).await;
    }
    token.cancel();

    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        let grpc = grpc.await;
        let admin = admin.await;
        match health.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "gRPC health server failed"),
            Err(e) => warn!(error = %e, "gRPC health server task failed"),
        }
        if let Some(events) = events
            && let Err(e) = events.await
        {
            warn!(error = %e, "KV-event subscriptions task failed");
        }
        if let Some(reload) = cert_reload
            && let Err(e) = reload.await
        {
            warn!(error = %e, "certificate reload task failed");
        }
        if let Some(discovering) = discovering
            && let Err(e) = discovering.await
        {
            warn!(error = %e, "discovery task failed");
        }
        if let Err(e) = scrapes.await {
            warn!(error = %e, "metrics scraper task failed");
        }
        if let Err(e) = dispatcher.await {
            warn!(error = %e, "flow-control dispatcher task failed");
        }
        if let Some(reload) = reload
            && let Err(e) = reload.await
        {
            warn!(error = %e, "configuration watch task failed");
        }
        (grpc, admin)
    })
    .await;
    match drained {
        Ok((grpc, admin)) => {
            grpc.context("ext_proc server task")?
                .context("ext_proc server")?;
            admin.context("admin server task")?;
            info!("drained");
        }
        Err(_) => warn!(
            grace_secs = args.shutdown_grace_secs,
            "grace period over: exiting with streams open"
        ),
    }
    Ok(())
}

/// `[::]:port`: every interface, IPv6 and (dual-stack) IPv4.
fn every_interface(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
}

/// Binds `addr`; the IPv6 wildcard falls back to IPv4's where the host has no IPv6.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.ip() == std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) => {
            debug!(error = %e, "no IPv6: listening on IPv4 only");
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port()))).await
        }
        bound => bound,
    }
}

/// The service names that report readiness: the whole server (`""`), the ext_proc service
/// (what Envoy's gRPC health check asks), and the names upstream's charts probe.
const READINESS_SERVICES: [&str; 4] = ["", EXT_PROC_SERVICE, "readiness", "inference-extension"];

/// Readiness under every name that reports it. `liveness` is not among them: it is SERVING
/// from the start to the end (a kubelet must not restart a process that waits for its pool
/// or drains).
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for service in READINESS_SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_name_equals_base() {
        let pairs = ["sql=Qwen/Qwen3-8B".to_owned(), "chat=base".to_owned()];
        let ok = parse_adapters(&pairs).unwrap();
        assert_eq!(ok, [("sql", "Qwen/Qwen3-8B"), ("chat", "base")]);
        for bad in ["sql", "=base", "sql="] {
            let err = parse_adapters(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains("adapter=base-model"), "{bad}: {err}");
        }
    }

    #[test]
    fn tokenizers_are_named_by_their_directory() {
        let dir = std::env::temp_dir().join(format!("kvroute-tok-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        let err = load_tokenizers(&dir).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.json"), "{err}");
        std::fs::create_dir_all(dir.join("Org/Broken")).unwrap();
        std::fs::write(dir.join("Org/Broken/tokenizer.json"), b"{").unwrap();
        let err = format!("{:#}", load_tokenizers(&dir).unwrap_err());
        assert!(err.contains("Org/Broken/tokenizer.json"), "{err}");
        let real = std::env::var("KVROUTE_TEST_TOKENIZER")
            .expect("KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json");
        std::fs::copy(&real, dir.join("Org/Broken/tokenizer.json")).unwrap();
        let tokenizers = load_tokenizers(&dir).unwrap();
        assert!(tokenizers.get("Org/Broken").is_some());
        assert!(
            tokenizers.get("other").is_none(),
            "no default without DIR/tokenizer.json"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
