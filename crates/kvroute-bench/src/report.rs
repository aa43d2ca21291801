use std::time::Instant;

use kvroute_sim::{Cluster, Profile};
use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::replicas::{Deployment, Replicas};
use crate::trace::{TraceRequest, arrivals};

/// How load is offered to the cluster.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// The trace's own arrival times, divided by `speedup`, the trace repeated `copies`
    /// times. TTFT at a stated load; throughput only shows once the cluster saturates.
    Open {
        /// Time compression.
        speedup: f64,
        /// Repetitions of the trace.
        copies: usize,
    },
    /// `users` users each sending the trace's next request `think_ms` after their last one
    /// finished, the trace repeated `copies` times: throughput at a fixed concurrency.
    Closed {
        /// Concurrent users.
        users: usize,
        /// Pause between a user's requests.
        think_ms: u64,
        /// Repetitions of the trace.
        copies: usize,
    },
}

/// The JSON document `kvroute bench --json` writes: one workload on one cluster, every
/// policy's report. Its schema is documented in `docs/benchmarks.md` ("JSON output") and
/// named by [`BenchReport::SCHEMA`]; fields are only ever added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Always [`BenchReport::SCHEMA`].
    pub schema: String,
    /// What was replayed and how (the table's title).
    pub title: String,
    /// The simulated pods' profile.
    pub profile: String,
    /// Simulated pods.
    pub pods: usize,
    /// Their KV-cache block size, tokens.
    pub block_size: usize,
    /// One report per policy, in the order run.
    pub policies: Vec<PolicyReport>,
}

impl BenchReport {
    /// The schema's name and version.
    pub const SCHEMA: &'static str = "kvroute-bench/1";
}

/// What one policy did to one workload on one cluster. Times in milliseconds unless named
/// otherwise; latency figures are 0 when no request finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// The policy.
    pub policy: String,
    /// Requests replayed.
    pub requests: usize,
    /// Requests that finished (the rest were refused: prompt larger than the KV cache).
    pub finished: usize,
    /// Time to first token, percentiles.
    pub ttft_p50_ms: f64,
    /// 90th percentile TTFT.
    pub ttft_p90_ms: f64,
    /// 99th percentile TTFT.
    pub ttft_p99_ms: f64,
    /// TTFT at each percentile 0, 1, …, 100 (101 values): the CDF the chart draws.
    pub ttft_cdf_ms: Vec<f64>,
    /// Mean time per output token after the first.
    pub tpot_mean_ms: f64,
    /// 90th percentile over requests of their time per output token after the first: how
    /// much prefills sharing a pod's steps slow its running requests down.
    pub tpot_p90_ms: f64,
    /// End-to-end latency, median.
    pub e2e_p50_ms: f64,
    /// End-to-end latency, 99th percentile.
    pub e2e_p99_ms: f64,
    /// Output tokens per second of simulated time, over the whole run.
    pub output_tokens_per_s: f64,
    /// Finished requests per second of simulated time.
    pub requests_per_s: f64,
    /// Prompt tokens served from the prefix cache / prompt tokens.
    pub hit_rate: f64,
    /// Prompt tokens of the finished requests.
    pub prompt_tokens: u64,
    /// Of those, tokens served from the prefix cache.
    pub cached_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
    /// Preemptions over the run (a request preempted twice counts twice): each one frees a
    /// running request's KV cache and recomputes it later, work a router that packs every
    /// pod to the edge of its cache makes its pods do again.
    #[serde(default)]
    pub preemptions: u64,
    /// Busiest pod's busy time / mean busy time (1 = perfectly even).
    pub imbalance: f64,
    /// The router's own decision time, median, microseconds; `null` for policies that
    /// decide without looking (round-robin, random).
    pub decision_p50_us: Option<f64>,
    /// The router's own decision time, 99th percentile, microseconds.
    pub decision_p99_us: Option<f64>,
    /// Router replicas sharing the requests (`--replicas`; absent in reports before it).
    #[serde(default = "one")]
    pub replicas: usize,
    /// With several replicas: the share of (request, replica that did not receive it) pairs
    /// where that replica would have chosen the same pod; `null` otherwise.
    #[serde(default)]
    pub agreement: Option<f64>,
    /// In a goodput search (`--goodput-slo-ms`): the arrival rate offered to the pods in the
    /// run kept, requests per second, which is what goodput is (`requests_per_s` is what
    /// finished over the run, drain included, and falls short of it by the tail's length);
    /// `null` otherwise.
    #[serde(default)]
    pub offered_requests_per_s: Option<f64>,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Each part's own TTFT on a mixed workload (`--workload mixed`), in the workload's
    /// order; empty otherwise. One percentile over the whole mix hides which part pays.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartReport>,
}

