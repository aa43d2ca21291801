//! `kvroute sim`: one simulated vLLM pod on real sockets.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use clap::{Args, ValueEnum};
use kvroute_chat::ChatTemplate;
use kvroute_sim::Profile;
use kvroute_sim::server::{self, PdConfig, Role, ServerConfig};
use kvroute_sim::wire::EventEncoding;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::shutdown;

#[derive(Debug, Args)]
pub(crate) struct SimArgs {
    /// Address to listen on (HTTP and ZMQ).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// HTTP port: OpenAI API, /health, /metrics.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Hardware/model profile (`docs/simulator.md`): h100-llama3.1-8b, mi300x-llama3.1-70b-tp4.
    #[arg(long, default_value = "h100-llama3.1-8b")]
    profile: String,
    /// Model name served.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// KV-event PUB port (vLLM's default endpoint is tcp://*:5557).
    #[arg(long, default_value_t = 5557)]
    kv_events_port: u16,
    /// KV-event replay port.
    #[arg(long, default_value_t = 5657)]
    kv_replay_port: u16,
    /// Topic (frame 0) of every event message.
    #[arg(long, default_value = "")]
    topic: String,
    /// Run this many times faster than the modelled hardware.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// How events are encoded: maps (vLLM since mid-2026) or arrays (earlier releases).
    #[arg(long, value_enum, default_value_t = Encoding::Map)]
    event_encoding: Encoding,
    /// A Hugging Face `tokenizer.json` to tokenize text prompts with (read once, never
    /// downloaded; the chat template comes from the `tokenizer_config.json` beside it, if
    /// there is one); without it text is tokenized by 4-byte chunks.
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    /// LoRA adapters served, comma-separated: a request whose `model` names one runs with
    /// it (its blocks rooted at it, as vLLM's are).
    #[arg(long, value_delimiter = ',')]
    lora_adapters: Vec<String>,
    /// End every streamed answer with its usage, asked for or not (vLLM's flag); otherwise
    /// only where the request's `stream_options.include_usage` asks, as vLLM answers.
    #[arg(long)]
    enable_force_include_usage: bool,
    /// Adapters a step's batch may use at once (vLLM's `--max-loras`); requests for others
    /// wait. Each adapter not yet on the GPU costs a load.
    #[arg(long, default_value_t = 1)]
    max_loras: usize,
    /// Milliseconds to load an adapter into the GPU (default: the profile's, 25).
    #[arg(long)]
    lora_load_ms: Option<f64>,
    /// Tokens of host memory that blocks evicted from the GPU move to (vLLM's CPU
    /// offloading); 0: none. Hits there are copied back instead of recomputed.
    #[arg(long, default_value_t = 0)]
    cpu_offload_tokens: usize,
    /// Steps also pay attention's cost per token of context (each prefilled token's
    /// attention to what precedes it, each decode's read of its KV cache), which the
    /// profile's linear figures leave out (`docs/simulator.md`).
    #[arg(long)]
    context_cost: bool,
    /// Its part in prefill/decode disaggregation: `decode` and `both` honour
    /// `x-prefiller-host-port` as llm-d's routing sidecar does (the prefill pod computes the
    /// prompt, its KV comes over, this pod decodes); `prefill` serves what it is sent.
    #[arg(long, value_enum, default_value_t = PdRole::Both)]
    role: PdRole,
    /// Microseconds to move one prompt token's KV from a prefill pod.
    #[arg(long, default_value_t = 5.0)]
    kv_transfer_us_per_token: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PdRole {
    Both,
    Prefill,
    Decode,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Encoding {
    Map,
    Array,
}

pub(crate) async fn run(args: SimArgs) -> anyhow::Result<()> {
    let profile = Profile::named(&args.profile).with_context(|| {
        let names: Vec<&str> = Profile::all().iter().map(|p| p.name).collect();
        format!(
            "unknown profile {:?}; known: {}",
            args.profile,
            names.join(", ")
        )
    })?;
    anyhow::ensure!(args.speed > 0.0, "--speed must be positive");
    anyhow::ensure!(
        args.kv_transfer_us_per_token.is_finite() && args.kv_transfer_us_per_token >= 0.0,
        "--kv-transfer-us-per-token must be a number of at least 0"
    );
    let mut profile = profile.with_cpu_offload_tokens(args.cpu_offload_tokens);
    if args.context_cost {
        profile = profile.with_context_cost();
    }
    if !args.lora_adapters.is_empty() {
        anyhow::ensure!(args.max_loras > 0, "--max-loras must be at least 1");
        anyhow::ensure!(
            args.lora_adapters.iter().all(|a| !a.trim().is_empty()),
            "--lora-adapters: an empty adapter name"
        );
        profile = profile.with_max_loras(args.max_loras);
        if let Some(ms) = args.lora_load_ms {
            anyhow::ensure!(
                ms.is_finite() && ms >= 0.0,
                "--lora-load-ms must be a number of at least 0"
            );
            profile.lora_load_us = ms * 1000.0;
        }
    }
    let lora_adapters = args.lora_adapters;
    let tokenizer = match &args.tokenizer {
        Some(path) => Some(std::sync::Arc::new(
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let chat_template = match &args.tokenizer {
        Some(path) => {
            let config_path = path.with_file_name("tokenizer_config.json");
            match std::fs::read(&config_path) {
                Ok(bytes) => {
                    let config: serde_json::Value = serde_json::from_slice(&bytes)
                        .with_context(|| format!("parsing {}", config_path.display()))?;
                    ChatTemplate::from_config(&config)?.map(std::sync::Arc::new)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", config_path.display()));
                }
            }
        }
        None => None,
    };
    let config = ServerConfig {
        http: SocketAddr::new(args.host, args.port),
        events: SocketAddr::new(args.host, args.kv_events_port),
        replay: SocketAddr::new(args.host, args.kv_replay_port),
        topic: args.topic,
        model: args.model,
        profile,
        speed: args.speed,
        encoding: match args.event_encoding {
            Encoding::Map => EventEncoding::Map,
            Encoding::Array => EventEncoding::Array,
        },
        tokenizer,
        chat_template,
        pd: PdConfig {
            role: match args.role {
                PdRole::Both => Role::Both,
                PdRole::Prefill => Role::Prefill,
                PdRole::Decode => Role::Decode,
            },
            transfer_us_per_token: args.kv_transfer_us_per_token,
        },
        lora_adapters,
        force_include_usage: args.enable_force_include_usage,
    };
    let token = CancellationToken::new();
    let bound = server::start(config, token.clone()).await?;
    info!(http = %bound.http, kv_events = %bound.events, kv_replay = %bound.replay, "kvroute sim serving");
    shutdown::on_signal(token).await?;
    Ok(())
}
