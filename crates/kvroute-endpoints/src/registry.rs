use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use kvroute_core::{Endpoint, EndpointId};

/// One endpoint and its live load. Shared by the registry and by every request routed to it,
/// so a request that outlives the endpoint's removal still releases its count safely.
#[derive(Debug)]
pub struct EndpointState {
    endpoint: Endpoint,
    in_flight: AtomicUsize,
    prefill_backlog: AtomicU64,
    events_confirmed: AtomicBool,
}

impl EndpointState {
    fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            in_flight: AtomicUsize::new(0),
            prefill_backlog: AtomicU64::new(0),
            events_confirmed: AtomicBool::new(false),
        }
    }

    /// Who this is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
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

    /// Counts one more request against this endpoint until the guard is dropped, so that a
    /// request that ends any way at all (completion, error, client gone) gives its slot back.
    pub fn acquire(self: &Arc<Self>) -> InFlightGuard {
        self.acquire_with_prefill(0)
    }

    /// As [`EndpointState::acquire`], also counting `prefill_tokens` in the prefill backlog
    /// until [`InFlightGuard::prefilled`] is called or the guard dropped.
    pub fn acquire_with_prefill(self: &Arc<Self>, prefill_tokens: u64) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.prefill_backlog
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        InFlightGuard {
            endpoint: Arc::clone(self),
            prefill_tokens,
        }
    }
}

/// One request's claim on an endpoint's in-flight count (and prefill backlog); dropping it
/// releases the claim.
#[derive(Debug)]
pub struct InFlightGuard {
    endpoint: Arc<EndpointState>,
    prefill_tokens: u64,
}

impl InFlightGuard {
    /// The endpoint the claim is on.
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    /// The request's first token came back: its prefill no longer waits ahead of others.
    pub fn prefilled(&mut self) {
        let n = std::mem::take(&mut self.prefill_tokens);
        self.endpoint
            .prefill_backlog
            .fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.prefilled();
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The current endpoint list, readable without locks.
#[derive(Debug, Default)]
pub struct Registry {
    current: ArcSwap<Vec<Arc<EndpointState>>>,
}

impl Registry {
    /// An empty registry: nothing routable until a source fills it.
    pub fn new() -> Self {
        Self::default()
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
    /// the list changed.
    pub fn replace(&self, endpoints: Vec<Endpoint>) -> bool {
        let mut changed = false;
        self.current.rcu(|old| {
            let by_id: HashMap<&EndpointId, &Arc<EndpointState>> =
                old.iter().map(|e| (e.id(), e)).collect();
            let mut fresh: HashMap<EndpointId, Arc<EndpointState>> =
                HashMap::with_capacity(endpoints.len());
            for ep in &endpoints {
                let state = match by_id.get(&ep.id) {
                    Some(existing) if existing.endpoint == *ep => Arc::clone(existing),
                    _ => Arc::new(EndpointState::new(ep.clone())),
                };
                fresh.insert(ep.id.clone(), state);
            }
            let mut list: Vec<Arc<EndpointState>> = fresh.into_values().collect();
            list.sort_by(|a, b| a.id().cmp(b.id()));
            changed = list.len() != old.len()
                || list.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b));
            list
        });
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
}
