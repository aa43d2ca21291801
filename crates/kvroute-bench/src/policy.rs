use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kvroute_core::{ApiKind, Endpoint, EndpointId, InferenceRequest, Prompt, RequestHints};
use kvroute_endpoints::{EndpointState, InFlightGuard, Registry};
use kvroute_scheduler::{
    LoadScorer, PrefixCacheConfig, PrefixCacheScorer, Profile, Scheduler, SchedulingRequest,
};
use kvroute_sim::{PodView, RequestId, RouteFn, SimRequest, StepReport};

use crate::synthetic::Rng;

/// Prompt tokens handed to the router: the approximate scorer hashes at most 256 blocks of
/// 64 bytes, which token ids (4 bytes each) fill after 4,096 tokens.
const ROUTED_PROMPT_TOKENS: usize = 4096;

/// A routing policy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Each pod in turn.
    RoundRobin,
    /// A uniformly random pod (seeded).
    Random,
    /// Fewest requests in flight (kvroute's `--policy least-in-flight`).
    LeastLoad,
    /// Approximate prefix affinity with the Inference Extension's weights: prefix 3 against
    /// load 4 (its queue 2 + KV-utilisation 2, both stood in for by in-flight counts), load
    /// normalised min–max as its queue scorer does.
    ApproxPrefix,
    /// `kvroute serve`'s default profile: prefix 3, load 4 with an 8-request headroom.
    Kvroute,
}

impl Policy {
    /// Every policy, in report order.
    pub const ALL: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastLoad,
        Policy::ApproxPrefix,
        Policy::Kvroute,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::LeastLoad => "least-load",
            Self::ApproxPrefix => "approx-prefix",
            Self::Kvroute => "kvroute",
        }
    }

    /// The policy named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Routes simulator arrivals with one policy, through kvroute's scheduler where the policy
/// is one of kvroute's, and keeps the router-side books: in-flight claims, decision time,
/// each pod's busy time.
pub struct PolicyRouter {
    policy: Policy,
    next: usize,
    rng: Rng,
    scheduler: Option<Box<dyn Scheduler>>,
    endpoints: Arc<Vec<Arc<EndpointState>>>,
    claims: HashMap<RequestId, InFlightGuard>,
    /// Nanoseconds each scheduling call took (policies that use kvroute's scheduler).
    pub decision_ns: Vec<u64>,
    /// Simulated microseconds each pod spent stepping.
    pub busy_us: Vec<u64>,
}

impl std::fmt::Debug for PolicyRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyRouter")
            .field("policy", &self.policy)
            .field("pods", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl PolicyRouter {
    /// A router over `pods` pods (endpoint `pod-0000` is pod 0, and so on).
    pub fn new(policy: Policy, pods: usize) -> Self {
        let registry = Registry::new();
        registry.replace(
            (0..pods)
                .map(|i| Endpoint {
                    id: EndpointId::new(format!("pod-{i:04}")),
                    address: ([10, 0, (i >> 8) as u8, (i & 0xff) as u8], 8000).into(),
                    labels: Default::default(),
                })
                .collect(),
        );
        let prefix = || -> Box<dyn kvroute_scheduler::Scorer> {
            Box::new(PrefixCacheScorer::new(&PrefixCacheConfig::default()))
        };
        let scheduler: Option<Box<dyn Scheduler>> = match policy {
            Policy::RoundRobin | Policy::Random => None,
            Policy::LeastLoad => Some(Box::new(Profile::least_in_flight(0))),
            Policy::ApproxPrefix => Some(Box::new(Profile::new(
                vec![(prefix(), 3.0), (Box::new(LoadScorer::new(1)), 4.0)],
                0,
            ))),
            Policy::Kvroute => Some(Box::new(Profile::new(
                vec![(prefix(), 3.0), (Box::new(LoadScorer::default()), 4.0)],
                0,
            ))),
        };
        Self {
            policy,
            next: 0,
            rng: Rng::new(0x9e37_79b9_7f4a_7c15),
            scheduler,
            endpoints: registry.snapshot(),
            claims: HashMap::new(),
            decision_ns: Vec::new(),
            busy_us: vec![0; pods],
        }
    }

    fn pick(&mut self, request: &SimRequest, pods: usize) -> usize {
        match self.policy {
            Policy::RoundRobin => {
                self.next = (self.next + 1) % pods;
                self.next
            }
            Policy::Random => {
                // Seeded, so runs repeat.
                self.rng.below(pods as u64) as usize
            }
            _ => self.schedule(request),
        }
    }

    fn schedule(&mut self, request: &SimRequest) -> usize {
        let Some(scheduler) = &self.scheduler else {
            return 0;
        };
        let routed = request.prompt.len().min(ROUTED_PROMPT_TOKENS);
        let parsed = InferenceRequest {
            api: ApiKind::Completions,
            model: "bench".into(),
            prompt: Prompt::Tokens(request.prompt.tokens(0, routed)),
            cache_salt: None,
            stream: true,
            max_tokens: Some(request.max_tokens as u64),
            hints: RequestHints::default(),
        };
        let hints = RequestHints::default();
        // The router's own cost: the scheduling call, not building the request above (token
        // ids that a real request would carry, generated here from content ids).
        let started = Instant::now();
        let decided = scheduler.schedule(
            &SchedulingRequest::new(Some(&parsed), &hints),
            &self.endpoints,
        );
        self.decision_ns
            .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        let Ok(decision) = decided else {
            return 0;
        };
        let primary = decision.primary();
        self.claims.insert(request.id, primary.acquire());
        self.endpoints
            .iter()
            .position(|e| Arc::ptr_eq(e, primary))
            .unwrap_or(0)
    }
}

impl RouteFn for PolicyRouter {
    fn route(&mut self, _now_us: u64, request: &SimRequest, pods: &[PodView]) -> usize {
        self.pick(request, pods.len().max(1))
    }

    fn observe(&mut self, _now_us: u64, pod: usize, report: &StepReport) {
        if let Some(b) = self.busy_us.get_mut(pod) {
            *b += report.duration_us;
        }
        for f in &report.finished {
            self.claims.remove(&f.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvroute_sim::PromptTokens;

    use super::*;

    fn req(id: RequestId, ids: &[u64]) -> SimRequest {
        SimRequest {
            id,
            prompt: PromptTokens::Synthetic {
                ids: Arc::from(ids),
                unit: 512,
                len: ids.len() * 512,
            },
            max_tokens: 1,
        }
    }

    #[test]
    fn kvroute_sends_a_shared_prefix_home() {
        let mut r = PolicyRouter::new(Policy::Kvroute, 4);
        let views = vec![PodView::default(); 4];
        let first = r.route(0, &req(0, &[1, 2, 3, 4]), &views);
        for i in 1..4 {
            assert_eq!(
                r.route(0, &req(i, &[1, 2, 3, 4, 100 + i]), &views),
                first,
                "request {i}"
            );
        }
        assert_ne!(
            r.route(0, &req(9, &[7, 8]), &views),
            first,
            "other content, other pod"
        );
    }
}
