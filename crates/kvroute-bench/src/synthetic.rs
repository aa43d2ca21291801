//! Seeded synthetic workloads in the trace's own shape (`TraceRequest`: content ids of
//! 512-token units), so they replay through the same path as a Mooncake trace. Equal ids
//! mean shared content; every generator is deterministic for a given seed.

use crate::trace::TraceRequest;

/// A small, seeded generator (xorshift64*): runs repeat exactly.
#[derive(Debug)]
pub(crate) struct Rng(u64);

/// Gaps between arrivals: Poisson (exponential gaps), or burstier or smoother at the same
/// mean rate (gamma gaps, as vLLM's `benchmark_serving --burstiness`).
#[derive(Debug)]
struct Arrivals {
    /// The gamma distribution's shape: 1 is Poisson, below 1 burstier (coefficient of
    /// variation `1/sqrt(shape)`), above 1 more even.
    shape: f64,
}

impl Arrivals {
    /// A gap with mean `mean_ms`. Poisson draws exactly as [`Rng::gap_ms`] always did, so
    /// runs recorded before `--burstiness` repeat.
    fn gap_ms(&self, rng: &mut Rng, mean_ms: f64) -> u64 {
        if self.shape == 1.0 {
            return rng.gap_ms(mean_ms);
        }
        (rng.gamma(self.shape) * mean_ms / self.shape) as u64
    }
}

