use std::time::{Duration, Instant};

use kvroute_endpoints::PodLoad;
use proptest::prelude::*;

use super::*;
use crate::test_util::registry;

fn fresh(waiting: u32, running: u32, kv: f64) -> LoadSample {
    LoadSample {
        scraped: Some((waiting, running, kv)),
        in_flight: 0,
    }
}

#[test]
fn upstreams_roofline_with_its_defaults() {
    let d = UtilizationDetector::default();
    // The larger of queue/5 and kv/0.8.
    assert_eq!(d.endpoint_score(fresh(5, 0, 0.0)), 1.0);
    assert_eq!(d.endpoint_score(fresh(1, 3, 0.4)), 0.5);
    assert_eq!(d.endpoint_score(fresh(0, 3, 0.8)), 1.0);
    // Missing or stale: saturated. A KV usage that is not a number: saturated too.
    assert_eq!(d.endpoint_score(LoadSample::default()), 1.0);
    assert_eq!(d.endpoint_score(fresh(0, 0, f64::NAN)), 1.0);
    // The mean over the pool; an empty pool is saturated.
    assert_eq!(d.saturation([fresh(5, 0, 0.0), fresh(0, 0, 0.0)], 0), 0.5);
    assert_eq!(d.saturation([], 0), 1.0);
    // Requests admitted and not yet routed count as waiting, spread over the pool.
    assert_eq!(d.saturation([fresh(0, 0, 0.0), fresh(0, 0, 0.0)], 10), 1.0);
}

#[test]
fn requests_in_flight_beyond_the_scrape_count_as_waiting() {
    let d = UtilizationDetector::default();
    // The scrape shows 2 running; this router has 9 in flight there: 7 it cannot see yet.
    let burst = LoadSample {
        scraped: Some((0, 2, 0.1)),
        in_flight: 9,
    };
    assert_eq!(d.endpoint_score(burst), 7.0 / 5.0);
    // Fewer in flight than the scrape shows (other replicas' work): no credit.
    let shown = LoadSample {
        scraped: Some((3, 4, 0.1)),
        in_flight: 2,
    };
    assert_eq!(d.endpoint_score(shown), 3.0 / 5.0);
}

#[test]
fn parameters_out_of_range_are_refused() {
    let ms = Duration::from_millis(200);
    assert_eq!(
        UtilizationDetector::new(0, 0.8, ms),
        Err(DetectorError::QueueDepth(0))
    );
    assert_eq!(
        UtilizationDetector::new(-3, 0.8, ms),
        Err(DetectorError::QueueDepth(-3))
    );
    assert_eq!(
        UtilizationDetector::new(i64::from(u32::MAX) + 1, 0.8, ms),
        Err(DetectorError::QueueDepth(i64::from(u32::MAX) + 1))
    );
    for kv in [0.0, 1.01, -0.5] {
        assert_eq!(
            UtilizationDetector::new(5, kv, ms),
            Err(DetectorError::KvCache(kv))
        );
    }
    assert!(UtilizationDetector::new(5, f64::NAN, ms).is_err());
    assert_eq!(
        UtilizationDetector::new(5, 0.8, Duration::ZERO),
        Err(DetectorError::Staleness)
    );
    assert_eq!(check_headroom(-0.1), Err(DetectorError::Headroom(-0.1)));
    assert!(check_headroom(f64::INFINITY).is_err());
    assert_eq!(check_headroom(0.2), Ok(()));
    let d = UtilizationDetector::new(2, 1.0, ms).unwrap();
    assert_eq!(d.endpoint_score(fresh(1, 0, 0.9)), 0.9);
}

#[test]
fn live_endpoints_are_read_fresh_or_count_as_saturated() {
    let reg = registry(2);
    let eps = reg.snapshot();
    let d = UtilizationDetector::default();
    let now = Instant::now();
    // Nothing scraped yet: saturated.
    assert_eq!(d.pool_saturation(&eps, now, 0), 1.0);
    let load = |waiting| PodLoad {
        waiting,
        ..PodLoad::default()
    };
    eps[0].record_scrape(load(0), now);
    eps[1].record_scrape(load(0), now);
    assert_eq!(d.pool_saturation(&eps, now, 0), 0.0);
    // This router's own requests count before the next scrape shows them.
    let guards: Vec<_> = (0..10).map(|_| eps[0].acquire()).collect();
    assert_eq!(d.pool_saturation(&eps, now, 0), 1.0);
    drop(guards);
    // A scrape older than the threshold counts as saturated.
    let later = now + Duration::from_millis(300);
    eps[1].record_scrape(load(0), later);
    assert_eq!(d.pool_saturation(&eps, later, 0), 0.5);
}