/// The TTFT one part of a mixed workload got (its finished requests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartReport {
    /// The part's index in the mixed workload.
    pub part: u8,
    /// Its requests that finished.
    pub finished: usize,
    /// TTFT percentiles and mean, milliseconds.
    pub ttft_p50_ms: f64,
    /// 90th percentile TTFT.
    pub ttft_p90_ms: f64,
    /// 99th percentile TTFT.
    pub ttft_p99_ms: f64,
    /// Mean TTFT.
    pub ttft_mean_ms: f64,
}

/// Each part's TTFTs from `(part, ttft_ms)` pairs, parts in index order.
fn part_reports(mut ttfts: Vec<(u8, f64)>) -> Vec<PartReport> {
    ttfts.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    ttfts
        .chunk_by(|a, b| a.0 == b.0)
        .map(|run| {
            let v: Vec<f64> = run.iter().map(|&(_, t)| t).collect();
            let pct = |p| percentile(&v, p).unwrap_or(0.0);
            PartReport {
                part: run[0].0,
                finished: v.len(),
                ttft_p50_ms: pct(0.5),
                ttft_p90_ms: pct(0.9),
                ttft_p99_ms: pct(0.99),
                ttft_mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            }
        })
        .collect()
}

fn one() -> usize {
    1
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Bandwidth of the KV transfer between a prefill and a decode pod (NIXL over one 200 Gb/s
/// RDMA NIC, about 25 GB/s delivered).
const KV_TRANSFER_BYTES_PER_US: f64 = 25_000.0;

/// Microseconds to move one prompt token's KV between pods of `profile`: its KV bytes per
/// token (2 × layers × KV heads × head dim × 2 bytes, bf16) over the link. 0 for profiles
/// of unknown shape (the tiny test profile).
fn kv_transfer_us_per_token(profile: &Profile) -> f64 {
    let bytes: f64 = match profile.name {
        // Llama 3.1 8B: 32 layers, 8 KV heads of 128.
        "h100-llama3.1-8b" => 2.0 * 32.0 * 8.0 * 128.0 * 2.0,
        // Llama 3.1 70B: 80 layers, 8 KV heads of 128.
        "mi300x-llama3.1-70b-tp4" => 2.0 * 80.0 * 8.0 * 128.0 * 2.0,
        _ => 0.0,
    };
    bytes / KV_TRANSFER_BYTES_PER_US
}

/// Replays `trace` under `load` through `pods` simulated pods of `profile` under `policy`,
/// one router that knows only its own decisions.
pub fn run(
    trace: &[TraceRequest],
    profile: &Profile,
    pods: usize,
    policy: Policy,
    load: Load,
) -> PolicyReport {
    run_deployed(trace, profile, pods, policy, load, Deployment::default())
}

/// [`run`] with the router deployed as `deployment` says (replicas, scraped pod load).
pub fn run_deployed(
    trace: &[TraceRequest],
    profile: &Profile,
    pods: usize,
    policy: Policy,
    load: Load,
    deployment: Deployment,
) -> PolicyReport {
    let started = Instant::now();
    let mut router = Replicas::new(policy, pods, profile, deployment);
    let slow = profile
        .clone()
        .slowed(f64::from(deployment.slowdown_pct) / 100.0);
    let profiles = (0..pods)
        .map(|i| {
            if i < deployment.slow_pods {
                slow.clone()
            } else {
                profile.clone()
            }
        })
        .collect();
    let mut cluster = Cluster::mixed(profiles, policy.uses_events())
        .with_transfer_us_per_token(kv_transfer_us_per_token(profile));
    let results = match load {
        Load::Open { speedup, copies } => {
            cluster.run(arrivals(trace, speedup, copies), &mut router)
        }
        Load::Closed {
            users,
            think_ms,
            copies,
        } => cluster.run_closed(
            users,
            think_ms * 1000,
            arrivals(trace, 1.0, copies).map(|(_, r)| r),
            &mut router,
        ),
    };
    let wall_s = started.elapsed().as_secs_f64();

    let done: Vec<_> = results.iter().filter(|r| r.finish_us.is_some()).collect();
    let ms = |us: u64| us as f64 / 1000.0;
    let mut ttft: Vec<f64> = done
        .iter()
        .filter_map(|r| Some(ms(r.first_token_us? - r.arrival_us)))
        .collect();
    // Requests are numbered in arrival order, the trace's (copy after copy).
    let part_of = |id: u64| {
        let i = usize::try_from(id).ok()? % trace.len().max(1);
        trace.get(i)?.part
    };
    let parts = part_reports(
        done.iter()
            .filter_map(|r| Some((part_of(r.id)?, ms(r.first_token_us? - r.arrival_us))))
            .collect(),
    );
    ttft.sort_by(f64::total_cmp);
    let mut e2e: Vec<f64> = done
        .iter()
        .filter_map(|r| Some(ms(r.finish_us? - r.arrival_us)))
        .collect();
    e2e.sort_by(f64::total_cmp);
    let mut tpot: Vec<f64> = done
        .iter()
        .filter(|r| r.output_tokens > 1)
        .filter_map(|r| Some(ms(r.finish_us? - r.first_token_us?) / (r.output_tokens - 1) as f64))
        .collect();
    tpot.sort_by(f64::total_cmp);
    let first = results.iter().map(|r| r.arrival_us).min().unwrap_or(0);
    let last = done
        .iter()
        .filter_map(|r| r.finish_us)
        .max()
        .unwrap_or(first);
    let span_s = ((last - first) as f64 / 1e6).max(1e-9);
    let output: usize = done.iter().map(|r| r.output_tokens).sum();
    let prompt: usize = done.iter().map(|r| r.prompt_tokens).sum();
    let cached: usize = done.iter().map(|r| r.cached_tokens).sum();
    let busy = router.busy_us();
    let mean_busy = busy.iter().sum::<u64>() as f64 / busy.len().max(1) as f64;
    let max_busy = busy.iter().copied().max().unwrap_or(0) as f64;
    let mut decisions: Vec<f64> = router.decision_ns().map(|n| n as f64 / 1000.0).collect();
    decisions.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| percentile(v, p).unwrap_or(0.0);
    PolicyReport {
        policy: policy.name().to_owned(),
        requests: results.len(),
        finished: done.len(),
        ttft_p50_ms: pct(&ttft, 0.5),
        ttft_p90_ms: pct(&ttft, 0.9),
        ttft_p99_ms: pct(&ttft, 0.99),
        ttft_cdf_ms: (0..=100)
            .map(|p| pct(&ttft, f64::from(p) / 100.0))
            .collect(),
        tpot_mean_ms: tpot.iter().sum::<f64>() / tpot.len().max(1) as f64,
        tpot_p90_ms: pct(&tpot, 0.9),
        e2e_p50_ms: pct(&e2e, 0.5),
        e2e_p99_ms: pct(&e2e, 0.99),
        output_tokens_per_s: output as f64 / span_s,
        requests_per_s: done.len() as f64 / span_s,
        hit_rate: cached as f64 / prompt.max(1) as f64,
        prompt_tokens: prompt as u64,
        cached_tokens: cached as u64,
        output_tokens: output as u64,
        preemptions: results.iter().map(|r| u64::from(r.preemptions)).sum(),
        imbalance: if mean_busy > 0.0 {
            max_busy / mean_busy
        } else {
            1.0
        },
        decision_p50_us: percentile(&decisions, 0.5),
        decision_p99_us: percentile(&decisions, 0.99),
        replicas: deployment.replicas.max(1),
        agreement: router.agreement(),
        offered_requests_per_s: None,
        wall_s,
        parts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 24 tenants, each with a shared 8-block (4k-token) document, asking questions, on 4
    /// pods that hold 48 blocks each: one pod cannot keep every tenant's document (round
    /// robin thrashes), but tenants split over the pods fit.
    fn trace() -> Vec<TraceRequest> {
        (0..400u64)
            .map(|i| {
                // Tenants in a scrambled order, so no policy gets affinity by accident.
                let tenant = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 24;
                let mut hash_ids: Vec<u64> = (0..8).map(|b| tenant * 100 + b).collect();
                hash_ids.push(10_000 + i);
                TraceRequest {
                    timestamp: i * 40,
                    input_length: 8 * 512 + 200,
                    output_length: 20,
                    hash_ids,
                    adapter: None,
                    part: None,
                }
            })
            .collect()
    }

    const OPEN: Load = Load::Open {
        speedup: 1.0,
        copies: 1,
    };

    #[test]
    fn closed_loop_shows_throughput() {
        let trace = trace();
        let load = Load::Closed {
            users: 16,
            think_ms: 0,
            copies: 1,
        };
        let rr = run(&trace, &small_cache(), 4, Policy::RoundRobin, load);
        let kv = run(&trace, &small_cache(), 4, Policy::Kvroute, load);
        assert_eq!((rr.finished, kv.finished), (400, 400));
        assert!(
            kv.output_tokens_per_s > rr.output_tokens_per_s * 1.2,
            "cache hits free prefill time for more output: {kv:?} vs {rr:?}"
        );
    }

    fn small_cache() -> Profile {
        Profile {
            kv_blocks: 48,
            ..Profile::h100_llama31_8b().with_block_size(512)
        }
    }

    #[test]
    fn prefix_policies_hit_the_cache_more_and_books_balance() {
        let trace = trace();
        let profile = small_cache();
        let reports: Vec<PolicyReport> = Policy::ALL
            .into_iter()
            .map(|p| run(&trace, &profile, 4, p, OPEN))
            .collect();
        let by = |name: &str| reports.iter().find(|r| r.policy == name).unwrap();
        for r in &reports {
            assert_eq!(r.requests, 400, "{r:?}");
            assert_eq!(r.finished, 400, "{r:?}");
            for v in [
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.tpot_mean_ms,
                r.output_tokens_per_s,
                r.hit_rate,
                r.imbalance,
            ] {
                assert!(v.is_finite() && v >= 0.0, "{r:?}");
            }
            assert!(r.ttft_p50_ms <= r.ttft_p90_ms && r.ttft_p90_ms <= r.ttft_p99_ms);
            assert!(r.imbalance >= 1.0);
        }
        // Every policy serves the same tokens: what went in came out.
        let prompt = trace.iter().map(|t| t.input_length as u64).sum::<u64>();
        let output = trace.iter().map(|t| t.output_length as u64).sum::<u64>();
        for r in &reports {
            assert_eq!(
                (r.prompt_tokens, r.output_tokens),
                (prompt, output),
                "{r:?}"
            );
            assert!(r.cached_tokens <= r.prompt_tokens);
            assert_eq!(r.ttft_cdf_ms.len(), 101);
            assert!(r.ttft_cdf_ms.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(r.ttft_cdf_ms[50], r.ttft_p50_ms);
            let looks = !matches!(r.policy.as_str(), "round-robin" | "random");
            assert_eq!(r.decision_p99_us.is_some(), looks, "{r:?}");
        }
        let rr = by("round-robin").hit_rate;
        assert!(by("kvroute").hit_rate > rr + 0.2, "{reports:#?}");
        for cache_aware in [
            "approx-prefix",
            "precise-prefix",
            "kvroute-approx",
            "sglang-cache-aware",
            "dynamo-kv",
        ] {
            assert!(by(cache_aware).hit_rate > rr, "{cache_aware}: {reports:#?}");
        }
        assert!(by("kvroute").ttft_p50_ms < by("round-robin").ttft_p50_ms);
    }

    #[test]
    fn the_json_document_round_trips() {
        let trace = trace();
        let report = BenchReport {
            schema: BenchReport::SCHEMA.into(),
            title: "test".into(),
            profile: "small".into(),
            pods: 2,
            block_size: 512,
            policies: [Policy::RoundRobin, Policy::Kvroute]
                .into_iter()
                .map(|p| run(&trace[..50], &small_cache(), 2, p, OPEN))
                .collect(),
        };
        let json = serde_json::to_string(&report).unwrap();
        let back: BenchReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        // Round-robin decides without looking: its decision time is null, not NaN.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(value["policies"][0]["decision_p99_us"].is_null());
        assert!(value["policies"][1]["decision_p99_us"].is_f64());
    }

    #[test]
    fn the_same_run_gives_the_same_numbers() {
        let trace = trace();
        let profile = small_cache();
        let a = run(&trace, &profile, 3, Policy::Random, OPEN);
        let b = run(&trace, &profile, 3, Policy::Random, OPEN);
        assert_eq!(
            (a.ttft_p50_ms, a.hit_rate, a.imbalance),
            (b.ttft_p50_ms, b.hit_rate, b.imbalance)
        );
    }

    /// Each part's figures are of its own requests only, parts in index order.
    #[test]
    fn parts_are_reported_each_of_its_own_requests() {
        let mut ttfts: Vec<(u8, f64)> = (1..=100).map(|t| (1, f64::from(t))).collect();
        ttfts.extend([(0, 5.0), (0, 7.0), (0, 6.0)]);
        let parts = part_reports(ttfts);
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].part, parts[0].finished), (0, 3));
        assert_eq!(parts[0].ttft_p50_ms, 6.0);
        assert_eq!(parts[0].ttft_mean_ms, 6.0);
        assert_eq!((parts[1].part, parts[1].finished), (1, 100));
        assert_eq!(parts[1].ttft_p90_ms, 90.0);
        assert_eq!(parts[1].ttft_p99_ms, 99.0);
        assert!(part_reports(Vec::new()).is_empty());
    }

    /// A run of a mixed workload reports each part, and its parts' requests add up to the
    /// run's; a trace that is not mixed reports none.
    #[test]
    fn a_mixed_run_is_reported_by_part() {
        const PARTS: &[(crate::Workload, f64)] = &[
            (
                crate::Workload::SharedPrompts {
                    tenants: 4,
                    system_units: 4,
                },
                0.5,
            ),
            (
                crate::Workload::SiblingBursts {
                    doc_units: 4,
                    siblings: 4,
                    window_ms: 50,
                },
                0.5,
            ),
        ];
        let mixed = crate::Workload::Mixed(PARTS).generate(300, 20.0, 8, 1);
        let profile = small_cache();
        let r = run(&mixed, &profile, 2, Policy::RoundRobin, OPEN);
        assert_eq!(r.parts.len(), 2);
        assert_eq!(
            r.parts.iter().map(|p| p.finished).sum::<usize>(),
            r.finished
        );
        assert!(r.parts.iter().all(|p| p.ttft_p50_ms > 0.0));
        assert!(
            run(&trace(), &profile, 2, Policy::RoundRobin, OPEN)
                .parts
                .is_empty()
        );
    }
}