impl Rng {
    /// A generator seeded with `seed`, every seed its own stream. An odd seed is the state
    /// itself (as it always was, so recorded runs repeat); an even one is mixed first
    /// (SplitMix64's finalizer): `seed | 1` used to fold it onto the next odd seed, so
    /// seeds 2 and 3 gave the same workload. The state is never 0, where xorshift stays.
    pub(crate) fn new(seed: u64) -> Self {
        if seed & 1 == 1 {
            return Self(seed);
        }
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n at least 1).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal variate (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// A gamma variate of shape `k` (> 0) and scale 1: Marsaglia and Tsang's method, with
    /// `Gamma(k) = Gamma(k + 1) · U^(1/k)` below 1.
    fn gamma(&mut self, k: f64) -> f64 {
        if k < 1.0 {
            let u = 1.0 - self.unit();
            return self.gamma(k + 1.0) * u.powf(1.0 / k);
        }
        let d = k - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Exponential inter-arrival gap with mean `mean_ms` (Poisson arrivals).
    fn gap_ms(&mut self, mean_ms: f64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-(1.0 - u).ln() * mean_ms) as u64
    }
}

/// Which synthetic workload, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    /// `tenants` system prompts of `system_units` units each; each request is one tenant's
    /// system prompt plus a fresh question of one unit.
    SharedPrompts {
        /// Distinct system prompts.
        tenants: u64,
        /// Units (512 tokens) per system prompt.
        system_units: u64,
    },
    /// `conversations` chats whose history grows each turn: turn k's prompt is every
    /// earlier turn's prompt and answer, plus a new question.
    MultiTurn {
        /// Concurrent conversations.
        conversations: u64,
        /// Turns per conversation.
        turns: u64,
        /// Units (512 tokens) a conversation opens with (a system prompt, a pasted document
        /// or code), drawn uniformly from this range, both ends included.
        opening_units: (u64, u64),
    },
    /// `docs` long documents of `doc_units` units, each request one question about one.
    DocQa {
        /// Distinct documents.
        docs: u64,
        /// Units (512 tokens) per document.
        doc_units: u64,
    },
    /// Long conversations that come back rarely: each opens with 4–80 units of its own
    /// (2k–40k tokens) and returns `turns − 1` times, each after an exponential pause of
    /// mean `revisit_s` seconds, by when the pods have mostly evicted it. Little reuse: a
    /// router wins here by balancing prefill work, not by affinity.
    LongRevisits {
        /// Requests per conversation.
        turns: u64,
        /// Mean pause before a conversation's next turn, seconds.
        revisit_s: u64,
    },
    /// Bursts on prompts no pod has seen: a fresh document of `doc_units` units, asked
    /// `siblings` questions that all arrive within `window_ms` of the first. A router that
    /// keeps a burst together lets later siblings hit blocks the first is still prefilling.
    SiblingBursts {
        /// Units (512 tokens) per document.
        doc_units: u64,
        /// Requests per burst.
        siblings: u64,
        /// Spread of a burst's arrivals, milliseconds.
        window_ms: u64,
    },
    /// Requests for `adapters` LoRA adapters of skewed popularity (Zipf, exponent 1: the
    /// k-th most popular is asked 1/k as often as the first), each a fresh prompt of 1 to
    /// `units` units sharing nothing: only where an adapter is already loaded, and how many
    /// a pod's batch may hold at once, tells pods apart.
    Lora {
        /// Distinct adapters.
        adapters: u32,
        /// Most units (512 tokens) per prompt.
        units: u64,
    },
    /// Several workloads at once on one pool, each with its share of the requests and of
    /// the rate, in content of its own: a pool serves chats, tenants' system prompts,
    /// document bursts and long sessions side by side, and a router tuned on each alone may
    /// not hold on them together (a long prefill queued where a chat's history is).
    Mixed(&'static [(Workload, f64)]),
}

impl Workload {
    /// The generator's name: the `--workload` it serves (`shared-prompts` also serves
    /// `many-tenants`, `multi-turn` also `long-chats`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::SharedPrompts { .. } => "shared-prompts",
            Self::MultiTurn { .. } => "multi-turn",
            Self::DocQa { .. } => "doc-qa",
            Self::LongRevisits { .. } => "long-revisits",
            Self::SiblingBursts { .. } => "sibling-bursts",
            Self::Lora { .. } => "lora",
            Self::Mixed(_) => "mixed",
        }
    }

    /// `requests` requests of this workload arriving at `rate` per second on average
    /// (Poisson), each generating `output` tokens.
    pub fn generate(
        self,
        requests: usize,
        rate: f64,
        output: usize,
        seed: u64,
    ) -> Vec<TraceRequest> {
        self.generate_bursty(requests, rate, output, seed, 1.0)
    }

    /// [`Workload::generate`] with arrivals (of requests, conversations, bursts) gamma
    /// distributed of shape `burstiness`: 1 is Poisson, 0.25 four times as variable. A
    /// conversation's pause before coming back (`long-revisits`) stays exponential.
    pub fn generate_bursty(
        self,
        requests: usize,
        rate: f64,
        output: usize,
        seed: u64,
        burstiness: f64,
    ) -> Vec<TraceRequest> {
        let arrivals = Arrivals {
            shape: if burstiness.is_finite() && burstiness > 0.0 {
                burstiness
            } else {
                1.0
            },
        };
        let mut rng = Rng::new(seed);
        let mean_gap = 1000.0 / rate.max(1e-6);
        let mut t = 0;
        let mut fresh = 1u64 << 40;
        let mut next_fresh = || {
            fresh += 1;
            fresh
        };
        match self {
            Self::SharedPrompts {
                tenants,
                system_units,
            } => {
                let prefix = |tenant: u64, u: u64| tenant * 1000 + u;
                let mut arrive = || {
                    t += arrivals.gap_ms(&mut rng, mean_gap);
                    (t, rng.below(tenants))
                };
                shared_prefix(
                    requests,
                    system_units,
                    200,
                    output,
                    prefix,
                    &mut arrive,
                    &mut next_fresh,
                )
            }
            Self::MultiTurn {
                conversations,
                turns,
                opening_units: (lo, hi),
            } => {
                let (lo, hi) = (lo.max(1), hi.max(lo.max(1)));
                let opening = |rng: &mut Rng, first: u64, fresh: &mut dyn FnMut() -> u64| {
                    // No draw for a fixed length: `multi-turn`'s runs repeat as recorded.
                    let n = if hi > lo {
                        lo + rng.below(hi - lo + 1)
                    } else {
                        lo
                    };
                    std::iter::once(first)
                        .chain((1..n).map(|_| fresh()))
                        .collect::<Vec<u64>>()
                };
                // Each conversation keeps its history; a request picks a conversation that
                // has turns left, so histories grow as the run goes on.
                let mut history: Vec<Vec<u64>> = (0..conversations)
                    .map(|c| opening(&mut rng, 1_000_000 + c, &mut next_fresh))
                    .collect();
                let mut taken = vec![0u64; conversations as usize];
                let mut out = Vec::with_capacity(requests);
                while out.len() < requests {
                    let c = rng.below(conversations) as usize;
                    if taken[c] >= turns {
                        // Start this conversation over with a new opening.
                        taken[c] = 0;
                        let first = next_fresh();
                        history[c] = opening(&mut rng, first, &mut next_fresh);
                    }
                    taken[c] += 1;
                    history[c].push(next_fresh()); // the new question
                    t += arrivals.gap_ms(&mut rng, mean_gap);
                    out.push(TraceRequest {
                        timestamp: t,
                        input_length: history[c].len() * 512 - 100,
                        output_length: output,
                        hash_ids: history[c].clone(),
                        adapter: None,
                        part: None,
                    });
                    history[c].push(next_fresh()); // the answer joins the history
                }
                out
            }
            Self::DocQa { docs, doc_units } => {
                let prefix = |doc: u64, u: u64| 2_000_000 + doc * 10_000 + u;
                let mut arrive = || {
                    t += arrivals.gap_ms(&mut rng, mean_gap);
                    (t, rng.below(docs))
                };
                shared_prefix(
                    requests,
                    doc_units,
                    300,
                    output,
                    prefix,
                    &mut arrive,
                    &mut next_fresh,
                )
            }
            Self::LongRevisits { turns, revisit_s } => {
                let turns = turns.max(1);
                // Conversations start at rate / turns, so requests come at `rate` overall.
                let start_gap = mean_gap * turns as f64;
                // Conversations start `warm` ms before the first request kept, so revisits
                // of earlier conversations are there from the start (steady state), and keep
                // starting until `requests` requests have arrived by the latest start.
                let warm = turns.saturating_sub(1) * revisit_s * 1000 * 3;
                let mut out: Vec<TraceRequest> = Vec::with_capacity(requests * 2);
                let kept = |out: &[TraceRequest], t: u64| {
                    out.iter()
                        .filter(|r| (warm..=t).contains(&r.timestamp))
                        .count()
                };
                while kept(&out, t) < requests {
                    t += arrivals.gap_ms(&mut rng, start_gap);
                    let mut history: Vec<u64> =
                        (0..4 + rng.below(77)).map(|_| next_fresh()).collect();
                    let mut at = t;
                    for turn in 0..turns {
                        if turn > 0 {
                            at += rng.gap_ms(revisit_s as f64 * 1000.0);
                            history.push(next_fresh()); // the last answer
                            history.push(next_fresh()); // the new question
                        }
                        out.push(TraceRequest {
                            timestamp: at,
                            input_length: history.len() * 512 - 100,
                            output_length: output,
                            hash_ids: history.clone(),
                            adapter: None,
                            part: None,
                        });
                    }
                }
                out.retain(|r| r.timestamp >= warm);
                out.iter_mut().for_each(|r| r.timestamp -= warm);
                by_arrival(out, requests)
            }
            Self::SiblingBursts {
                doc_units,
                siblings,
                window_ms,
            } => {
                let siblings = siblings.max(1);
                let burst_gap = mean_gap * siblings as f64;
                let mut out = Vec::with_capacity(requests + siblings as usize);
                while out.len() < requests {
                    t += arrivals.gap_ms(&mut rng, burst_gap);
                    let doc: Vec<u64> = (0..doc_units).map(|_| next_fresh()).collect();
                    for i in 0..siblings {
                        let mut ids = doc.clone();
                        ids.push(next_fresh());
                        let offset = if i == 0 { 0 } else { rng.below(window_ms + 1) };
                        out.push(TraceRequest {
                            timestamp: t + offset,
                            input_length: ids.len() * 512 - 300,
                            output_length: output,
                            hash_ids: ids,
                            adapter: None,
                            part: None,
                        });
                    }
                }
                by_arrival(out, requests)
            }
            Self::Mixed(parts) => {
                let total: f64 = parts.iter().map(|&(_, share)| share.max(0.0)).sum();
                let mut out = Vec::new();
                for (k, &(part, share)) in (0u8..).zip(parts) {
                    let share = share.max(0.0) / total.max(f64::MIN_POSITIVE);
                    // A quarter more than its share: every part still arrives when the
                    // merged run is cut at `requests`, whatever its own run's length.
                    let n = (requests as f64 * share * 1.25).ceil() as usize;
                    // Content of its own: every generator's ids stay below 2^48.
                    let shift = (u64::from(k) + 1) << 48;
                    let mut reqs = part.generate_bursty(
                        n,
                        rate * share,
                        output,
                        seed ^ (u64::from(k) << 32),
                        burstiness,
                    );
                    for r in &mut reqs {
                        r.hash_ids.iter_mut().for_each(|id| *id += shift);
                        r.part = Some(k);
                    }
                    out.extend(reqs);
                }
                by_arrival(out, requests)
            }
            Self::Lora { adapters, units } => {
                let adapters = adapters.max(1);
                let mut cumulative = Vec::with_capacity(adapters as usize);
                let mut total = 0.0;
                for k in 1..=adapters {
                    total += 1.0 / f64::from(k);
                    cumulative.push(total);
                }
                (0..requests)
                    .map(|_| {
                        t += arrivals.gap_ms(&mut rng, mean_gap);
                        let u = rng.unit() * total;
                        let adapter = cumulative.partition_point(|&c| c <= u) as u32;
                        let ids: Vec<u64> = (0..1 + rng.below(units.max(1)))
                            .map(|_| next_fresh())
                            .collect();
                        TraceRequest {
                            timestamp: t,
                            input_length: ids.len() * 512 - 100,
                            output_length: output,
                            hash_ids: ids,
                            adapter: Some(adapter.min(adapters - 1)),
                            part: None,
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The first `requests` of `out` in arrival order.
fn by_arrival(mut out: Vec<TraceRequest>, requests: usize) -> Vec<TraceRequest> {
    out.sort_by_key(|r| r.timestamp);
    out.truncate(requests);
    out
}

/// Requests that each open with one group's `units` shared units (`prefix(group, unit)`)
/// and end with a fresh unit cut `cut` tokens short; `arrive` gives each request's arrival
/// time and group.
fn shared_prefix(
    requests: usize,
    units: u64,
    cut: usize,
    output: usize,
    prefix: impl Fn(u64, u64) -> u64,
    arrive: &mut dyn FnMut() -> (u64, u64),
    fresh: &mut dyn FnMut() -> u64,
) -> Vec<TraceRequest> {
    (0..requests)
        .map(|_| {
            let (timestamp, group) = arrive();
            let mut ids: Vec<u64> = (0..units).map(|u| prefix(group, u)).collect();
            ids.push(fresh());
            TraceRequest {
                timestamp,
                input_length: ids.len() * 512 - cut,
                output_length: output,
                hash_ids: ids,
                adapter: None,
                part: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {

    /// Every seed gives its own stream (seeds 2 and 3 used to give one), and odd seeds the
    /// streams they always gave.
    #[test]
    fn every_seed_is_its_own_stream() {
        let streams: std::collections::HashSet<Vec<u64>> = (0..512)
            .map(|seed| {
                let mut r = Rng::new(seed);
                (0..4).map(|_| r.next()).collect()
            })
            .collect();
        assert_eq!(streams.len(), 512);
        assert_eq!(Rng::new(3).0, 3);
    }
    use super::*;

    #[test]
    fn seeded_and_shaped_as_described() {
        let w = Workload::SharedPrompts {
            tenants: 4,
            system_units: 3,
        };
        let a = w.generate(100, 10.0, 8, 7);
        assert_eq!(a, w.generate(100, 10.0, 8, 7), "same seed, same workload");
        assert_ne!(a, w.generate(100, 10.0, 8, 8));
        assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
        let systems: std::collections::HashSet<u64> = a.iter().map(|r| r.hash_ids[0]).collect();
        assert!(systems.len() <= 4);
        assert!(
            a.iter()
                .all(|r| r.hash_ids.len() == 4 && r.input_length <= 4 * 512)
        );

        let chats = Workload::MultiTurn {
            conversations: 3,
            turns: 4,
            opening_units: (1, 1),
        }
        .generate(30, 10.0, 8, 1);
        // A later turn of a conversation extends an earlier turn's prompt.
        let extends = chats.iter().enumerate().any(|(i, later)| {
            chats[..i].iter().any(|earlier| {
                later.hash_ids.len() > earlier.hash_ids.len()
                    && later.hash_ids.starts_with(&earlier.hash_ids)
            })
        });
        assert!(extends);

        // A fixed opening is the one content id each conversation starts with.
        assert!(chats.iter().all(|r| r.hash_ids.len() % 2 == 0));

        // Long chats open with 8–48 units and grow by two a turn.
        let long = Workload::MultiTurn {
            conversations: 16,
            turns: 5,
            opening_units: (8, 48),
        }
        .generate(400, 10.0, 8, 2);
        let openings: Vec<usize> = long
            .iter()
            .filter(|r| {
                !long.iter().any(|e| {
                    e.hash_ids.len() < r.hash_ids.len() && r.hash_ids.starts_with(&e.hash_ids)
                })
            })
            .map(|r| r.hash_ids.len() - 1)
            .collect();
        assert!(openings.len() >= 80, "{}", openings.len());
        assert!(
            openings.iter().all(|n| (8..=48).contains(n)),
            "{openings:?}"
        );
        assert!(openings.iter().any(|&n| n < 20) && openings.iter().any(|&n| n > 36));
        // The longest: a 48-unit opening, its first question, and four turns of two units.
        assert!(long.iter().all(|r| r.hash_ids.len() <= 49 + 2 * 4));

        let qa = Workload::DocQa {
            docs: 2,
            doc_units: 16,
        }
        .generate(20, 10.0, 8, 3);
        assert!(qa.iter().all(|r| r.hash_ids.len() == 17));
    }

    /// Gamma gaps keep the mean rate and vary as their shape says: a coefficient of
    /// variation of `1/sqrt(shape)`, 2 at 0.25 and 0.5 at 4 (Poisson's is 1).
    #[test]
    fn bursty_arrivals_keep_the_rate_and_vary_as_their_shape_says() {
        let w = Workload::SharedPrompts {
            tenants: 4,
            system_units: 1,
        };
        for (shape, cv) in [(0.25, 2.0), (1.0, 1.0), (4.0, 0.5)] {
            let a = w.generate_bursty(40_000, 100.0, 8, 3, shape);
            let gaps: Vec<f64> = a
                .windows(2)
                .map(|p| (p[1].timestamp - p[0].timestamp) as f64)
                .collect();
            let n = gaps.len() as f64;
            let mean = gaps.iter().sum::<f64>() / n;
            let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n).sqrt();
            // 10 ms on average; gaps are whole milliseconds, rounded down.
            assert!((9.0..10.5).contains(&mean), "shape {shape}: mean {mean}");
            assert!(
                (sd / mean - cv).abs() < 0.12 * cv,
                "shape {shape}: cv {} against {cv}",
                sd / mean
            );
        }
        // Poisson is what `generate` always drew.
        assert_eq!(
            w.generate_bursty(500, 10.0, 8, 5, 1.0),
            w.generate(500, 10.0, 8, 5)
        );
        // A shape that is no shape falls back to Poisson.
        assert_eq!(
            w.generate_bursty(500, 10.0, 8, 5, f64::NAN),
            w.generate(500, 10.0, 8, 5)
        );
    }

    #[test]
    fn long_revisits_come_back_minutes_later_with_long_prompts() {
        let w = Workload::LongRevisits {
            turns: 3,
            revisit_s: 180,
        };
        let a = w.generate(3000, 2.0, 8, 5);
        assert_eq!(a.len(), 3000);
        assert_eq!(a, w.generate(3000, 2.0, 8, 5));
        assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
        assert!(
            a.iter().all(|r| (1_900..=43_000).contains(&r.input_length)),
            "2k-40k-token openings, plus two units a turn"
        );
        // A revisit extends its opening, and comes long after it.
        let mut pauses = Vec::new();
        for (i, later) in a.iter().enumerate() {
            if let Some(first) = a[..i].iter().find(|e| e.hash_ids[0] == later.hash_ids[0]) {
                assert!(later.hash_ids.starts_with(&first.hash_ids[..4]));
                pauses.push(later.timestamp - first.timestamp);
            }
        }
        // Two of three requests are revisits; those whose opening is in the run too come
        // minutes after it (fewer than 180 s on average: a pair must fit in the run).
        assert!(pauses.len() > 1500, "{} revisits", pauses.len());
        let mean_s = pauses.iter().sum::<u64>() as f64 / pauses.len() as f64 / 1000.0;
        assert!(
            mean_s > 120.0,
            "revisits {mean_s:.0} s after the opening on average"
        );
        // Requests come at about the rate asked from the start: 3,000 at 2/s, over about
        // 1,500 s, and as many in the first half as in the second.
        let span_s = (a[2999].timestamp - a[0].timestamp) as f64 / 1000.0;
        assert!((1300.0..1700.0).contains(&span_s), "{span_s:.0} s");
        let first_half = a
            .iter()
            .filter(|r| r.timestamp < a[2999].timestamp / 2)
            .count();
        assert!((1300..1700).contains(&first_half), "{first_half}");
    }

    #[test]
    fn lora_requests_name_adapters_by_skewed_popularity_and_share_nothing() {
        let w = Workload::Lora {
            adapters: 16,
            units: 4,
        };
        let a = w.generate(4000, 8.0, 8, 3);
        assert_eq!(a, w.generate(4000, 8.0, 8, 3));
        assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
        let mut per = [0usize; 16];
        for r in &a {
            per[r.adapter.unwrap() as usize] += 1;
            assert!((1..=4).contains(&r.hash_ids.len()));
        }
        // Zipf over 16: the first about 30% (1 / H(16) = 0.295), the last about 1.8%.
        assert!((1000..1350).contains(&per[0]), "{per:?}");
        assert!((40..110).contains(&per[15]), "{per:?}");
        assert!(
            per.windows(2).filter(|p| p[0] >= p[1]).count() >= 12,
            "{per:?}"
        );
        let ids: std::collections::HashSet<u64> =
            a.iter().flat_map(|r| r.hash_ids.iter().copied()).collect();
        assert_eq!(ids.len(), a.iter().map(|r| r.hash_ids.len()).sum::<usize>());
    }

    #[test]
    fn sibling_bursts_share_a_new_document_within_the_window() {
        let w = Workload::SiblingBursts {
            doc_units: 16,
            siblings: 8,
            window_ms: 50,
        };
        let a = w.generate(400, 4.0, 8, 9);
        assert_eq!(a.len(), 400);
        assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
        let mut bursts: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for r in &a {
            assert_eq!(r.hash_ids.len(), 17);
            bursts.entry(r.hash_ids[0]).or_default().push(r.timestamp);
        }
        // Each document is new with its burst, and asked within 50 ms.
        for times in bursts.values() {
            let (lo, hi) = (times.iter().min().unwrap(), times.iter().max().unwrap());
            assert!(hi - lo <= 50);
        }
        assert!(bursts.values().filter(|t| t.len() == 8).count() >= 45);
    }

    /// A mixed run: each part's share of the requests, all of them arriving over the whole
    /// run, in content no other part shares (a part's own sharing kept), tagged with its
    /// part; seeded like every generator.
    #[test]
    fn a_mixed_run_keeps_each_parts_share_span_and_content() {
        const PARTS: &[(Workload, f64)] = &[
            (
                Workload::MultiTurn {
                    conversations: 8,
                    turns: 4,
                    opening_units: (1, 1),
                },
                0.5,
            ),
            (
                Workload::SharedPrompts {
                    tenants: 4,
                    system_units: 2,
                },
                0.3,
            ),
            (
                Workload::SiblingBursts {
                    doc_units: 2,
                    siblings: 4,
                    window_ms: 50,
                },
                0.2,
            ),
        ];
        let w = Workload::Mixed(PARTS);
        let a = w.generate(2_000, 20.0, 8, 5);
        assert_eq!(a, w.generate(2_000, 20.0, 8, 5));
        assert_ne!(a, w.generate(2_000, 20.0, 8, 6));
        assert_eq!(a.len(), 2_000);
        assert!(a.windows(2).all(|p| p[0].timestamp <= p[1].timestamp));
        let end = a.last().unwrap().timestamp;
        // About 100 s at 20 req/s.
        assert!((80_000..120_000).contains(&end), "{end}");
        for (k, &(_, share)) in PARTS.iter().enumerate() {
            let mine: Vec<_> = a.iter().filter(|r| r.part == Some(k as u8)).collect();
            let got = mine.len() as f64 / a.len() as f64;
            assert!((got - share).abs() < 0.05, "part {k}: {got} for {share}");
            // Over the whole run, not bunched at its start.
            assert!(mine.last().unwrap().timestamp > end * 9 / 10, "part {k}");
        }
        assert!(a.iter().all(|r| r.part.is_some()));
        // No content id is in two parts; within a part, sharing is as its generator made it
        // (tenants' system prompts recur).
        let mut owner = std::collections::HashMap::new();
        for r in &a {
            for id in &r.hash_ids {
                assert_eq!(*owner.entry(*id).or_insert(r.part), r.part, "id {id}");
            }
        }
        let systems: std::collections::HashSet<u64> = a
            .iter()
            .filter(|r| r.part == Some(1))
            .map(|r| r.hash_ids[0])
            .collect();
        assert!(systems.len() <= 4);
        assert_eq!(w.name(), "mixed");
    }
}
