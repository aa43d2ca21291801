use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::engine::{Engine, RequestId, SimRequest, StepReport};
use crate::profile::Profile;

/// What a router may know of a pod when it routes: what vLLM's `/metrics` shows, plus the
/// requests it sent there and that have not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodView {
    /// `vllm:num_requests_waiting`.
    pub waiting: usize,
    /// `vllm:num_requests_running`.
    pub running: usize,
    /// `vllm:kv_cache_usage_perc`.
    pub kv_usage: f64,
    /// Routed here and not finished.
    pub in_flight: usize,
    /// Requests finished here since the run began (`vllm:request_prompt_tokens_count`).
    pub finished: u64,
    /// Their prompt tokens (`vllm:request_prompt_tokens_sum`).
    pub finished_prompt_tokens: u64,
}

/// A routing policy driven by the cluster: asked once per arrival, told what every step did.
pub trait RouteFn {
    /// The pod for `request`, arriving at `now_us`, with the engines themselves at hand,
    /// which no real router has: an oracle reads their caches and queues here; every other
    /// policy ignores them.
    fn route_with_engines(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        engines: &[Engine],
    ) -> usize;

    /// The pod for `request`, arriving at `now_us`, from what a router may know.
    fn route(&mut self, now_us: u64, request: &SimRequest, pods: &[PodView]) -> usize {
        self.route_with_engines(now_us, request, pods, &[])
    }

    /// A step of `pod` ended at `now_us` with `report` (its KV events, finished requests).
    fn observe(&mut self, _now_us: u64, _pod: usize, _report: &StepReport) {}

    /// After a decision: the pod that should compute the request's prompt first
    /// (disaggregated serving; the routed pod then decodes with the KV moved over). By
    /// default none.
    fn take_prefill(&mut self) -> Option<usize> {
        None
    }
}

/// Marks the id of the prompt-only request a prefill pod computes for request `id`
/// (disaggregated serving), so steps' reports tell the two apart.
pub const PREFILL_ID_BIT: RequestId = 1 << 62;

impl<F: FnMut(u64, &SimRequest, &[PodView]) -> usize> RouteFn for F {
    fn route_with_engines(
        &mut self,
        now_us: u64,
        request: &SimRequest,
        pods: &[PodView],
        _: &[Engine],
    ) -> usize {
        self(now_us, request, pods)
    }
}

/// How one request went, in virtual microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestResult {
    /// Arrival order (the cluster numbers requests itself).
    pub id: RequestId,
    /// The pod it was routed to.
    pub pod: usize,
    /// When it arrived.
    pub arrival_us: u64,
    /// When its first token was produced; `None` if it was rejected (its prompt cannot fit
    /// the pod's KV cache).
    pub first_token_us: Option<u64>,
    /// When its last token was produced.
    pub finish_us: Option<u64>,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub output_tokens: usize,
    /// Times its pod preempted it (freed its KV for others' and recomputed it later): what
    /// a pool packed to its KV cache's edge pays.
    pub preemptions: u32,
}

/// Pods stepped by a discrete-event loop in virtual time: no sockets, no sleeping, and the
/// same results for the same inputs.
#[derive(Debug)]
pub struct Cluster {
    pods: Vec<Engine>,
    views: Vec<PodView>,
    pending: Vec<Option<StepReport>>,
    /// Microseconds to move one prompt token's KV from a prefill pod to a decode pod.
    transfer_us_per_token: f64,
    /// Requests whose prompt a prefill pod is computing: the decode pod and the request.
    handoff: HashMap<RequestId, (usize, SimRequest)>,
    /// KV transfers under way: when each lands, by request.
    transfers: BinaryHeap<Reverse<(u64, RequestId)>>,
    /// Requests decoding with a prompt computed elsewhere.
    moved: HashSet<RequestId>,
}

impl Cluster {
    /// `n` idle pods of `profile`; with `events`, steps report KV events to the router.
    pub fn new(profile: &Profile, n: usize, events: bool) -> Self {
        Self::mixed(vec![profile.clone(); n], events)
    }

