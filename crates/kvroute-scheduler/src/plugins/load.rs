//! Load scorers.

use std::time::{Duration, Instant};

use crate::{Candidates, CycleState, Plugin, SchedulingRequest, Scorer};

/// Prefers endpoints with fewer requests (`load-scorer`, kvroute's own):
/// `(max − n) / max(max − min, headroom)` over the candidates. Like the min–max queue
/// scorer, but a spread smaller than `headroom` requests only costs its share, so a
/// prefix-cache hit is not given up for one request of imbalance. `n` is the larger of the
/// requests this router has in flight there and, when its last scrape is fresh, the
/// requests the pod reports running and waiting plus those this router sent it since, less
/// those of this router's that ended since (`FreshLoad::requests_now`): the router's own
/// count is immediate but sees only its share of the traffic (other replicas, other
/// routers), the pod's sees all of it but lags a scrape. Without the requests sent since,
/// every decision between two scrapes would see the same stale queue and herd onto the pod
/// that looked shortest; without those ended since, a pod would look busier the more it
/// had answered since its scrape, and one router alone would route otherwise than on its
/// own exact count.
#[derive(Debug)]
pub(crate) struct LoadScorer {
    headroom: usize,
    staleness: Option<Duration>,
}

impl LoadScorer {
    /// In-flight spread (requests) that counts in full, at least 1; scrapes younger than
    /// `staleness` count too (`None`: the router's own count alone).
    pub(crate) fn new(headroom: usize, staleness: Option<Duration>) -> Self {
        Self {
            headroom: headroom.max(1),
            staleness,
        }
    }
}

impl Plugin for LoadScorer {
    fn type_name(&self) -> &'static str {
        "load-scorer"
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

impl Scorer for LoadScorer {
    fn score(
        &self,
        _: &SchedulingRequest<'_>,
        _: &CycleState,
        candidates: &Candidates<'_>,
        scores: &mut [f64],
    ) {
        read_in_flight(candidates, scores);
        if let Some(staleness) = self.staleness {
            let now = Instant::now();
            for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
                if let Some(load) = ep.fresh_load(now, staleness) {
                    *s = s.max(load.requests_now() as f64);
                }
            }
        }
        let (min, max) = min_max(scores);
        let spread = (max - min).max(self.headroom as f64);
        for s in scores.iter_mut() {
            *s = (max - *s) / spread;
        }
    }
}

/// Writes each candidate's in-flight count into `scores`, each read once: others change
/// while a request is scored, and what is derived from them must be of the values scored.
pub(crate) fn read_in_flight(candidates: &Candidates<'_>, scores: &mut [f64]) {
    for (s, (_, ep)) in scores.iter_mut().zip(candidates.iter()) {
        *s = ep.in_flight() as f64;
    }
}

/// The least and the most of `values` (counts, so at least 0), skipping NaN (unknown).
pub(crate) fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .filter(|v| !v.is_nan())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

#[cfg(test)]
mod tests {
    use kvroute_core::RequestHints;

    use super::*;
    use crate::test_util::registry;

    #[test]
    fn a_spread_within_the_headroom_costs_its_share() {
        let eps = registry(3).snapshot();
        let _g = [eps[0].acquire(), eps[0].acquire()];
        let hints = RequestHints::default();
        let kept = [0, 1, 2];
        let score = |headroom| {
            let mut s = [0.0; 3];
            LoadScorer::new(headroom, None).score(
                &SchedulingRequest::new(None, &hints),
                &CycleState::new(0),
                &Candidates::new(&eps, &kept),
                &mut s,
            );
            s
        };
        assert_eq!(score(8), [0.0, 0.25, 0.25]);
        assert_eq!(score(1), [0.0, 1.0, 1.0]);
    }

    #[test]
    fn what_the_pods_report_counts_when_it_is_more_and_fresh() {
        let eps = registry(3).snapshot();
        let _g = [eps[0].acquire(), eps[0].acquire()];
        let now = Instant::now();
        // Endpoint 1 is busy with another router's traffic: 6 running, 2 waiting.
        let busy = kvroute_endpoints::PodLoad {
            running: 6,
            waiting: 2,
            ..Default::default()
        };
        eps[1].record_scrape(busy.clone(), now);
        // Endpoint 2's report is old: not read.
        eps[2].record_scrape(busy, now - Duration::from_secs(5));
        let hints = RequestHints::default();
        let kept = [0, 1, 2];
        let mut s = [0.0; 3];
        LoadScorer::new(1, Some(Duration::from_secs(2))).score(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &Candidates::new(&eps, &kept),
            &mut s,
        );
        // Loads 2, 8, 0.
        assert_eq!(s, [0.75, 0.0, 1.0]);
        // Two more sent to endpoint 1 since its scrape: its queue is 10 now, whatever this
        // router holds there.
        let mut sent = vec![eps[1].acquire(), eps[1].acquire()];
        LoadScorer::new(1, Some(Duration::from_secs(2))).score(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &Candidates::new(&eps, &kept),
            &mut s,
        );
        assert_eq!(s, [0.8, 0.0, 1.0]);
        // One of them answered: 9.
        sent.pop();
        LoadScorer::new(1, Some(Duration::from_secs(2))).score(
            &SchedulingRequest::new(None, &hints),
            &CycleState::new(0),
            &Candidates::new(&eps, &kept),
            &mut s,
        );
        assert_eq!(s, [7.0 / 9.0, 0.0, 1.0]);
    }
}
