use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use kvroute_core::{Endpoint, EndpointId};

use crate::health::{Health, HealthConfig, HealthState};
use crate::load::{FreshLoad, PodLoad, Scraped, is_fresh};
use crate::speed::{CountedPromptBytes, PrefillSpeed, PromptBytes, PromptCounts};

/// Told when the endpoint set changes, so that whoever keeps per-endpoint state (index
/// entries, metric series, subscriptions) can drop what belongs to departed endpoints.
pub trait EndpointsListener: Send + Sync + std::fmt::Debug {
    /// Called after the endpoint set changed, with the endpoints now routable and the ids
    /// that left (an endpoint whose address changed counts as departed and new).
    fn endpoints_changed(&self, current: &[Arc<EndpointState>], departed: &[EndpointId]);
}

/// One endpoint and its live load. Shared by the registry and by every request routed to it,
/// so a request that outlives the endpoint's removal still releases its count safely.
#[derive(Debug)]
pub struct EndpointState {
    endpoint: Endpoint,
    in_flight: AtomicUsize,
    /// Requests ever routed here by this router (never decreases).
    routed: AtomicU64,
    /// Of those, the ones whose response has ended (never decreases).
    ended: AtomicU64,
    /// Tokens the pod's KV cache holds at most, as it last said; 0 while unknown.
    kv_capacity_tokens: AtomicU64,
    prefill_backlog: AtomicU64,
    speed: PrefillSpeed,
    prompt_bytes: PromptBytes,
    /// Bytes (`Prompt::index_bytes`) of the prompts answered here with a 200 (never
    /// decreases), and how many: this router's side of `counted_bytes`.
    answered_bytes: AtomicU64,
    answered: AtomicU64,
    counted_bytes: CountedPromptBytes,
    events_confirmed: AtomicBool,
    scraped: ArcSwapOption<Scraped>,
    scrape_errors: AtomicU64,
    health: HealthState,
    departed: AtomicBool,
}

impl EndpointState {
    fn new(endpoint: Endpoint, health: HealthConfig) -> Self {
        Self {
            endpoint,
            in_flight: AtomicUsize::new(0),
            routed: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            kv_capacity_tokens: AtomicU64::new(0),
            prefill_backlog: AtomicU64::new(0),
            speed: PrefillSpeed::default(),
            prompt_bytes: PromptBytes::default(),
            answered_bytes: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            counted_bytes: CountedPromptBytes::default(),
            events_confirmed: AtomicBool::new(false),
            scraped: ArcSwapOption::empty(),
            scrape_errors: AtomicU64::new(0),
            health: HealthState::new(health),
            departed: AtomicBool::new(false),
        }
    }

    /// A state outside any registry, for tests.
    #[cfg(test)]
    fn detached(endpoint: Endpoint, health: HealthConfig) -> Arc<Self> {
        Arc::new(Self::new(endpoint, health))
    }

    /// Who this is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether this state has left the registry (the endpoint went, or came back with
    /// another address as a new state). Set before the endpoint-change listeners run, so a
    /// plugin that checks it under the lock its pruning takes never records for a departed
    /// endpoint after the pruning.
    pub fn departed(&self) -> bool {
        self.departed.load(Ordering::Acquire)
    }

    /// Shorthand for the id.
    pub fn id(&self) -> &EndpointId {
        &self.endpoint.id
    }

    /// Where Envoy should send the request.
    pub fn address(&self) -> SocketAddr {
        self.endpoint.address
    }

    /// Requests routed here whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Prompt tokens routed here that are expected to need computing (not cached) and whose
    /// first output token has not come back yet: the prefill work queued ahead of the next
    /// request, which is most of its time to first token.
    pub fn prefill_backlog(&self) -> u64 {
        self.prefill_backlog.load(Ordering::Relaxed)
    }

    /// Microseconds a queued prompt token has cost here, learnt from the requests routed
    /// here (`PrefillSpeed`); `None` until one long enough has had its first answer bytes.
    pub fn prefill_us_per_token(&self) -> Option<f64> {
        self.speed.us_per_token()
    }

