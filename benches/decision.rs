//! One whole routing decision through the ext_proc handler, in process (no network): Envoy's
//! full-duplex messages for a chat request in, the headers answer and the body handed back
//! out. Bodies of 4 KiB, 64 KiB and 1 MiB, split over 1, 4 and 64 chunks. Also the body
//! parse alone, to see what share of a decision it is.

use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
use kvroute_extproc::{ExtProcConfig, Metrics, Router, StreamState};
use kvroute_scheduler::config::DEFAULT_APPROX;
use kvroute_scheduler::{BuildContext, EndpointPickerConfig, Scheduler, SchedulerHandle};
use test_support::envoy::{protocol_config, request_body, request_headers, with_config};
use test_support::{chat_body, registry, split};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];

fn messages(body: &[u8], chunks: usize) -> Vec<ProcessingRequest> {
    let mut msgs = vec![with_config(
        request_headers(
            "POST",
            "/v1/chat/completions",
            &[("x-request-id", "bench")],
            false,
        ),
        protocol_config(
            BodySendMode::FullDuplexStreamed,
            BodySendMode::FullDuplexStreamed,
            false,
        ),
    )];
    let pieces = split(body, chunks);
    let last = pieces.len() - 1;
    msgs.extend(
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| request_body(p, i == last)),
    );
    msgs
}

/// `kvroute serve`'s default policy: approximate prefix affinity (3) and load (4).
#[allow(clippy::expect_used, reason = "a fixed text shipped with the binary")]
fn prefix_profile() -> Scheduler {
    EndpointPickerConfig::parse(DEFAULT_APPROX)
        .and_then(|c| c.build(&BuildContext::new(16)))
        .expect("the shipped default configuration builds")
}

fn router(scheduler: Scheduler) -> Arc<Router> {
    let mut prom = prometheus_client::registry::Registry::default();
    Router::new(
        registry(&[8001, 8002, 8003, 8004, 8005, 8006, 8007, 8008]),
        Arc::new(SchedulerHandle::new(scheduler)),
        ExtProcConfig::default(),
        Metrics::register(&mut prom),
    )
}

fn decision(c: &mut Criterion) {
    bench_decisions(c, "decision", &router(Scheduler::least_in_flight(0)));
    // The same bodies through the default policy: the prompt is hashed (its first 256
    // blocks of 64 bytes), matched against the approximate index and recorded against the
    // chosen endpoint, which is what the benchmark's repeated prompt then hits.
    bench_decisions(c, "decision-prefix-policy", &router(prefix_profile()));
}

fn bench_decisions(c: &mut Criterion, name: &str, router: &Arc<Router>) {
    let mut group = c.benchmark_group(name);
    for (size, name) in SIZES {
        let body = chat_body(size);
        for chunks in [1, 4, 64] {
            let msgs = messages(&body, chunks);
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{chunks}-chunks")),
                &msgs,
                |b, msgs| {
                    let mut out = Vec::with_capacity(32);
                    b.iter_batched(
                        || msgs.clone(),
                        |msgs| {
                            let mut state = StreamState::new(Arc::clone(router));
                            for m in msgs {
                                state.on_message(m, &mut out).ok();
                            }
                            assert!(out.len() >= 2, "headers answer and body");
                            out.clear();
                            state
                        },
                        BatchSize::SmallInput,
                    );
                },
            );
        }
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_chat_body");
    for (size, name) in SIZES {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                InferenceRequest::parse(ApiKind::ChatCompletions, &body, RequestHints::default())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decision, parse);
criterion_main!(benches);
