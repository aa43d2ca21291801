//! Scorers of the load the pods report (their scraped `/metrics`).

use std::time::{Duration, Instant};

use kvroute_endpoints::PodLoad;

use crate::{Candidates, CycleState, Plugin, SchedulingRequest, Scorer};

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
                let known = scores.iter().copied().filter(|s| !s.is_nan());
                let (min, max) = known.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
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
