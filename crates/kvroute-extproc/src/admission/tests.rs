use std::time::{Duration, Instant};

use kvroute_endpoints::PodLoad;
use kvroute_scheduler::admission::{BandLimits, UtilizationDetector};
use test_support::{endpoints, registry};

use super::*;

#[derive(Debug)]
struct Objectives;

impl Priorities for Objectives {
    fn priority(&self, objective: &str) -> Option<i32> {
        match objective {
            "batch" => Some(-1),
            "critical" => Some(10),
            _ => None,
        }
    }
}

/// Every endpoint of `registry` scraped now with `waiting` requests queued.
fn scraped(registry: &Registry, waiting: u32) {
    for e in registry.snapshot().iter() {
        let load = PodLoad {
            waiting,
            ..PodLoad::default()
        };
        e.record_scrape(load, Instant::now());
    }
}

fn flow(queue_depth: i64, ttl: Duration) -> AdmissionSettings {
    AdmissionSettings {
        detector: UtilizationDetector::new(queue_depth, 0.8, Duration::from_secs(60)).unwrap(),
        flow: Some(FlowSettings {
            ttl: Some(ttl),
            no_endpoint_ttl: Some(ttl),
            negative_band: BandLimits {
                max_requests: 1,
                max_bytes: 1 << 20,
            },
            ..FlowSettings::default()
        }),
    }
}

fn waiter(a: &Arc<Admission>, priority: i32) -> Waiter {
    match a.admit(priority, 100) {
        Admit::Wait(w) => w,
        other => panic!("expected to wait, got {other:?}"),
    }
}