    /// A pod of each of `profiles` (a pool of unlike pods); with `events`, steps report KV
    /// events to the router.
    pub fn mixed(profiles: Vec<Profile>, events: bool) -> Self {
        let n = profiles.len();
        Self {
            pods: profiles
                .into_iter()
                .map(|p| Engine::new(p, events))
                .collect(),
            views: vec![PodView::default(); n],
            pending: vec![None; n],
            transfer_us_per_token: 0.0,
            handoff: HashMap::new(),
            transfers: BinaryHeap::new(),
            moved: HashSet::new(),
        }
    }

    /// The same cluster, moving a disaggregated prompt's KV at `us` microseconds a token
    /// (NIXL over RDMA: a model's KV bytes per token over the link's bandwidth).
    pub fn with_transfer_us_per_token(mut self, us: f64) -> Self {
        self.transfer_us_per_token = us.max(0.0);
        self
    }

    /// The pods (for inspection after a run).
    pub fn pods(&self) -> &[Engine] {
        &self.pods
    }

    /// Replays `arrivals` (`(arrival µs, request)`, in time order) through `router` until
    /// every request has finished (open loop: arrivals do not wait for answers). Requests are
    /// renumbered in arrival order, and results come back in that order. A step that ends at
    /// the same instant as an arrival is processed first.
    pub fn run(
        &mut self,
        arrivals: impl IntoIterator<Item = (u64, SimRequest)>,
        router: &mut dyn RouteFn,
    ) -> Vec<RequestResult> {
        let mut source = OpenLoop(arrivals.into_iter().peekable());
        self.drive(&mut source, router)
    }

    /// Closed loop: `users` users each send a request (the next from `requests`) at time 0,
    /// and their next one `think_us` after the previous one finishes, until `requests` runs
    /// out. This is how throughput is measured: the cluster is kept as busy as its users can
    /// make it, rather than fed at a rate fixed in advance.
    pub fn run_closed(
        &mut self,
        users: usize,
        think_us: u64,
        requests: impl IntoIterator<Item = SimRequest>,
        router: &mut dyn RouteFn,
    ) -> Vec<RequestResult> {
        let mut source = ClosedLoop {
            requests: requests.into_iter().peekable(),
            ready: (0..users).map(|u| Reverse((0, u))).collect(),
            user_of: Vec::new(),
            think_us,
        };
        self.drive(&mut source, router)
    }

    fn drive(&mut self, source: &mut dyn Source, router: &mut dyn RouteFn) -> Vec<RequestResult> {
        let mut results: Vec<RequestResult> = Vec::new();
        let mut steps: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut finished: Vec<RequestId> = Vec::new();
        let mut now = 0;
        if self.pods.is_empty() {
            return results;
        }
        loop {
            let next_step = steps.peek().map(|Reverse((t, _))| *t);
            let next_arrival = source.next_time().map(|t| t.max(now));
            let next_transfer = self.transfers.peek().map(|Reverse((t, _))| *t);
            if let Some(t) = next_transfer
                && next_step.is_none_or(|s| t < s)
                && next_arrival.is_none_or(|a| t <= a)
            {
                let Some(Reverse((t, id))) = self.transfers.pop() else {
                    break;
                };
                now = t;
                self.land(id, now, &mut steps, source);
                continue;
            }
            match (next_step, next_arrival) {
                (None, None) => break,
                (Some(t), a) if a.is_none_or(|a| t <= a) => {
                    let Some(Reverse((t, pod))) = steps.pop() else {
                        break;
                    };
                    now = t;
                    self.end_step(pod, now, &mut results, &mut finished, router);
                    for id in finished.drain(..) {
                        source.finished(id, now);
                    }
                    self.start_step(pod, now, &mut steps);
                }
                _ => {
                    let Some((t, mut req)) = source.pop() else {
                        break;
                    };
                    now = t.max(now);
                    let id = results.len() as RequestId;
                    req.id = id;
                    let n = self.pods.len();
                    let pod = router
                        .route_with_engines(now, &req, &self.views, &self.pods)
                        .min(n - 1);
                    let prefill = router.take_prefill().filter(|&p| p < n && p != pod);
                    results.push(RequestResult {
                        id,
                        pod,
                        arrival_us: now,
                        first_token_us: None,
                        finish_us: None,
                        prompt_tokens: req.prompt.len(),
                        cached_tokens: 0,
                        output_tokens: 0,
                        preemptions: 0,
                    });
                    let (target, queued) = match prefill {
                        Some(p) => {
                            let prompt_only = SimRequest {
                                id: id | PREFILL_ID_BIT,
                                prompt: req.prompt.clone(),
                                max_tokens: 1,
                                lora: req.lora.clone(),
                            };
                            let added = self.pods[p].add(prompt_only);
                            if added {
                                self.handoff.insert(id, (pod, req));
                                self.views[pod].in_flight += 1;
                            }
                            (p, added)
                        }
                        None => (pod, self.pods[pod].add(req)),
                    };
                    if queued {
                        self.views[target].in_flight += 1;
                        self.refresh(target);
                        if self.pending[target].is_none() {
                            self.start_step(target, now, &mut steps);
                        }
                    } else {
                        // Refused: it ends now (its user, in a closed loop, goes on).
                        source.finished(id, now);
                    }
                }
            }
        }
        results
    }

