//! Scorers of the load the pods report (their scraped `/metrics`).

use std::time::{Duration, Instant};

use kvroute_endpoints::PodLoad;

use crate::plugins::load::min_max;
use crate::{BodyUse, Candidates, CycleState, Plugin, SchedulingRequest, Scorer};

/// Which scraped figure a scorer reads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Signal {
    /// Requests waiting (`queue-scorer`): min–max, fewer is better.
    Waiting,
    /// Requests running (`running-requests-size-scorer`): min–max, fewer is better.
    Running,
    /// KV-cache utilisation (`kv-cache-utilization-scorer`): `1 − usage`.
    KvUsage,
}

/// Scores one figure of the pods' own metrics. An endpoint without a fresh scrape (none yet,
/// failing, or older than the staleness threshold) gets the worst score of the set: it is
/// never preferred because it looks idle.
#[derive(Debug)]
pub(crate) struct PodLoadScorer {
    type_name: &'static str,
    signal: Signal,
    staleness: Duration,
}

impl PodLoadScorer {
    pub(crate) fn new(type_name: &'static str, signal: Signal, staleness: Duration) -> Self {
        Self {
            type_name,
            signal,
            staleness,
        }
    }

    fn value(&self, load: &PodLoad) -> f64 {
        match self.signal {
            Signal::Waiting => f64::from(load.waiting),
            Signal::Running => f64::from(load.running),
            Signal::KvUsage => load.kv_usage,
        }
    }
}

impl Plugin for PodLoadScorer {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

impl Scorer for PodLoadScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let now = Instant::now();
        // NaN marks an endpoint without a fresh figure.
        for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
            *s = ep
                .fresh_load(now, self.staleness)
                .map_or(f64::NAN, |l| self.value(&l));
        }
        match self.signal {
            Signal::KvUsage => {
                for s in scores.iter_mut() {
                    *s = if s.is_nan() {
                        0.0
                    } else {
                        1.0 - s.clamp(0.0, 1.0)
                    };
                }
            }
            Signal::Waiting | Signal::Running => {
                let (min, max) = min_max(scores);
                for s in scores.iter_mut() {
                    *s = if s.is_nan() {
                        0.0
                    } else if max > min {
                        (max - *s) / (max - min)
                    } else {
                        1.0
                    };
                }
            }
        }
    }
}

/// Prefers endpoints with short waiting queues, flattened at `threshold`
/// (`load-aware-scorer`): `0.5 · (1 − min(q, threshold) / threshold)`, so an empty queue
/// scores 0.5 and one at the threshold 0. No fresh scrape: 0.
#[derive(Debug)]
pub(crate) struct LoadAwareScorer {
    threshold: f64,
    staleness: Duration,
}

impl LoadAwareScorer {
    pub(crate) fn new(threshold: usize, staleness: Duration) -> Self {
        Self {
            threshold: threshold.max(1) as f64,
            staleness,
        }
    }
}

impl Plugin for LoadAwareScorer {
    fn type_name(&self) -> &'static str {
        "load-aware-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

impl Scorer for LoadAwareScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let now = Instant::now();
        for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
            *s = ep.fresh_load(now, self.staleness).map_or(0.0, |l| {
                0.5 * (1.0 - f64::from(l.waiting).min(self.threshold) / self.threshold)
            });
        }
    }
}

/// Prefers endpoints that have the request's LoRA adapter loaded (`lora-affinity-scorer`),
/// from the pods' `vllm:lora_requests_info`: 1.0 where it runs, 0.8 where a slot is free to
/// load it, 0.6 where it waits, else 0 (upstream's order). No fresh scrape: 0.
#[derive(Debug)]
pub(crate) struct LoraAffinityScorer {
    staleness: Duration,
}

impl LoraAffinityScorer {
    pub(crate) fn new(staleness: Duration) -> Self {
        Self { staleness }
    }
}

impl Plugin for LoraAffinityScorer {
    fn type_name(&self) -> &'static str {
        "lora-affinity-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }

    fn body_use(&self) -> BodyUse {
        BodyUse::Parsed
    }
}

