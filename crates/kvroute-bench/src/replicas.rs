//! Active-active: several kvroute replicas behind one Envoy cluster, each receiving its
//! share of the requests (Envoy balances ext_proc streams over the replicas), each reading
//! every pod's KV events and `/metrics`, none sharing its in-flight counts or its
//! approximate index with the others. Measures what that costs against one replica, and how
//! often the replicas would have decided alike.

use kvroute_sim::{Engine, PodView, Profile, RouteFn, SimRequest, StepReport};

use crate::policy::{Policy, PolicyRouter, TextPrompts};

/// How the router is deployed in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deployment {
    /// Replicas, each receiving requests in turn (Envoy's round robin over the ext_proc
    /// cluster).
    pub replicas: usize,
    /// Each replica reads the pods' load (waiting, running, KV usage) this often, simulated
    /// milliseconds, its first read offset by its place among the replicas; `None`: the
    /// router's own in-flight counts only.
    pub scrape_ms: Option<u64>,
    /// Pods that only compute prompts (the first this many; the rest decode), with
    /// kvroute's policies routing as `deploy/config/kvroute-pd.yaml` does; 0: every pod
    /// serves requests whole.
    pub prefill_pods: usize,
    /// The routing configuration kvroute's policies run instead of the shipped one for the
    /// pool (`kvroute bench --config`).
    pub config: Option<&'static str>,
    /// Pods that run slower than the profile (the first this many)…
    pub slow_pods: usize,
    /// …by this factor, in percent (200: twice as slow).
    pub slowdown_pct: u32,
    /// Prompts sent as text to the policies without events, at this many bytes a token;
    /// `None`: token ids.
    pub text: Option<TextPrompts>,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            replicas: 1,
            scrape_ms: None,
            prefill_pods: 0,
            config: None,
            slow_pods: 0,
            slowdown_pct: 100,
            text: None,
        }
    }
}

/// The replicas of one deployment, as one [`RouteFn`] the cluster drives.
#[derive(Debug)]
pub struct Replicas {
    routers: Vec<PolicyRouter>,
    next: usize,
    /// The replica that took the last request.
    last: usize,
    /// (request, other replica) pairs compared: every request, once per replica that did
    /// not receive it.
    pub compared: u64,
    /// Of those, pairs where the other replica would have chosen the same pod.
    pub agreed: u64,
}

impl Replicas {
    /// `deployment.replicas` routers of `policy` over `pods` pods of `profile`, each knowing
    /// the pods' KV capacity (which vLLM reports on `/metrics` and `serve` scrapes).
    pub fn new(policy: Policy, pods: usize, profile: &Profile, deployment: Deployment) -> Self {
        let n = deployment.replicas.max(1);
        let capacity = (profile.kv_blocks * profile.block_size) as u64;
        let routers = (0..n)
            .map(|i| {
                let router = PolicyRouter::with_roles(
                    policy,
                    pods,
                    profile.block_size,
                    deployment.prefill_pods,
                    deployment.config,
                )
                .with_pod_capacity(capacity);
                let router = match deployment.text {
                    Some(text) => router.with_text_prompts(text),
                    None => router,
                };
                match deployment.scrape_ms {
                    Some(ms) => {
                        let every = ms * 1000;
                        router.with_scrapes(every, every * i as u64 / n as u64)
                    }
                    None => router,
                }
            })
            .collect();
        Self {
            routers,
            next: 0,
            last: 0,
            compared: 0,
            agreed: 0,
        }
    }

    /// Share of compared decisions the other replicas agreed with; `None` with one replica
    /// or a policy that does not go through kvroute's scheduler.
    pub fn agreement(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.agreed as f64 / self.compared as f64)
    }

    /// Simulated microseconds each pod spent stepping (every replica sees every step).
    pub fn busy_us(&self) -> &[u64] {
        &self.routers[0].busy_us
    }

    /// Every replica's decision times, nanoseconds.
    pub fn decision_ns(&self) -> impl Iterator<Item = u64> + '_ {
        self.routers
            .iter()
            .flat_map(|r| r.decision_ns.iter().copied())
    }
}

impl RouteFn for Replicas {
    fn route_with_engines(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> usize {
        let chosen = self.next;
        self.last = chosen;
        self.next = (self.next + 1) % self.routers.len();
        let pod = self.routers[chosen].route_with_engines(now_us, request, pods, engines);
        for (i, other) in self.routers.iter_mut().enumerate() {
            if i == chosen {
                continue;
            }
            if let Some(theirs) = other.preview(now_us, request, pods, engines) {
                self.compared += 1;
                self.agreed += u64::from(theirs == pod);
            }
        }
        pod
    }

    fn take_prefill(&mut self) -> Option<usize> {
        self.routers[self.last].take_prefill()
    }

    fn observe(&mut self, now_us: u64, pod: usize, report: &StepReport) {
        for r in &mut self.routers {
            r.observe(now_us, pod, report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::req;

    /// Two replicas of the precise profile read the same events: a prefix one of them sent
    /// to a pod, the other finds there once the pod reports it, and they agree.
    #[test]
    fn replicas_take_turns_and_agree_on_what_the_events_say() {
        let deployment = Deployment {
            replicas: 2,
            scrape_ms: Some(50),
            ..Deployment::default()
        };
        let profile = Profile::h100_llama31_8b().with_block_size(512);
        let mut r = Replicas::new(Policy::Kvroute, 4, &profile, deployment);
        let views = vec![PodView::default(); 4];
        let first = r.route(0, &req(0, &[1, 2, 3, 4]), &views);
        // The pod stores the prompt's blocks and answers: every replica hears of it.
        let mut events = Vec::new();
        let mut parent = None;
        for (i, id) in [1u64, 2, 3, 4].into_iter().enumerate() {
            let tokens = req(0, &[1, 2, 3, 4]).prompt.tokens(i * 512, (i + 1) * 512);
            events.push(kvroute_sim::KvEvent::BlockStored {
                block_hashes: vec![id],
                parent_block_hash: parent,
                token_ids: tokens,
                block_size: 512,
                lora_name: None,
                medium: kvroute_sim::Medium::Gpu,
            });
            parent = Some(id);
        }
        let report = StepReport {
            events,
            first_tokens: vec![0],
            ..StepReport::default()
        };
        r.observe(0, first, &report);
        // The second request goes to the other replica, which never saw the first decision.
        assert_eq!(r.route(1, &req(1, &[1, 2, 3, 4, 9]), &views), first);
        assert_eq!(r.compared, 2);
        assert_eq!(r.agreement(), Some(1.0));
    }

    #[test]
    fn one_replica_compares_nothing() {
        let profile = Profile::h100_llama31_8b().with_block_size(512);
        let mut r = Replicas::new(Policy::KvrouteApprox, 4, &profile, Deployment::default());
        r.route(0, &req(0, &[1]), &[PodView::default(); 4]);
        assert_eq!(r.agreement(), None);
    }
}