    /// Request `id`'s prompt KV reached its decode pod: it joins that pod's queue.
    fn land(
        &mut self,
        id: RequestId,
        now: u64,
        steps: &mut BinaryHeap<Reverse<(u64, usize)>>,
        source: &mut dyn Source,
    ) {
        let Some((pod, req)) = self.handoff.remove(&id) else {
            return;
        };
        if self.pods[pod].add_transferred(req) {
            self.moved.insert(id);
            self.refresh(pod);
            self.start_step(pod, now, steps);
        } else {
            self.views[pod].in_flight = self.views[pod].in_flight.saturating_sub(1);
            source.finished(id, now);
        }
    }

    fn start_step(&mut self, pod: usize, now: u64, steps: &mut BinaryHeap<Reverse<(u64, usize)>>) {
        if self.pending[pod].is_some() || !self.pods[pod].has_work() {
            return;
        }
        let report = self.pods[pod].step();
        self.refresh(pod);
        steps.push(Reverse((now + report.duration_us.max(1), pod)));
        self.pending[pod] = Some(report);
    }

    fn end_step(
        &mut self,
        pod: usize,
        now: u64,
        results: &mut [RequestResult],
        finished: &mut Vec<RequestId>,
        router: &mut dyn RouteFn,
    ) {
        let Some(report) = self.pending[pod].take() else {
            return;
        };
        for &id in &report.first_tokens {
            if id & PREFILL_ID_BIT != 0 {
                continue;
            }
            if let Some(r) = results.get_mut(id as usize) {
                r.first_token_us = Some(now);
            }
        }
        for &id in &report.preempted {
            if let Some(r) = results.get_mut((id & !PREFILL_ID_BIT) as usize) {
                r.preemptions += 1;
            }
        }
        for f in &report.finished {
            let view = &mut self.views[pod];
            view.in_flight = view.in_flight.saturating_sub(1);
            view.finished += 1;
            view.finished_prompt_tokens += f.prompt_tokens as u64;
            if f.id & PREFILL_ID_BIT != 0 {
                // The prompt is computed: its KV now moves to the decode pod.
                let id = f.id & !PREFILL_ID_BIT;
                if let Some(r) = results.get_mut(id as usize) {
                    r.cached_tokens = f.cached_tokens;
                }
                let moved = (f.prompt_tokens as f64 * self.transfer_us_per_token).round() as u64;
                self.transfers.push(Reverse((now + moved, id)));
                continue;
            }
            finished.push(f.id);
            if let Some(r) = results.get_mut(f.id as usize) {
                r.finish_us = Some(now);
                // A moved prompt's hits were counted where it was computed.
                if !self.moved.remove(&f.id) {
                    r.cached_tokens = f.cached_tokens;
                }
                r.output_tokens = f.output_tokens;
            }
        }
        router.observe(now, pod, &report);
    }

    fn refresh(&mut self, pod: usize) {
        let e = &self.pods[pod];
        let v = &mut self.views[pod];
        v.waiting = e.waiting();
        v.running = e.running();
        v.kv_usage = e.kv_usage();
    }
}

