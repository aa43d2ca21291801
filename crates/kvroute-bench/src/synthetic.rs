//! Seeded synthetic workloads in the trace's own shape (`TraceRequest`: content ids of
//! 512-token units), so they replay through the same path as a Mooncake trace. Equal ids
//! mean shared content; every generator is deterministic for a given seed.

use crate::trace::TraceRequest;

/// A small, seeded generator (xorshift64*): runs repeat exactly.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced: xorshift would stay at 0).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
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
    },
    /// `docs` long documents of `doc_units` units, each request one question about one.
    DocQa {
        /// Distinct documents.
        docs: u64,
        /// Units (512 tokens) per document.
        doc_units: u64,
    },
}

impl Workload {
    /// `requests` requests of this workload arriving at `rate` per second on average,
    /// each generating `output` tokens.
    pub fn generate(
        self,
        requests: usize,
        rate: f64,
        output: usize,
        seed: u64,
    ) -> Vec<TraceRequest> {
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
                    t += rng.gap_ms(mean_gap);
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
            } => {
                // Each conversation keeps its history; a request picks a conversation that
                // has turns left, so histories grow as the run goes on.
                let mut history: Vec<Vec<u64>> =
                    (0..conversations).map(|c| vec![1_000_000 + c]).collect();
                let mut taken = vec![0u64; conversations as usize];
                let mut out = Vec::with_capacity(requests);
                while out.len() < requests {
                    let c = rng.below(conversations) as usize;
                    if taken[c] >= turns {
                        // Start this conversation over with a new system context.
                        taken[c] = 0;
                        history[c] = vec![next_fresh()];
                    }
                    taken[c] += 1;
                    history[c].push(next_fresh()); // the new question
                    t += rng.gap_ms(mean_gap);
                    out.push(TraceRequest {
                        timestamp: t,
                        input_length: history[c].len() * 512 - 100,
                        output_length: output,
                        hash_ids: history[c].clone(),
                    });
                    history[c].push(next_fresh()); // the answer joins the history
                }
                out
            }
            Self::DocQa { docs, doc_units } => {
                let prefix = |doc: u64, u: u64| 2_000_000 + doc * 10_000 + u;
                let mut arrive = || {
                    t += rng.gap_ms(mean_gap);
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
        }
    }
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
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
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

        let qa = Workload::DocQa {
            docs: 2,
            doc_units: 16,
        }
        .generate(20, 10.0, 8, 3);
        assert!(qa.iter().all(|r| r.hash_ids.len() == 17));
    }
}