fn settings(band: u64) -> FlowSettings {
    FlowSettings {
        default_band: BandLimits {
            max_requests: band,
            max_bytes: 1_000,
        },
        negative_band: BandLimits {
            max_requests: 1,
            max_bytes: 1_000,
        },
        ..FlowSettings::default()
    }
}

#[test]
fn highest_priority_first_then_first_come() {
    let s = settings(10);
    let t = Instant::now();
    let mut q = FlowQueue::default();
    for (p, name) in [(0, "a"), (5, "b"), (0, "c"), (-1, "d"), (5, "e")] {
        q.push(&s, p, 1, t, name).unwrap();
    }
    let order: Vec<_> = std::iter::from_fn(|| q.pop().map(|(_, n)| n)).collect();
    assert_eq!(order, ["b", "e", "a", "c", "d"]);
    assert!(q.is_empty() && q.bytes() == 0);
}

#[test]
fn bands_and_the_whole_queue_are_bounded() {
    let mut s = settings(2);
    s.bands.insert(
        7,
        BandLimits {
            max_requests: 100,
            max_bytes: 50,
        },
    );
    s.max_requests = Some(4);
    let t = Instant::now();
    let mut q = FlowQueue::default();
    q.push(&s, 0, 1, t, ()).unwrap();
    q.push(&s, 0, 1, t, ()).unwrap();
    assert_eq!(q.push(&s, 0, 1, t, ()), Err(QueueFull::Band(0)));
    // The negative band's template holds one.
    q.push(&s, -3, 1, t, ()).unwrap();
    assert_eq!(q.push(&s, -3, 1, t, ()), Err(QueueFull::Band(-3)));
    // A configured band by bytes.
    assert_eq!(q.push(&s, 7, 51, t, ()), Err(QueueFull::Band(7)));
    q.push(&s, 7, 50, t, ()).unwrap();
    // Globally: 4 requests.
    assert_eq!(q.push(&s, 9, 1, t, ()), Err(QueueFull::Global));
    s.max_requests = None;
    s.max_bytes = Some(53);
    assert_eq!(q.push(&s, 9, 1, t, ()), Err(QueueFull::Global));
    assert_eq!((q.len(), q.bytes()), (4, 53));
    assert_eq!(q.band_lens().collect::<Vec<_>>(), [(7, 1), (0, 2), (-3, 1)]);
}

#[test]
fn a_request_leaves_by_its_ticket_or_its_time() {
    let s = settings(10);
    let t = Instant::now();
    let ms = |n| t + Duration::from_millis(n);
    let mut q = FlowQueue::default();
    let a = q.push(&s, 0, 3, ms(0), "a").unwrap();
    let b = q.push(&s, 0, 4, ms(10), "b").unwrap();
    q.push(&s, 2, 5, ms(20), "c").unwrap();
    assert_eq!(q.remove(b), Some("b"));
    assert_eq!(q.remove(b), None, "a ticket is used once");
    assert_eq!(q.oldest(), Some(ms(0)));
    let gone = q.expire(|queued| queued <= ms(5));
    assert_eq!(gone, vec![(a, "a")]);
    assert_eq!(q.remove(a), None);
    assert_eq!((q.len(), q.bytes(), q.oldest()), (1, 5, Some(ms(20))));
}

#[derive(Clone, Debug)]
enum Op {
    Push(i32, u64),
    Pop,
    Remove(usize),
    Expire(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (-2i32..3, 0u64..40).prop_map(|(p, b)| Op::Push(p, b)),
        2 => Just(Op::Pop),
        1 => (0usize..64).prop_map(Op::Remove),
        1 => (0u64..64).prop_map(Op::Expire),
    ]
}

