//! Does a stream of cold, very long prompts slow the decisions of short ones beside it?
//!
//! `kvroute serve`'s ext_proc service in process, over a real gRPC socket, on a two-worker
//! runtime, with the precise default profile and Qwen3's real tokenizer (so every prompt is
//! rendered and tokenized). Two clients send cold ~128k-token chat prompts back to back
//! (random words: the tokenizer's segment cache never helps); one client sends short chats
//! one at a time and times each decision (last body chunk sent → routing answer received).
//! Run once with every decision inline on the async workers, once with long bodies on the
//! blocking decision pool (the default). Prints the short decisions' p50 / p99 / max and how
//! many long prompts were decided.
//!
//! `cargo bench --bench cold_prompts` (needs `KVROUTE_TEST_TOKENIZER` or `tests/run`'s
//! `.cache`; `COLD_SECS` sets each run's length, default 10).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use kvroute_extproc::{ExtProcConfig, ExtProcService, Metrics, Router};
use kvroute_index::{PrefixIndex, Shared};
use kvroute_scheduler::config::DEFAULT_PRECISE;
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, SchedulerHandle, Tokenizers};
use kvroute_tokens::ModelTokenizer;
use test_support::envoy::{full_duplex_chat_headers, request_body};
use test_support::registry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;

fn tokenizer() -> ModelTokenizer {
    let path = std::env::var_os("KVROUTE_TEST_TOKENIZER").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".cache/tokenizers/qwen3-3.7.2/tokenizer.json")
        },
        PathBuf::from,
    );
    let json = std::fs::read(&path).expect("run tests/run first: it fetches Qwen3's tokenizer");
    let config = std::fs::read(path.with_file_name("tokenizer_config.json")).unwrap();
    ModelTokenizer::new(&json, Some(&config)).unwrap()
}

/// A chat body whose one message is `words` pseudo-random words from `seed`.
fn chat(words: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut text = String::with_capacity(words * 7);
    for _ in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 2 + (x % 7) as usize;
        for i in 0..len {
            text.push((b'a' + ((x >> (i * 5)) % 26) as u8) as char);
        }
        text.push(' ');
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

/// Sends one request's headers and body on a new stream; returns when the routing answer
/// arrives, with the time from the last body chunk to it.
async fn decide(client: &mut ExternalProcessorClient<Channel>, body: &[u8]) -> Duration {
    let (tx, rx) = mpsc::channel::<ProcessingRequest>(4);
    let mut answers = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(full_duplex_chat_headers()).await.unwrap();
    let pieces: Vec<&[u8]> = body.chunks(64 << 10).collect();
    let last = pieces.len() - 1;
    let mut sent = Instant::now();
    for (i, p) in pieces.into_iter().enumerate() {
        if i == last {
            sent = Instant::now();
        }
        tx.send(request_body(p, i == last)).await.unwrap();
    }
    answers.message().await.unwrap().unwrap();
    sent.elapsed()
}

struct Run {
    short: Vec<Duration>,
    long: u64,
}

fn run(model: &Arc<ModelTokenizer>, inline: bool, secs: u64) -> Run {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut tokenizers = Tokenizers::new();
    tokenizers.set_default(Arc::clone(model));
    let mut ctx = BuildContext::new(16);
    ctx.tokenizers = tokenizers;
    ctx.precise_index = Some(Arc::new(Shared::new(PrefixIndex::new())));
    let scheduler = EndpointPickerConfig::parse(DEFAULT_PRECISE)
        .and_then(|c| c.build(&ctx))
        .unwrap();
    let endpoints = registry(&[8001, 8002, 8003, 8004, 8005, 8006, 8007, 8008]);
    endpoints
        .snapshot()
        .iter()
        .for_each(|e| e.set_events_confirmed(true));
    let mut prom = prometheus_client::registry::Registry::default();
    let config = ExtProcConfig {
        inline_decision_bytes: if inline {
            usize::MAX
        } else {
            ExtProcConfig::default().inline_decision_bytes
        },
        ..ExtProcConfig::default()
    };
    let router = Router::new(
        endpoints,
        Arc::new(SchedulerHandle::new(scheduler)),
        config,
        Metrics::register(&mut prom),
    );
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    server_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(ExtProcService::new(router).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let long_done = Arc::new(AtomicU64::new(0));
    let short = client_rt.block_on(async {
        let connect = || ExternalProcessorClient::connect(format!("http://{addr}"));
        let mut heavy = Vec::new();
        for k in 0..2u64 {
            let mut client = connect().await.unwrap();
            let stop = Arc::clone(&stop);
            let done = Arc::clone(&long_done);
            heavy.push(tokio::spawn(async move {
                let mut seed = 1_000 * (k + 1);
                while !stop.load(Ordering::Relaxed) {
                    seed += 1;
                    // ~128k tokens of random words.
                    let body = chat(100_000, seed);
                    decide(&mut client, &body).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut client = connect().await.unwrap();
        let mut times = Vec::new();
        let until = Instant::now() + Duration::from_secs(secs);
        let mut seed = 0;
        while Instant::now() < until {
            seed += 1;
            times.push(decide(&mut client, &chat(150, seed)).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for h in heavy {
            h.await.unwrap();
        }
        times
    });
    drop(server_rt);
    Run {
        short,
        long: long_done.load(Ordering::Relaxed),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let secs: u64 = std::env::var("COLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let model = Arc::new(tokenizer());
    let words = chat(100_000, 1);
    println!(
        "long prompt: {} KB of body; short prompt: {} bytes",
        words.len() / 1000,
        chat(150, 1).len()
    );
    println!("mode          short decisions  p50        p99        max        long decided");
    for (name, inline) in [("inline", true), ("pool", false)] {
        let mut r = run(&model, inline, secs);
        r.short.sort_unstable();
        println!(
            "{name:<13} {:>15}  {:>9.2?}  {:>9.2?}  {:>9.2?}  {:>12}",
            r.short.len(),
            percentile(&r.short, 0.5),
            percentile(&r.short, 0.99),
            r.short.last().copied().unwrap_or_default(),
            r.long
        );
    }
}
