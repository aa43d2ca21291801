//! How fast virtual time runs: the shipped Mooncake trace, repeated until it has
//! `KVROUTE_SIM_REQUESTS` requests (default 1,000,000; each copy's content ids shifted so
//! copies do not share content), through 16 `h100-llama3.1-8b` pods, round robin, on one
//! thread. Prints wall time and what the simulated cluster did. `KVROUTE_SIM_BLOCK_SIZE`
//! sets the cache block size (default vLLM's 16), `KVROUTE_SIM_SPEEDUP` compresses the
//! trace's time (default 4).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use kvroute_sim::{Cluster, PodView, Profile, PromptTokens, SimRequest};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let want: usize = std::env::var("KVROUTE_SIM_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let speedup: f64 = std::env::var("KVROUTE_SIM_SPEEDUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/mooncake_synthetic_trace.jsonl"
    );
    let trace: Vec<(u64, usize, usize, Arc<[u64]>)> = std::fs::read_to_string(path)
        .expect("the shipped trace")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids: Vec<u64> = v["hash_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                v["timestamp"].as_u64().unwrap(),
                v["input_length"].as_u64().unwrap() as usize,
                v["output_length"].as_u64().unwrap() as usize,
                Arc::from(ids),
            )
        })
        .collect();
    let span_ms = trace.last().unwrap().0 + 1;
    let copies = want.div_ceil(trace.len());
    let arrivals = (0..copies)
        .flat_map(|c| {
            trace.iter().map(move |(ts, input, output, ids)| {
                let shifted: Arc<[u64]> =
                    ids.iter().map(|i| i + c as u64 * 1_000_000_000).collect();
                let t_us = ((ts + c as u64 * span_ms) as f64 * 1000.0 / speedup) as u64;
                (
                    t_us,
                    SimRequest {
                        id: 0,
                        prompt: PromptTokens::Synthetic {
                            ids: shifted,
                            unit: 512,
                            len: *input,
                        },
                        max_tokens: (*output).max(1),
                        lora: None,
                    },
                )
            })
        })
        .take(want);
    let block_size: usize = std::env::var("KVROUTE_SIM_BLOCK_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let profile = Profile::h100_llama31_8b().with_block_size(block_size);
    let mut cluster = Cluster::new(&profile, 16, false);
    let mut next = 0usize;
    let mut rr = |_: u64, _: &SimRequest, pods: &[PodView]| {
        next = (next + 1) % pods.len();
        next
    };
    let started = Instant::now();
    let results = cluster.run(arrivals, &mut rr);
    let wall = started.elapsed();
    let done = results.iter().filter(|r| r.finish_us.is_some()).count();
    let prompt: usize = results.iter().map(|r| r.prompt_tokens).sum();
    let cached: usize = results.iter().map(|r| r.cached_tokens).sum();
    let output: usize = results.iter().map(|r| r.output_tokens).sum();
    let last = results
        .iter()
        .filter_map(|r| r.finish_us)
        .max()
        .unwrap_or(0);
    let mut ttft: Vec<u64> = results
        .iter()
        .filter_map(|r| Some(r.first_token_us? - r.arrival_us))
        .collect();
    ttft.sort_unstable();
    println!(
        "virtual time, {block_size}-token blocks: {} requests ({done} finished) through 16 pods in {:.1?} wall ({:.0} requests/s); simulated {:.1} h, {:.2}G prompt tokens ({:.1}% cached), {:.1}M output tokens, TTFT p50 {:.0} ms p99 {:.0} ms",
        results.len(),
        wall,
        results.len() as f64 / wall.as_secs_f64(),
        last as f64 / 3.6e9,
        prompt as f64 / 1e9,
        100.0 * cached as f64 / prompt.max(1) as f64,
        output as f64 / 1e6,
        ttft[ttft.len() / 2] as f64 / 1000.0,
        ttft[ttft.len() * 99 / 100] as f64 / 1000.0,
    );
}