/// Where requests come from, and when.
trait Source {
    /// When the next request arrives, if one is due at all.
    fn next_time(&mut self) -> Option<u64>;
    /// The next request and its arrival time.
    fn pop(&mut self) -> Option<(u64, SimRequest)>;
    /// Request `id` (numbered in `pop` order from 0) finished at `now`.
    fn finished(&mut self, id: RequestId, now: u64);
}

struct OpenLoop<I: Iterator<Item = (u64, SimRequest)>>(std::iter::Peekable<I>);

impl<I: Iterator<Item = (u64, SimRequest)>> Source for OpenLoop<I> {
    fn next_time(&mut self) -> Option<u64> {
        self.0.peek().map(|(t, _)| *t)
    }

    fn pop(&mut self) -> Option<(u64, SimRequest)> {
        self.0.next()
    }

    fn finished(&mut self, _id: RequestId, _now: u64) {}
}

struct ClosedLoop<I: Iterator<Item = SimRequest>> {
    requests: std::iter::Peekable<I>,
    /// Users ready to send, by the time they are ready.
    ready: BinaryHeap<Reverse<(u64, usize)>>,
    /// The user of each request sent, by request id.
    user_of: Vec<usize>,
    think_us: u64,
}

impl<I: Iterator<Item = SimRequest>> Source for ClosedLoop<I> {
    fn next_time(&mut self) -> Option<u64> {
        // No request left to send: ready users have nothing to arrive with.
        self.requests.peek()?;
        self.ready.peek().map(|Reverse((t, _))| *t)
    }

    fn pop(&mut self) -> Option<(u64, SimRequest)> {
        let req = self.requests.next()?;
        let Reverse((t, user)) = self.ready.pop()?;
        self.user_of.push(user);
        Some((t, req))
    }