    /// The pod answered (200) a prompt of `index_bytes` (`Prompt::index_bytes`; 0 when
    /// the body had none), reporting it `usage_tokens` tokens when the answer carried usage:
    /// teaches [`EndpointState::prompt_bytes_per_token`], from the usage, and from the pod's
    /// count of its prompts at the next scrape.
    pub fn observe_answer(&self, index_bytes: u64, usage_tokens: Option<u64>) {
        if index_bytes == 0 {
            return;
        }
        if let Some(tokens) = usage_tokens {
            self.prompt_bytes.observe(index_bytes, tokens);
        }
        self.answered_bytes
            .fetch_add(index_bytes, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Prompt bytes per token of the pod's tokenizer: learnt from the token counts its
    /// answers report, or where they report none, from the pod's own count of the prompts
    /// it finished (`vllm:request_prompt_tokens`, scraped) against the prompts this router
    /// saw answered there; `None` until a few long enough prompts were answered.
    pub fn prompt_bytes_per_token(&self) -> Option<f64> {
        self.prompt_bytes
            .per_token()
            .or_else(|| self.counted_bytes.per_token())
    }

    /// The pod's KV capacity in prompt bytes as the approximate index reads prompts: its
    /// capacity in tokens at the bytes per token learnt here, or at `BYTES_PER_TOKEN` until
    /// then (exact for token-id prompts). What sizes the approximate index's memory of the
    /// pod: at a fixed 4 bytes a token, a tokenizer that makes 2 bytes a token would have it
    /// remember twice what the pod holds.
    pub fn kv_capacity_index_bytes(&self) -> Option<u64> {
        Some(self.index_bytes_of(self.kv_capacity_tokens()?))
    }

    /// `tokens` of this pod's tokenizer in prompt bytes as the approximate index reads
    /// prompts: at the bytes per token learnt here, or `BYTES_PER_TOKEN` until then.
    pub fn index_bytes_of(&self, tokens: u64) -> u64 {
        let per_token = self
            .prompt_bytes_per_token()
            .unwrap_or(kvroute_core::BYTES_PER_TOKEN as f64);
        (tokens as f64 * per_token).round() as u64
    }

    /// Whether this endpoint's KV-event stream is followed and in sequence, so that what the
    /// precise index says of it can be trusted. False until a subscriber has synced, and
    /// again while its stream is broken or silent when it should not be.
    pub fn events_confirmed(&self) -> bool {
        self.events_confirmed.load(Ordering::Relaxed)
    }

    /// Set by the endpoint's KV-event subscriber.
    pub fn set_events_confirmed(&self, confirmed: bool) {
        self.events_confirmed.store(confirmed, Ordering::Relaxed);
    }

    /// The last successful scrape and when it was taken; None before the first.
    pub fn scraped(&self) -> arc_swap::Guard<Option<Arc<Scraped>>> {
        self.scraped.load()
    }

    /// The last scrape if it is younger than `staleness`; None when stale or absent (a stale
    /// scrape is never read as fresh). No allocation, no lock: an `arc_swap` guard.
    pub fn fresh_load(&self, now: Instant, staleness: Duration) -> Option<FreshLoad> {
        let guard = self.scraped.load();
        let (at, routed_before, ended_before) = guard
            .as_ref()
            .map(|s| (s.at, s.routed_before, s.ended_before))?;
        let routed_since = self
            .routed
            .load(Ordering::Relaxed)
            .saturating_sub(routed_before);
        let ended_since = self
            .ended
            .load(Ordering::Relaxed)
            .saturating_sub(ended_before);
        is_fresh(at, now, staleness).then_some(FreshLoad {
            guard,
            at,
            routed_since,
            ended_since,
        })
    }

    /// Stores a successful scrape taken at `at`, noting how many requests this router had
    /// routed here by then and how many of them had ended, so that those routed after it
    /// can be added to what it said and those ended after it taken off
    /// ([`FreshLoad::requests_now`]). It is not a health success: a pod whose
    /// `/metrics` answers while its API fails every request must still be ejected, and
    /// scrapes come far more often than a quiet pod's requests. Only a request answered
    /// without a 5xx clears failures.
    pub fn record_scrape(&self, load: PodLoad, at: Instant) {
        if let Some(tokens) = load.kv_capacity_tokens() {
            self.set_kv_capacity_tokens(tokens);
        }
        if let Some(prompts) = load.prompts {
            self.counted_bytes.observe(PromptCounts {
                pod_tokens: prompts.tokens,
                pod_requests: prompts.requests,
                own_bytes: self.answered_bytes.load(Ordering::Relaxed),
                own_requests: self.answered.load(Ordering::Relaxed),
            });
        }
        self.scraped.store(Some(Arc::new(Scraped {
            load,
            at,
            routed_before: self.routed.load(Ordering::Relaxed),
            ended_before: self.ended.load(Ordering::Relaxed),
        })));
    }

    /// Tokens the pod's KV cache holds at most, from its last scrape that said
    /// (`vllm:cache_config_info`); it does not go stale, being the engine's configuration.
    pub fn kv_capacity_tokens(&self) -> Option<u64> {
        Some(self.kv_capacity_tokens.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Sets what [`EndpointState::kv_capacity_tokens`] says, for a source other than a scrape
    /// (the simulated pods of `kvroute bench`).
    pub fn set_kv_capacity_tokens(&self, tokens: u64) {
        self.kv_capacity_tokens.store(tokens, Ordering::Relaxed);
    }

    /// Counts a failed scrape (refused, timed out, not 200, too large, unparseable): an
    /// error for the metrics. The last good scrape is kept, and ages.
    ///
    /// Not a health failure: a pod's `/metrics` can time out while its API serves (vLLM
    /// answers both on one event loop), and a pod that is gone fails its requests, which
    /// count. A failing scrape only leaves the load unknown (stale), which the load scorers
    /// rank last.
    pub fn record_scrape_error(&self) {
        self.scrape_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Scrapes that failed since the endpoint appeared.
    pub fn scrape_errors(&self) -> u64 {
        self.scrape_errors.load(Ordering::Relaxed)
    }

    /// Passive health: record one request outcome seen by the router (ok = false for a 5xx
    /// answer, a reset or a refused connection).
    pub fn record_outcome(&self, ok: bool, now: Instant) {
        if ok {
            self.health.success(now);
        } else {
            self.health.failure(now);
        }
    }

    /// Health as the scheduler should see it now (model and formula: [`Health`]'s module
    /// docs, `crate::health`).
    pub fn health(&self, now: Instant) -> Health {
        self.health.health(now)
    }

    /// Times this endpoint was ejected since it appeared.
    pub fn ejections(&self) -> u64 {
        self.health.ejections()
    }

    /// Failures (scrapes or requests) since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.health.failures()
    }

    /// Counts one more request against this endpoint until the guard is dropped, so that a
    /// request that ends any way at all (completion, error, client gone) gives its slot back.
    pub fn acquire(self: &Arc<Self>) -> InFlightGuard {
        self.acquire_with_prefill(0)
    }

    /// As [`EndpointState::acquire`], also counting `prefill_tokens` in the prefill backlog
    /// until [`InFlightGuard::prefilled`] is called or the guard dropped.
    pub fn acquire_with_prefill(self: &Arc<Self>, prefill_tokens: u64) -> InFlightGuard {
        self.acquire_with_prefill_at(prefill_tokens, Instant::now())
    }

    /// As [`EndpointState::acquire_with_prefill`], routed at `at` (the benchmark's virtual
    /// clock; see [`InFlightGuard::prefilled_at`]).
    pub fn acquire_with_prefill_at(
        self: &Arc<Self>,
        prefill_tokens: u64,
        at: Instant,
    ) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.routed.fetch_add(1, Ordering::Relaxed);
        let ahead = self
            .prefill_backlog
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        InFlightGuard {
            endpoint: Arc::clone(self),
            prefill_tokens,
            routed: Some((at, ahead)),
        }
    }
}

/// One request's claim on an endpoint's in-flight count (and prefill backlog); dropping it
/// releases the claim.
#[derive(Debug)]
pub struct InFlightGuard {
    endpoint: Arc<EndpointState>,
    prefill_tokens: u64,
    /// When it was routed and the prefill tokens queued there ahead of it, until its first
    /// answer bytes teach the endpoint's speed.
    routed: Option<(Instant, u64)>,
}

impl InFlightGuard {
    /// The endpoint the claim is on.
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    /// The request's first token came back: its prefill no longer waits ahead of others,
    /// and the time it took teaches the endpoint's speed.
    pub fn prefilled(&mut self) {
        self.prefilled_at(Instant::now());
    }

    /// [`InFlightGuard::prefilled`], at `now` (the benchmark's virtual clock).
    pub fn prefilled_at(&mut self, now: Instant) {
        if let Some((at, ahead)) = self.routed.take() {
            self.endpoint.speed.observe(
                ahead + self.prefill_tokens,
                now.saturating_duration_since(at),
            );
        }
        self.release_backlog();
    }

    /// The request's prefill is over, but this moment does not time it: a non-streamed
    /// answer's first bytes come once it is whole, and response headers can come before any
    /// token. The backlog is released and the endpoint's speed is not taught.
    pub fn prefilled_untimed(&mut self) {
        self.routed = None;
        self.release_backlog();
    }

    fn release_backlog(&mut self) {
        let n = std::mem::take(&mut self.prefill_tokens);
        self.endpoint
            .prefill_backlog
            .fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // An answer that never started teaches nothing.
        self.release_backlog();
        self.endpoint.ended.fetch_add(1, Ordering::Relaxed);
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The current endpoint list, readable without locks.
#[derive(Debug, Default)]
pub struct Registry {
    current: ArcSwap<Vec<Arc<EndpointState>>>,
    health: HealthConfig,
    listeners: ArcSwap<Vec<Arc<dyn EndpointsListener>>>,
}

impl Registry {
    /// An empty registry: nothing routable until a source fills it. Health uses
    /// [`HealthConfig::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose endpoints follow `health` (the config is fixed for the
    /// registry's life: every endpoint it creates copies it).
    pub fn with_health(health: HealthConfig) -> Self {
        Self {
            health,
            ..Self::default()
        }
    }

    /// The health config every endpoint of this registry follows.
    pub fn health_config(&self) -> HealthConfig {
        self.health
    }

    /// Calls `listener` after every change of the endpoint set, from the thread that made
    /// it (keep it short). Listeners are never removed; the registry keeps them alive.
    pub fn subscribe(&self, listener: Arc<dyn EndpointsListener>) {
        self.listeners.rcu(|old| {
            let mut v = Vec::clone(old);
            v.push(Arc::clone(&listener));
            v
        });
    }

    /// The endpoints as of now, sorted by id. Cheap: one atomic load and a reference count.
    pub fn snapshot(&self) -> Arc<Vec<Arc<EndpointState>>> {
        self.current.load_full()
    }

    /// Number of endpoints as of now.
    pub fn len(&self) -> usize {
        self.current.load().len()
    }

    /// Whether nothing is routable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoint serving `address`, if it is listed.
    pub fn find_by_address(&self, address: SocketAddr) -> Option<Arc<EndpointState>> {
        self.current
            .load()
            .iter()
            .find(|e| e.address() == address)
            .cloned()
    }

    /// Replaces the list with `endpoints` (duplicates by id: the last wins). Endpoints whose
    /// id and address are unchanged keep their state; the others start fresh. Returns whether
    /// the list changed; when it did, every listener is then called (outside the swap) with
    /// the new list and the ids that left. Meant for one writer at a time: two racing
    /// writers each notify, possibly out of order.
    pub fn replace(&self, endpoints: Vec<Endpoint>) -> bool {
        let mut changed = false;
        let mut departed = Vec::new();
        let mut departed_states: Vec<Arc<EndpointState>> = Vec::new();
        let mut stored = Arc::default();
        self.current.rcu(|old| {
            let by_id: HashMap<&EndpointId, &Arc<EndpointState>> =
                old.iter().map(|e| (e.id(), e)).collect();
            let mut fresh: HashMap<EndpointId, Arc<EndpointState>> =
                HashMap::with_capacity(endpoints.len());
            for ep in &endpoints {
                let state = match by_id.get(&ep.id) {
                    Some(existing) if existing.endpoint == *ep => Arc::clone(existing),
                    _ => Arc::new(EndpointState::new(ep.clone(), self.health)),
                };
                fresh.insert(ep.id.clone(), state);
            }
            departed_states = old
                .iter()
                .filter(|e| fresh.get(e.id()).is_none_or(|n| !Arc::ptr_eq(n, e)))
                .cloned()
                .collect();
            departed = departed_states.iter().map(|e| e.id().clone()).collect();
            let mut list: Vec<Arc<EndpointState>> = fresh.into_values().collect();
            list.sort_by(|a, b| a.id().cmp(b.id()));
            changed = list.len() != old.len()
                || list.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b));
            stored = Arc::new(list);
            Arc::clone(&stored)
        });
        for state in &departed_states {
            state.departed.store(true, Ordering::Release);
        }
        if changed {
            for listener in self.listeners.load().iter() {
                listener.endpoints_changed(&stored, &departed);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, addr: &str) -> Endpoint {
        Endpoint {
            id: EndpointId::new(name),
            address: addr.parse().unwrap(),
            labels: Default::default(),
            rank: 0,
        }
    }

    #[test]
    fn replace_keeps_state_of_unchanged_endpoints() {
        let reg = Registry::new();
        assert!(reg.is_empty());
        assert!(reg.replace(vec![ep("b", "127.0.0.1:2"), ep("a", "127.0.0.1:1")]));
        let snap = reg.snapshot();
        assert_eq!(snap[0].id().as_str(), "a", "sorted by id");
        let guard = snap[1].acquire();
        assert_eq!(snap[1].in_flight(), 1);
        let mut long = snap[1].acquire_with_prefill(500);
        assert_eq!((snap[1].in_flight(), snap[1].prefill_backlog()), (2, 500));
        long.prefilled();
        long.prefilled();
        assert_eq!((snap[1].in_flight(), snap[1].prefill_backlog()), (2, 0));
        let dropped = snap[1].acquire_with_prefill(70);
        drop((long, dropped));
        assert_eq!((snap[1].in_flight(), snap[1].prefill_backlog()), (1, 0));

        assert!(!reg.replace(vec![ep("a", "127.0.0.1:1"), ep("b", "127.0.0.1:2")]));
        assert_eq!(reg.snapshot()[1].in_flight(), 1, "state carried over");

        assert!(reg.replace(vec![ep("b", "127.0.0.1:3")]));
        let now = reg.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].in_flight(), 0, "address changed: fresh state");
        drop(guard);
        assert_eq!(snap[1].in_flight(), 0, "old state released safely");
        assert!(
            reg.find_by_address("127.0.0.1:3".parse().unwrap())
                .is_some()
        );
        assert!(
            reg.find_by_address("127.0.0.1:2".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn duplicate_ids_keep_the_last() {
        let reg = Registry::new();
        reg.replace(vec![ep("a", "127.0.0.1:1"), ep("a", "127.0.0.1:9")]);
        let snap = reg.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].address().port(), 9);
    }

    #[test]
    fn guards_release_across_threads() {
        let reg = Arc::new(Registry::new());
        reg.replace(vec![ep("a", "127.0.0.1:1")]);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let reg = Arc::clone(&reg);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let g = reg.snapshot()[0].acquire();
                        drop(g);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(reg.snapshot()[0].in_flight(), 0);
    }

    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<(Vec<String>, Vec<String>)>>);

    impl EndpointsListener for Recorder {
        fn endpoints_changed(&self, current: &[Arc<EndpointState>], departed: &[EndpointId]) {
            let ids = |it: &mut dyn Iterator<Item = &EndpointId>| {
                it.map(|i| i.as_str().to_owned()).collect::<Vec<_>>()
            };
            self.0.lock().unwrap().push((
                ids(&mut current.iter().map(|e| e.id())),
                ids(&mut departed.iter()),
            ));
        }
    }

    #[test]
    fn listeners_hear_departures() {
        let reg = Registry::new();
        let rec = Arc::new(Recorder::default());
        reg.subscribe(rec.clone());
        let second = Arc::new(Recorder::default());
        reg.subscribe(second.clone());
        let calls = |r: &Recorder| std::mem::take(&mut *r.0.lock().unwrap());
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

        reg.replace(vec![ep("a", "127.0.0.1:1"), ep("b", "127.0.0.1:2")]);
        assert_eq!(calls(&rec), vec![(s(&["a", "b"]), s(&[]))]);
        reg.replace(vec![ep("b", "127.0.0.1:2"), ep("a", "127.0.0.1:1")]);
        assert_eq!(calls(&rec), vec![], "no change, no call");
        reg.replace(vec![ep("a", "127.0.0.1:1"), ep("c", "127.0.0.1:3")]);
        assert_eq!(calls(&rec), vec![(s(&["a", "c"]), s(&["b"]))]);
        reg.replace(vec![ep("a", "127.0.0.1:9"), ep("c", "127.0.0.1:3")]);
        assert_eq!(
            calls(&rec),
            vec![(s(&["a", "c"]), s(&["a"]))],
            "a moved: departed and new"
        );
        reg.replace(vec![]);
        assert_eq!(calls(&rec), vec![(s(&[]), s(&["a", "c"]))]);
        assert_eq!(calls(&second).len(), 4, "every listener is called");
    }

    #[test]
    fn health_config_reaches_new_endpoints() {
        let reg = Registry::with_health(HealthConfig {
            consecutive_failures: 1,
            ..HealthConfig::default()
        });
        assert_eq!(reg.health_config().consecutive_failures, 1);
        reg.replace(vec![ep("a", "127.0.0.1:1")]);
        let a = &reg.snapshot()[0];
        let now = Instant::now();
        a.record_outcome(false, now);
        assert_eq!(
            a.health(now),
            Health::Ejected,
            "ejected at the first failure"
        );
        assert_eq!(a.ejections(), 1);
    }

    /// A request whose answer started teaches the endpoint its speed (its queue ahead and
    /// its own tokens over the time to first bytes); one dropped before it did, nothing.
    #[test]
    fn first_answer_bytes_teach_the_endpoints_speed() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        let t0 = Instant::now();
        let ahead = state.acquire_with_prefill_at(1_500, t0);
        let abandoned = state.acquire_with_prefill_at(2_000, t0);
        drop(abandoned);
        assert_eq!(state.prefill_us_per_token(), None);
        // Four requests (the fewest an estimate is given on), each with 1,500 tokens queued
        // ahead and 500 of its own, answered in 60 ms.
        let mut guards: Vec<_> = (0..4)
            .map(|_| {
                let mut g = state.acquire_with_prefill_at(500, t0);
                g.prefilled_at(t0 + Duration::from_millis(60));
                g
            })
            .collect();
        assert_eq!(state.prefill_us_per_token(), Some(30.0));
        guards[3].prefilled_at(t0 + Duration::from_secs(9));
        assert_eq!(state.prefill_us_per_token(), Some(30.0), "taught once");
        // An answer whose first bytes do not time its prefill teaches nothing.
        for _ in 0..8 {
            let mut g = state.acquire_with_prefill_at(500, t0);
            g.prefilled_untimed();
            assert_eq!(state.prefill_backlog(), 1_500, "its backlog is released");
            g.prefilled_at(t0 + Duration::from_secs(60));
        }
        assert_eq!(state.prefill_us_per_token(), Some(30.0));
        drop((guards, ahead));
        assert_eq!(state.prefill_backlog(), 0);
    }

    #[test]
    fn fresh_load_is_never_stale() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        let t0 = Instant::now();
        let stale = Duration::from_secs(2);
        assert!(state.scraped().is_none());
        assert!(state.fresh_load(t0, stale).is_none(), "nothing scraped yet");
        let load = PodLoad {
            waiting: 3,
            ..PodLoad::default()
        };
        state.record_scrape(load.clone(), t0);
        let fresh = state
            .fresh_load(t0 + Duration::from_millis(1999), stale)
            .unwrap();
        assert_eq!((fresh.waiting, fresh.at()), (3, t0));
        assert_eq!(*fresh, load);
        assert!(
            state.fresh_load(t0 + stale, stale).is_none(),
            "2 s old: stale"
        );
        state.record_scrape_error();
        assert_eq!(state.scrape_errors(), 1);
        assert_eq!(
            state.consecutive_failures(),
            0,
            "a failed scrape leaves the load unknown, not the pod failing"
        );
        state.record_outcome(false, t0 + stale);
        assert_eq!(
            state.scraped().as_ref().map(|s| s.load.waiting),
            Some(3),
            "a failed scrape keeps the last one"
        );
        assert!(state.fresh_load(t0 + stale, stale).is_none());
        state.record_scrape(PodLoad::default(), t0 + stale);
        assert_eq!(
            state.consecutive_failures(),
            1,
            "a scrape does not clear failures: only an answered request does"
        );
        state.record_outcome(true, t0 + stale);
        assert_eq!(state.consecutive_failures(), 0);
        assert_eq!(state.fresh_load(t0 + stale, stale).unwrap().waiting, 0);
    }

    #[test]
    fn a_fresh_load_counts_the_requests_routed_after_it() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        let t0 = Instant::now();
        let stale = Duration::from_secs(2);
        let before = state.acquire();
        state.record_scrape(PodLoad::default(), t0);
        assert_eq!(state.fresh_load(t0, stale).unwrap().routed_since(), 0);
        let after = [state.acquire(), state.acquire_with_prefill(10)];
        assert_eq!(state.fresh_load(t0, stale).unwrap().routed_since(), 2);
        // Routed, not in flight: they stay routed since the scrape, and now ended since it
        // too; a new scrape starts both counts again.
        drop(after);
        drop(before);
        assert_eq!(state.fresh_load(t0, stale).unwrap().routed_since(), 2);
        assert_eq!(state.fresh_load(t0, stale).unwrap().ended_since(), 3);
        state.record_scrape(PodLoad::default(), t0);
        assert_eq!(state.fresh_load(t0, stale).unwrap().routed_since(), 0);
        assert_eq!(state.fresh_load(t0, stale).unwrap().ended_since(), 0);
    }