/// Whether `w` has its verdict, without waiting for it.
fn ready(w: &mut Waiter) -> Option<Result<Admitted, Dropped>> {
    let waker = std::task::Waker::noop();
    match Pin::new(w).poll(&mut Context::from_waker(waker)) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[test]
fn without_flow_control_only_sheddable_work_is_shed_and_only_when_saturated() {
    let reg = endpoints(2);
    let legacy = AdmissionSettings::default();
    let a = Admission::new(Arc::clone(&reg), Some(Arc::new(Objectives)), legacy);
    assert_eq!(a.priority(Some("batch")), -1);
    assert_eq!(a.priority(Some("unknown")), 0);
    assert_eq!(a.priority(None), 0);
    scraped(&reg, 1);
    assert!(
        matches!(a.admit(-1, 0), Admit::Now(_)),
        "0.2: not saturated"
    );
    scraped(&reg, 5);
    assert!(matches!(a.admit(-1, 0), Admit::Refused(Dropped::Saturated)));
    // Critical and default work is never shed, however saturated.
    scraped(&reg, 500);
    assert!(matches!(a.admit(0, 0), Admit::Now(_)));
    assert!(matches!(a.admit(10, 0), Admit::Now(_)));
    assert_eq!(a.pending.load(Ordering::Relaxed), 0, "nothing counted");
}

#[test]
fn a_request_waits_for_an_endpoint_to_appear() {
    let reg = registry(&[]);
    let a = Admission::new(Arc::clone(&reg), None, flow(5, Duration::from_secs(60)));
    let mut w = waiter(&a, 0);
    assert!(
        a.step(Instant::now()).is_some(),
        "looks again while one waits"
    );
    assert!(ready(&mut w).is_none(), "no endpoint: waits");
    reg.replace(vec![kvroute_core::Endpoint::from_address(
        "127.0.0.1:8000".parse().unwrap(),
    )]);
    scraped(&reg, 0);
    assert_eq!(a.step(Instant::now()), None, "nothing left waiting");
    let admitted = ready(&mut w).unwrap().unwrap();
    assert_eq!(a.pending.load(Ordering::Relaxed), 1, "counted until routed");
    drop(admitted);
    assert_eq!(a.pending.load(Ordering::Relaxed), 0);
}

#[test]
fn a_request_out_of_time_is_answered_by_the_pools_state() {
    let ttl = Duration::from_secs(1);
    // Endpoints, saturated: rejected-ttl-expired.
    let reg = endpoints(1);
    scraped(&reg, 50);
    let a = Admission::new(Arc::clone(&reg), None, flow(5, ttl));
    let mut w = waiter(&a, 0);
    a.step(Instant::now());
    assert!(ready(&mut w).is_none());
    a.step(Instant::now() + ttl);
    assert_eq!(ready(&mut w).unwrap().unwrap_err(), Dropped::TtlExpired);
    // No endpoint: rejected-no-endpoints.
    let a = Admission::new(registry(&[]), None, flow(5, ttl));
    let mut w = waiter(&a, 0);
    a.step(Instant::now() + ttl / 2);
    assert!(ready(&mut w).is_none());
    a.step(Instant::now() + ttl);
    assert_eq!(ready(&mut w).unwrap().unwrap_err(), Dropped::NoEndpoints);
    assert_eq!(a.observe().1, [], "the queue is empty again");
}

#[test]
fn waiters_go_highest_priority_first_as_capacity_frees() {
    let reg = endpoints(1);
    scraped(&reg, 50);
    // One request waiting on the pod is saturation.
    let a = Admission::new(
        Arc::clone(&reg),
        Some(Arc::new(Objectives)),
        flow(1, Duration::from_secs(60)),
    );
    let mut low = waiter(&a, -1);
    let mut mid = waiter(&a, 0);
    let mut high = waiter(&a, 10);
    // A second sheddable one finds its band (1 place) full.
    assert!(matches!(a.admit(-1, 0), Admit::Refused(Dropped::Saturated)));
    assert_eq!(a.observe().1, [(10, 1), (0, 1), (-1, 1)]);
    a.step(Instant::now());
    assert!(ready(&mut high).is_none(), "saturated: none goes");
    scraped(&reg, 0);
    a.step(Instant::now());
    let first = ready(&mut high).unwrap().unwrap();
    assert!(
        ready(&mut mid).is_none(),
        "the one dispatched counts: saturated again"
    );
    drop(first);
    a.step(Instant::now());
    let second = ready(&mut mid).unwrap().unwrap();
    assert!(ready(&mut low).is_none());
    drop(second);
    a.step(Instant::now());
    assert!(ready(&mut low).unwrap().is_ok());
}

#[test]
fn a_waiter_that_goes_away_leaves_the_queue() {
    let reg = endpoints(1);
    scraped(&reg, 50);
    let a = Admission::new(Arc::clone(&reg), None, flow(5, Duration::from_secs(60)));
    let w = waiter(&a, 3);
    let _kept = waiter(&a, 3);
    assert_eq!(a.observe().1, [(3, 2)]);
    drop(w);
    assert_eq!(a.observe().1, [(3, 1)]);
    // Turning flow control off lets whatever waits through.
    a.configure(AdmissionSettings::default());
    assert_eq!(a.step(Instant::now()), None);
    assert_eq!(a.observe().1, []);
}

#[test]
fn without_anything_waiting_a_request_goes_at_once_unless_saturated() {
    let reg = endpoints(2);
    scraped(&reg, 0);
    let a = Admission::new(Arc::clone(&reg), None, flow(1, Duration::from_secs(60)));
    let first = match a.admit(0, 0) {
        Admit::Now(x) => x,
        other => panic!("{other:?}"),
    };
    // Two endpoints, threshold 1: one pending is 0.5, two is saturated.
    let second = match a.admit(0, 0) {
        Admit::Now(x) => x,
        other => panic!("{other:?}"),
    };
    let mut third = waiter(&a, 0);
    drop((first, second));
    a.step(Instant::now());
    assert!(ready(&mut third).unwrap().is_ok());
}

#[test]
fn the_budget_restarts_when_the_pool_changes_but_is_bounded() {
    let f = FlowSettings {
        ttl: Some(Duration::from_secs(10)),
        no_endpoint_ttl: Some(Duration::from_secs(30)),
        ..FlowSettings::default()
    };
    let t0 = Instant::now();
    let s = |n| t0 + Duration::from_secs(n);
    // Queued at 0 with no endpoint; endpoints since 25: 10 s from then.
    assert!(!out_of_time(&f, false, s(25), s(0), s(34)));
    assert!(out_of_time(&f, false, s(25), s(0), s(35)));
    // No endpoint since 0: 30 s.
    assert!(!out_of_time(&f, true, s(0), s(0), s(29)));
    assert!(out_of_time(&f, true, s(0), s(0), s(30)));
    // Flapping never extends a wait past both budgets together.
    assert!(out_of_time(&f, true, s(39), s(0), s(40)));
    // No TTL for this state: only the pool's coming back ends the wait.
    let forever = FlowSettings {
        no_endpoint_ttl: None,
        ..f
    };
    assert!(!out_of_time(&forever, true, s(0), s(0), s(10_000)));
}

#[tokio::test]
async fn at_shutdown_waiting_requests_are_let_through() {
    let reg = endpoints(1);
    scraped(&reg, 50);
    let a = Admission::new(Arc::clone(&reg), None, flow(5, Duration::from_secs(60)));
    let stop = CancellationToken::new();
    let dispatcher = tokio::spawn(Arc::clone(&a).run(stop.clone()));
    let w = waiter(&a, 0);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(a.observe().1, [(0, 1)], "saturated: it waits");
    stop.cancel();
    dispatcher.await.unwrap();
    assert!(w.await.is_ok(), "routed by the drain, not left unanswered");
}

#[test]
fn saturation_and_queue_are_exported_under_both_names() {
    let reg = endpoints(1);
    scraped(&reg, 10);
    let a = Admission::new(Arc::clone(&reg), None, flow(5, Duration::from_secs(60)));
    let _w = waiter(&a, -2);
    let mut ours = prometheus_client::registry::Registry::with_prefix("kvroute");
    ours.register_collector(Box::new(AdmissionCollector(Arc::clone(&a))));
    let mut theirs = prometheus_client::registry::Registry::default();
    theirs.register_collector(Box::new(UpstreamAdmissionCollector::new(
        Arc::clone(&a),
        "pool".into(),
    )));
    let text = |r: &prometheus_client::registry::Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    };
    let ours = text(&ours);
    assert!(ours.contains("kvroute_pool_saturation 2.0"), "{ours}");
    assert!(
        ours.contains("kvroute_flow_control_queue_size{priority=\"-2\"} 1"),
        "{ours}"
    );
    let theirs = text(&theirs);
    for prefix in ["llm_d_epp", "inference_extension"] {
        for want in [
            format!("{prefix}_flow_control_pool_saturation{{inference_pool=\"pool\"}} 2.0"),
            format!(
                "{prefix}_flow_control_queue_size{{inference_pool=\"pool\",priority=\"-2\"}} 1"
            ),
        ] {
            assert!(theirs.contains(&want), "{want}: {theirs}");
        }
    }
}