proptest! {
    /// Against a naive model (a list scanned in full): the same admissions, the same
    /// order out, the same counts, whatever mix of pushes, pops, cancellations and expiries.
    #[test]
    fn the_queue_behaves_as_a_scanned_list(ops in proptest::collection::vec(op(), 1..200)) {
        let mut s = settings(6);
        s.max_requests = Some(12);
        s.max_bytes = Some(300);
        let t = Instant::now();
        let mut q = FlowQueue::default();
        // (priority, seq, bytes, queued at ms)
        let mut model: Vec<(i32, u64, u64, u64)> = Vec::new();
        let mut tickets = Vec::new();
        let mut seq = 0u64;
        for (step, op) in ops.into_iter().enumerate() {
            let now = step as u64;
            match op {
                Op::Push(p, b) => {
                    let limits = s.band(p);
                    let (n, bytes) = model.iter().filter(|m| m.0 == p)
                        .fold((0, 0), |(n, sum), m| (n + 1, sum + m.2));
                    let total: u64 = model.iter().map(|m| m.2).sum();
                    let want = if n >= limits.max_requests || bytes + b > limits.max_bytes {
                        Err(QueueFull::Band(p))
                    } else if model.len() as u64 >= 12 || total + b > 300 {
                        Err(QueueFull::Global)
                    } else {
                        Ok(())
                    };
                    let got = q.push(&s, p, b, t + Duration::from_millis(now), seq);
                    prop_assert_eq!(got.map(|_| ()), want);
                    if let Ok(ticket) = got {
                        model.push((p, seq, b, now));
                        tickets.push((ticket, seq));
                    }
                    seq += 1;
                }
                Op::Pop => {
                    let best = model.iter().enumerate()
                        .max_by_key(|(_, m)| (m.0, std::cmp::Reverse(m.1)))
                        .map(|(i, _)| i);
                    let want = best.map(|i| model.remove(i).1);
                    prop_assert_eq!(q.pop().map(|(_, v)| v), want);
                }
                Op::Remove(i) => {
                    if let Some(&(ticket, id)) = tickets.get(i % tickets.len().max(1)) {
                        let want = model.iter().position(|m| m.1 == id).map(|at| model.remove(at).1);
                        prop_assert_eq!(q.remove(ticket), want);
                    }
                }
                Op::Expire(age) => {
                    let cut = now.saturating_sub(age);
                    let mut gone: Vec<u64> = q
                        .expire(|queued| queued <= t + Duration::from_millis(cut))
                        .into_iter().map(|(_, v)| v).collect();
                    let mut want: Vec<u64> = model.iter().filter(|m| m.3 <= cut).map(|m| m.1).collect();
                    model.retain(|m| m.3 > cut);
                    gone.sort_unstable();
                    want.sort_unstable();
                    prop_assert_eq!(gone, want);
                }
            }
            prop_assert_eq!(q.len(), model.len() as u64);
            prop_assert_eq!(q.bytes(), model.iter().map(|m| m.2).sum::<u64>());
            prop_assert_eq!(q.oldest(), model.iter().map(|m| t + Duration::from_millis(m.3)).min());
        }
    }

    /// Saturation grows with every input and stays within what the worst endpoint says.
    #[test]
    fn saturation_is_monotone_and_bounded(
        pods in proptest::collection::vec((0u32..20, 0u32..20, 0.0f64..1.0, 0usize..40, any::<bool>()), 1..8),
        pending in 0usize..20,
        which in 0usize..8,
    ) {
        let d = UtilizationDetector::default();
        let samples: Vec<LoadSample> = pods.iter().map(|&(w, r, kv, f, fresh)| LoadSample {
            scraped: fresh.then_some((w, r, kv)),
            in_flight: f,
        }).collect();
        let s = d.saturation(samples.iter().copied(), pending);
        let worst = samples.iter().map(|&x| d.endpoint_score(x)).fold(0.0, f64::max);
        let best = samples.iter().map(|&x| d.endpoint_score(x)).fold(f64::MAX, f64::min);
        prop_assert!(s >= best - 1e-12);
        prop_assert!(s <= worst + pending as f64 / 5.0 + 1e-12);
        prop_assert!(d.saturation(samples.iter().copied(), pending + 1) > s);
        let mut more = samples.clone();
        let i = which % more.len();
        if let Some((w, r, kv)) = more[i].scraped {
            more[i].scraped = Some((w + 1, r, kv));
        }
        more[i].in_flight += 1;
        prop_assert!(d.saturation(more.iter().copied(), pending) >= s);
        // Losing a scrape never makes the pool look less loaded than an endpoint at 1.0.
        more[i].scraped = None;
        prop_assert!(d.endpoint_score(more[i]) == 1.0);
    }
}
