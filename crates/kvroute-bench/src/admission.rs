//! Goodput under overload with and without admission: a share of the trace is sheddable
//! (priority < 0), and with admission upstream's `utilization-detector` refuses sheddable
//! arrivals while the pool is saturated, as `kvroute serve` does without the `flowControl`
//! gate. A refused request is answered at once (a 429) and never reaches a pod.
//!
//! The simulator routes every arrival somewhere, so a refused request goes to one extra
//! pod, a sink no router sees and no report counts: the real pods' load is exactly that of
//! the admitted requests.

use std::collections::HashSet;

use kvroute_scheduler::admission::{LoadSample, UtilizationDetector};
use kvroute_sim::{Cluster, Engine, PodView, Profile, RequestId, RouteFn, SimRequest, StepReport};
use serde::Serialize;

use crate::policy::Policy;
use crate::replicas::{Deployment, Replicas};
use crate::trace::{TraceRequest, arrivals};

/// How one class of requests fared.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClassReport {
    /// Requests of the class offered.
    pub sent: usize,
    /// Refused by admission.
    pub shed: usize,
    /// Served with a time to first token within the SLO.
    pub within_slo: usize,
    /// TTFT of the served ones, 90th percentile (0 when none was served).
    pub ttft_p90_ms: f64,
}

/// One run of [`run_admission`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdmissionReport {
    /// The routing policy.
    pub policy: String,
    /// Whether sheddable requests were refused while the pool was saturated.
    pub admission: bool,
    /// Priority ≥ 0.
    pub critical: ClassReport,
    /// Priority < 0.
    pub sheddable: ClassReport,
    /// Requests within the SLO per second, from the first arrival to the last answer.
    pub goodput_rps: f64,
    /// Critical requests within the SLO per second.
    pub critical_goodput_rps: f64,
}

/// Whether arrival `id` is sheddable when a `share` of the trace is: a fixed mix of the
/// request number, so every run marks the same requests.
pub fn sheddable(id: RequestId, share: f64) -> bool {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// A router in front of which admission refuses sheddable arrivals while the pool is
/// saturated, sending them to the sink pod (index `pods`).
struct Admitting {
    inner: Replicas,
    detector: Option<UtilizationDetector>,
    share: f64,
    pods: usize,
    shed: HashSet<RequestId>,
}

impl RouteFn for Admitting {
    fn route_with_engines(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> usize {
        let real = &pods[..self.pods.min(pods.len())];
        if let Some(detector) = &self.detector
            && sheddable(request.id, self.share)
        {
            // The simulator's views are what a scrape at this instant would say.
            let samples = real.iter().map(|v| {
                let load = crate::policy::scraped(v);
                LoadSample {
                    scraped: Some((load.waiting, load.running, load.kv_usage)),
                    in_flight: v.in_flight,
                }
            });
            if detector.saturation(samples, 0) >= 1.0 {
                self.shed.insert(request.id);
                return self.pods;
            }
        }
        let engines = &engines[..self.pods.min(engines.len())];
        self.inner
            .route_with_engines(now_us, request, real, engines)
    }

    fn observe(&mut self, now_us: u64, pod: usize, report: &StepReport) {
        if pod < self.pods {
            self.inner.observe(now_us, pod, report);
        }
    }
}

/// Replays `trace` open loop (`speedup`, `copies`) on `pods` pods of `profile` under
/// `policy`, a `share` of it sheddable; with `detector`, sheddable arrivals are refused
/// while the pool is saturated. A request is good when served with TTFT ≤ `slo_ms`.
#[allow(clippy::too_many_arguments, reason = "one run's every setting, named")]
pub fn run_admission(
    trace: &[TraceRequest],
    profile: &Profile,
    pods: usize,
    policy: Policy,
    (speedup, copies): (f64, usize),
    deployment: Deployment,
    share: f64,
    detector: Option<UtilizationDetector>,
    slo_ms: f64,
) -> AdmissionReport {
    let mut router = Admitting {
        inner: Replicas::new(policy, pods, profile, deployment),
        detector,
        share,
        pods,
        shed: HashSet::new(),
    };
    let mut cluster = Cluster::new(profile, pods + 1, policy.uses_events());
    let results = cluster.run(arrivals(trace, speedup, copies), &mut router);
    let mut classes = [ClassReport::default(), ClassReport::default()];
    let mut ttfts: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let first = results.iter().map(|r| r.arrival_us).min().unwrap_or(0);
    let mut last = first;
    for r in &results {
        let class = usize::from(sheddable(r.id, share));
        classes[class].sent += 1;
        if router.shed.contains(&r.id) {
            classes[class].shed += 1;
            continue;
        }
        let (Some(first_token), Some(finish)) = (r.first_token_us, r.finish_us) else {
            continue;
        };
        last = last.max(finish);
        let ttft = (first_token - r.arrival_us) as f64 / 1000.0;
        ttfts[class].push(ttft);
        if ttft <= slo_ms {
            classes[class].within_slo += 1;
        }
    }
    for (c, t) in classes.iter_mut().zip(&mut ttfts) {
        t.sort_by(f64::total_cmp);
        c.ttft_p90_ms = t
            .get(((t.len().saturating_sub(1)) as f64 * 0.9).round() as usize)
            .copied()
            .unwrap_or(0.0);
    }
    let span_s = ((last - first) as f64 / 1e6).max(1e-9);
    let [critical, sheddable] = classes;
    AdmissionReport {
        policy: policy.name().to_owned(),
        admission: router.detector.is_some(),
        goodput_rps: (critical.within_slo + sheddable.within_slo) as f64 / span_s,
        critical_goodput_rps: critical.within_slo as f64 / span_s,
        critical,
        sheddable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Workload;

    #[test]
    fn the_sheddable_share_is_about_what_was_asked() {
        for share in [0.0, 0.3, 0.5, 1.0] {
            let n = (0..10_000).filter(|&i| sheddable(i, share)).count();
            assert!(
                (n as f64 / 10_000.0 - share).abs() < 0.02,
                "{share}: {n} of 10,000"
            );
        }
    }

    #[test]
    fn under_overload_admission_sheds_only_sheddable_work_and_critical_work_gains() {
        let profile = Profile::h100_llama31_8b().with_block_size(64);
        let trace = Workload::SharedPrompts {
            tenants: 8,
            system_units: 2,
        }
        .generate(600, 200.0, 64, 3);
        let run = |detector| {
            run_admission(
                &trace,
                &profile,
                2,
                Policy::LeastLoad,
                (1.0, 1),
                Deployment::default(),
                0.5,
                detector,
                1_000.0,
            )
        };
        let off = run(None);
        let on = run(Some(UtilizationDetector::default()));
        assert_eq!(off.critical.sent + off.sheddable.sent, 600);
        assert_eq!((off.critical.shed, off.sheddable.shed), (0, 0));
        assert_eq!(on.critical.shed, 0, "critical work is never shed");
        assert!(on.sheddable.shed > 0, "{on:?}");
        // Two pods at 200 req/s: without admission most requests miss a 1 s TTFT.
        assert!(
            on.critical.ttft_p90_ms < off.critical.ttft_p90_ms,
            "{on:?} vs {off:?}"
        );
        assert!(on.critical.within_slo > off.critical.within_slo);
        assert!(on.goodput_rps > off.goodput_rps, "{on:?} vs {off:?}");
    }
}