    fn finished(&mut self, id: RequestId, now: u64) {
        if let Some(&user) = self.user_of.get(id as usize) {
            self.ready.push(Reverse((now + self.think_us, user)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::PromptTokens;

    fn req(tokens: Vec<u32>, max_tokens: usize) -> SimRequest {
        SimRequest {
            id: 0,
            prompt: PromptTokens::Explicit(Arc::from(tokens)),
            max_tokens,
            lora: None,
        }
    }

    #[test]
    fn replays_in_virtual_time_deterministically() {
        let profile = Profile::tiny(64, 4, 16);
        let arrivals = || {
            (0..40u64).map(|i| {
                let prefix = (i % 3) as u32 * 1000;
                let tokens: Vec<u32> = (prefix..prefix + 12)
                    .chain(i as u32 * 7..i as u32 * 7 + 5)
                    .collect();
                (i * 150, req(tokens, 1 + (i % 4) as usize))
            })
        };
        let run = || {
            let mut c = Cluster::new(&profile, 2, true);
            let mut rr = 0usize;
            let mut route = |_: u64, _: &SimRequest, pods: &[PodView]| {
                rr += 1;
                rr % pods.len()
            };
            c.run(arrivals(), &mut route)
        };
        let a = run();
        assert_eq!(a, run(), "same inputs, same results");
        assert_eq!(a.len(), 40);
        for r in &a {
            let first = r.first_token_us.unwrap();
            let done = r.finish_us.unwrap();
            assert!(r.arrival_us < first && first <= done, "{r:?}");
        }
        assert!(a.iter().any(|r| r.cached_tokens > 0), "shared prefixes hit");
        assert_eq!(a.iter().filter(|r| r.pod == 0).count(), 20);
    }

    #[test]
    fn one_request_alone_takes_exactly_its_steps() {
        let mut c = Cluster::new(&Profile::tiny(64, 4, 64), 1, false);
        let mut route = |_: u64, _: &SimRequest, _: &[PodView]| 0;
        let r = c.run([(1_000, req((0..10).collect(), 3))], &mut route);
        // 110 µs prefill (first token), then two 110 µs decode steps.
        assert_eq!(r[0].first_token_us, Some(1_110));
        assert_eq!(r[0].finish_us, Some(1_330));
    }

    /// The engine's test of a pool short of blocks, through the cluster: the request that
    /// yields its blocks is counted, the one that kept them is not.
    #[test]
    fn each_request_counts_its_preemptions() {
        let mut c = Cluster::new(&Profile::tiny(3, 8, 64), 1, false);
        let mut route = |_: u64, _: &SimRequest, _: &[PodView]| 0;
        let r = c.run(
            [
                (0, req((0..4).collect(), 3)),
                (0, req((10..14).collect(), 3)),
            ],
            &mut route,
        );
        assert!(r.iter().all(|x| x.finish_us.is_some()));
        assert_eq!(r.iter().map(|x| x.preemptions).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn closed_loop_keeps_each_user_to_one_request_at_a_time() {
        let mut c = Cluster::new(&Profile::tiny(64, 8, 64), 1, false);
        let mut route = |_: u64, _: &SimRequest, _: &[PodView]| 0;
        let requests = (0..9).map(|i| req((i * 10..i * 10 + 8).collect(), 2));
        let r = c.run_closed(3, 50, requests, &mut route);
        assert_eq!(r.len(), 9);
        assert!(r.iter().all(|x| x.finish_us.is_some()));
        // Three start at 0; every later request arrives 50 µs after some earlier one ended.
        assert_eq!(r.iter().filter(|x| x.arrival_us == 0).count(), 3);
        for later in r.iter().skip(3) {
            assert!(
                r.iter()
                    .any(|e| e.finish_us.map(|f| f + 50) == Some(later.arrival_us)),
                "{later:?}"
            );
        }
        // Never more than three in flight.
        for x in &r {
            let in_flight = r
                .iter()
                .filter(|o| o.arrival_us <= x.arrival_us && o.finish_us.unwrap() > x.arrival_us)
                .count();
            assert!(in_flight <= 3, "{x:?}");
        }
        let mut none = Cluster::new(&Profile::tiny(64, 8, 64), 0, false);
        assert!(
            none.run_closed(2, 0, [req(vec![1, 2, 3], 1)], &mut route)
                .is_empty()
        );
    }

    #[test]
    fn a_prompt_larger_than_the_cache_is_rejected() {
        let mut c = Cluster::new(&Profile::tiny(2, 4, 64), 1, false);
        let mut route = |_: u64, _: &SimRequest, _: &[PodView]| 0;
        let r = c.run(
            [
                (0, req((0..100).collect(), 1)),
                (5, req((0..4).collect(), 1)),
            ],
            &mut route,
        );
        assert_eq!(r[0].first_token_us, None);
        assert!(
            r[1].finish_us.is_some(),
            "the next request is not stuck behind it"
        );
    }

    /// Routes everything to pod 1 with pod 0 prefilling.
    struct Disaggregated;

    impl RouteFn for Disaggregated {
        fn route_with_engines(
            &mut self,
            _: u64,
            _: &SimRequest,
            _: &[PodView],
            _: &[Engine],
        ) -> usize {
            1
        }

        fn take_prefill(&mut self) -> Option<usize> {
            Some(0)
        }
    }

    /// A disaggregated request: its prompt computed on the prefill pod (one step), its KV
    /// moved (10 µs a token), then one step on the decode pod computing the last token and
    /// giving the first; both pods hold the prompt after.
    #[test]
    fn a_disaggregated_request_is_prefilled_moved_then_decoded() {
        let mut c =
            Cluster::new(&Profile::tiny(64, 4, 64), 2, true).with_transfer_us_per_token(10.0);
        let prompt = req((0..16).collect(), 3);
        let r = c.run([(1_000, prompt.clone())], &mut Disaggregated);
        // Prefill pod: 100 + 16 µs; transfer 160 µs; decode pod: 100 + 4 (the last block's
        // tokens), then two decode steps of 110 µs.
        assert_eq!(r[0].pod, 1);
        assert_eq!(r[0].first_token_us, Some(1_000 + 116 + 160 + 104));
        assert_eq!(r[0].finish_us, Some(1_000 + 116 + 160 + 104 + 220));
        assert_eq!(r[0].output_tokens, 3);
        for pod in c.pods() {
            assert_eq!(pod.cached_prefix_tokens(&prompt.prompt), 12);
        }
    }
}