impl Scorer for LoraAffinityScorer {
    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        let Some(req) = request.request else { return };
        let model = req.model.as_str();
        let now = Instant::now();
        for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
            let Some(load) = ep.fresh_load(now, self.staleness) else {
                continue;
            };
            let loaded = load.running_loras.len() + load.waiting_loras.len();
            *s = if load.running_loras.iter().any(|a| a == model) {
                1.0
            } else if load.max_lora.is_some_and(|max| loaded < max as usize) {
                0.8
            } else if load.waiting_loras.iter().any(|a| a == model) {
                0.6
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvroute_core::{Prompt, RequestHints};
    use kvroute_endpoints::EndpointState;

    use super::*;
    use crate::test_util::{registry, request};

    fn scores(scorer: &dyn Scorer, eps: &[Arc<EndpointState>], model: &str) -> Vec<f64> {
        let mut req = request(Prompt::Text("hi".into()));
        req.model = model.into();
        let hints = RequestHints::default();
        let kept: Vec<usize> = (0..eps.len()).collect();
        let mut out = vec![0.0; eps.len()];
        scorer.score(
            &SchedulingRequest::new(Some(&req), &hints),
            &CycleState::new(0),
            &Candidates::new(eps, &kept),
            &mut out,
        );
        out
    }

    fn scraped(ep: &EndpointState, waiting: u32, kv: f64, at: Instant) {
        ep.record_scrape(
            PodLoad {
                waiting,
                running: waiting * 2,
                kv_usage: kv,
                ..PodLoad::default()
            },
            at,
        );
    }

    #[test]
    fn pod_load_scorers_read_fresh_scrapes_and_rank_the_unknown_last() {
        let eps = registry(4).snapshot();
        let now = Instant::now();
        let stale = Duration::from_secs(2);
        scraped(&eps[0], 10, 0.9, now);
        scraped(&eps[1], 0, 0.1, now);
        scraped(&eps[2], 5, 0.5, now);
        // Endpoint 3 was scraped long ago: unknown now.
        scraped(&eps[3], 0, 0.0, now - Duration::from_secs(10));
        let queue = PodLoadScorer::new("queue-scorer", Signal::Waiting, stale);
        assert_eq!(scores(&queue, &eps, "m"), [0.0, 1.0, 0.5, 0.0]);
        let running = PodLoadScorer::new("running-requests-size-scorer", Signal::Running, stale);
        assert_eq!(scores(&running, &eps, "m"), [0.0, 1.0, 0.5, 0.0]);
        let kv = PodLoadScorer::new("kv-cache-utilization-scorer", Signal::KvUsage, stale);
        let s = scores(&kv, &eps, "m");
        assert!(
            (s[0] - 0.1).abs() < 1e-9 && (s[1] - 0.9).abs() < 1e-9 && s[3] == 0.0,
            "{s:?}"
        );
        let aware = LoadAwareScorer::new(20, stale);
        assert_eq!(scores(&aware, &eps, "m"), [0.25, 0.5, 0.375, 0.0]);
    }

    #[test]
    fn lora_affinity_follows_upstreams_tiers() {
        let eps = registry(4).snapshot();
        let now = Instant::now();
        let lora = |running: &[&str], waiting: &[&str], max: u32| PodLoad {
            running_loras: running.iter().map(|s| (*s).to_owned()).collect(),
            waiting_loras: waiting.iter().map(|s| (*s).to_owned()).collect(),
            max_lora: Some(max),
            ..PodLoad::default()
        };
        eps[0].record_scrape(lora(&["sql"], &[], 1), now);
        eps[1].record_scrape(lora(&["chat"], &[], 2), now);
        eps[2].record_scrape(lora(&["chat"], &["sql"], 2), now);
        eps[3].record_scrape(lora(&["a", "b"], &[], 2), now);
        let s = scores(
            &LoraAffinityScorer::new(Duration::from_secs(2)),
            &eps,
            "sql",
        );
        assert_eq!(s, [1.0, 0.8, 0.6, 0.0]);
    }
}
