use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvroute_endpoints::EndpointState;

use crate::{Decision, ScheduleError, Scheduler, SchedulingRequest};

/// Sends each request to the endpoint with the fewest requests in flight. Ties are broken
/// by a rotating start position, so equal endpoints take turns instead of the first one
/// taking every request of a quiet period; given the same sequence of calls and loads the
/// choices are the same.
#[derive(Debug)]
pub struct LeastInFlight {
    cursor: AtomicUsize,
    targets: usize,
}

impl LeastInFlight {
    /// `fallbacks` extra endpoints (next least loaded) follow the primary in each decision.
    pub fn new(fallbacks: usize) -> Self {
        Self {
            cursor: AtomicUsize::new(0),
            targets: fallbacks + 1,
        }
    }
}

impl Scheduler for LeastInFlight {
    fn schedule(
        &self,
        _request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
    ) -> Result<Decision, ScheduleError> {
        let n = candidates.len();
        if n == 0 {
            return Err(ScheduleError::NoCandidates);
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let rotated = (0..n).map(|i| (start + i) % n);
        if self.targets == 1 {
            let best = rotated
                .min_by_key(|&i| candidates[i].in_flight())
                .unwrap_or(start);
            return Ok(Decision::new(Arc::clone(&candidates[best]), []));
        }
        let mut order: Vec<(usize, usize)> = rotated
            .enumerate()
            .map(|(rank, i)| (candidates[i].in_flight(), rank))
            .collect();
        order.sort_unstable();
        let mut picked = order
            .iter()
            .take(self.targets)
            .map(|&(_, rank)| Arc::clone(&candidates[(start + rank) % n]));
        let primary = picked.next().ok_or(ScheduleError::NoCandidates)?;
        Ok(Decision::new(primary, picked))
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::{Endpoint, RequestHints};
    use kvroute_endpoints::Registry;

    use super::*;

    fn registry(n: u16) -> Registry {
        let reg = Registry::new();
        reg.replace(
            (1..=n)
                .map(|p| Endpoint::from_address(([127, 0, 0, 1], p).into()))
                .collect(),
        );
        reg
    }

    fn pick(s: &LeastInFlight, c: &[Arc<EndpointState>]) -> Result<Decision, ScheduleError> {
        let hints = RequestHints::default();
        s.schedule(&SchedulingRequest::new(None, &hints), c)
    }

    #[test]
    fn empty_candidates_is_an_error() {
        assert_eq!(
            pick(&LeastInFlight::new(0), &[]).unwrap_err(),
            ScheduleError::NoCandidates
        );
    }

    #[test]
    fn least_loaded_wins_and_ties_rotate() {
        let reg = registry(3);
        let c = reg.snapshot();
        let s = LeastInFlight::new(0);
        let _busy: Vec<_> = (0..2).map(|_| c[0].acquire()).collect();
        let _one = c[1].acquire();
        for _ in 0..5 {
            assert_eq!(pick(&s, &c).unwrap().primary().address().port(), 3);
        }
        drop(_one);
        let ports: Vec<u16> = (0..4)
            .map(|_| pick(&s, &c).unwrap().primary().address().port())
            .collect();
        assert!(ports.contains(&2) && ports.contains(&3), "{ports:?}");
        assert!(!ports.contains(&1), "{ports:?}");
    }

    #[test]
    fn holding_guards_spreads_load_evenly() {
        let reg = registry(4);
        let c = reg.snapshot();
        let s = LeastInFlight::new(0);
        let guards: Vec<_> = (0..40)
            .map(|_| pick(&s, &c).unwrap().primary().acquire())
            .collect();
        assert!(c.iter().all(|e| e.in_flight() == 10));
        drop(guards);
        assert!(c.iter().all(|e| e.in_flight() == 0));
    }

    #[test]
    fn fallbacks_are_ordered_by_load() {
        let reg = registry(3);
        let c = reg.snapshot();
        let s = LeastInFlight::new(5);
        let _g = [c[0].acquire(), c[0].acquire(), c[2].acquire()];
        let d = pick(&s, &c).unwrap();
        let ports: Vec<u16> = d.targets().iter().map(|e| e.address().port()).collect();
        assert_eq!(ports, vec![2, 3, 1], "all three, least loaded first");
    }
}