    /// One router alone: between two scrapes, what the pod said plus what this router sent
    /// since, less what of its own ended since, is what it has in flight; another router's
    /// requests in the pod's figures stay counted until the next scrape says otherwise.
    #[test]
    fn requests_now_follow_the_routers_own_traffic_both_ways() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        let t0 = Instant::now();
        let stale = Duration::from_secs(2);
        let now = |s: &EndpointState| s.fresh_load(t0, stale).unwrap().requests_now();
        let mut mine: Vec<_> = (0..3).map(|_| state.acquire()).collect();
        // The pod runs these 3 and 2 of another router's.
        let said = |running| PodLoad {
            running,
            ..PodLoad::default()
        };
        state.record_scrape(said(5), t0);
        assert_eq!(now(&state), 5);
        mine.truncate(1);
        assert_eq!(now(&state), 3, "two of mine answered since the scrape");
        mine.push(state.acquire());
        assert_eq!(now(&state), 4, "one more sent since");
        mine.clear();
        assert_eq!(
            now(&state),
            2,
            "the other router's, until a scrape says otherwise"
        );
        state.record_scrape(said(0), t0);
        assert_eq!(now(&state), 0);
        // A scrape that had not yet seen requests that end after it never goes below 0.
        let late: Vec<_> = (0..2).map(|_| state.acquire()).collect();
        state.record_scrape(said(0), t0);
        drop(late);
        assert_eq!(now(&state), 0);
    }

    #[test]
    fn the_pods_kv_capacity_is_kept_from_the_scrapes_that_say() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        assert_eq!(state.kv_capacity_tokens(), None);
        let said = PodLoad {
            kv_blocks: Some(10),
            block_size: Some(16),
            ..PodLoad::default()
        };
        state.record_scrape(said, Instant::now());
        assert_eq!(state.kv_capacity_tokens(), Some(160));
        // A scrape that does not say (vLLM before profiling: "None") changes nothing.
        state.record_scrape(PodLoad::default(), Instant::now());
        assert_eq!(state.kv_capacity_tokens(), Some(160));
        // In the approximate index's prompt bytes: 4 a token until the pod's answers say.
        assert_eq!(state.kv_capacity_index_bytes(), Some(640));
        for _ in 0..4 {
            state.observe_answer(3_000, Some(1_000));
        }
        assert_eq!(state.kv_capacity_index_bytes(), Some(480));
    }

    /// Answers without usage teach the bytes per token through the pod's own count of the
    /// prompts it finished (scraped); answers with usage, when there are any, are read
    /// first, and a prompt kvroute could not read (0 bytes) is not counted.
    #[test]
    fn without_usage_the_pods_prompt_count_teaches_bytes_per_token() {
        let state = EndpointState::detached(ep("a", "127.0.0.1:1"), HealthConfig::default());
        let scrape = |requests: u64| {
            let load = PodLoad {
                prompts: Some(crate::PromptTotals {
                    tokens: (requests * 2_000) as f64,
                    requests: requests as f64,
                }),
                ..PodLoad::default()
            };
            state.record_scrape(load, Instant::now());
        };
        scrape(0);
        for n in 1..=5 {
            state.observe_answer(5_000, None);
            state.observe_answer(0, None);
            scrape(n);
        }
        let v = state.prompt_bytes_per_token().unwrap();
        assert!((v - 2.5).abs() < 1e-9, "{v}");
        for _ in 0..4 {
            state.observe_answer(3_000, Some(1_000));
        }
        let v = state.prompt_bytes_per_token().unwrap();
        assert!((v - 3.0).abs() < 1e-9, "usage first: {v}");
    }
}
