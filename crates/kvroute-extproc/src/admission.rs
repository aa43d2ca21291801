//! Admission at a request's headers, before anything of it is read or routed: shedding
//! sheddable work while the pool is saturated, or (with the `flowControl` gate) holding
//! requests in priority bands until it is not.
//!
//! A waiting request is a [`Waiter`] in its stream's response future: no task or thread per
//! request. One dispatcher task ([`Admission::run`]) releases waiters highest priority
//! first while the pool is not saturated, and answers those whose time is up. A stream that
//! ends while waiting (the client went away, Envoy reset it) drops its waiter, which takes
//! its place out of the queue; a dispatched request is counted as pending until its stream
//! routes it or ends, so a burst released at once is not blind to itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use kvroute_core::{EndpointId, Priorities};
use kvroute_endpoints::{EndpointState, EndpointsListener, Registry};
use kvroute_scheduler::admission::{AdmissionSettings, FlowQueue, FlowSettings, Ticket};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Outcome;
use crate::protocol::LocalReply;

/// How often the dispatcher looks at the pool while requests wait: the pods' load changes
/// with no event to say so (scrapes every 50 ms by default, answers ending).
const TICK: Duration = Duration::from_millis(10);

/// Why admission answered a request itself (upstream's `x-llm-d-request-dropped-reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// `rejected-saturated` (429): sheddable while saturated, or its band or the queue full.
    Saturated,
    /// `rejected-ttl-expired` (429): waited out `defaultRequestTTL`.
    TtlExpired,
    /// `rejected-no-endpoints` (503): waited out `noEndpointRequestTTL` with no endpoint.
    NoEndpoints,
}

impl Dropped {
    /// The local reply that answers it.
    pub(crate) fn reply(self) -> LocalReply {
        match self {
            Self::Saturated => LocalReply::Saturated,
            Self::TtlExpired => LocalReply::TtlExpired,
            Self::NoEndpoints => LocalReply::NoEndpoints,
        }
    }

    /// The reply's message, as upstream words it where it has one.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Saturated => "system saturated, request dropped",
            Self::TtlExpired => "request timed out in queue",
            Self::NoEndpoints => "no endpoint appeared while the request waited in queue",
        }
    }

    /// How it is counted.
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Self::Saturated => Outcome::RejectedSaturated,
            Self::TtlExpired => Outcome::RejectedTtlExpired,
            Self::NoEndpoints => Outcome::NoEndpoint,
        }
    }
}

/// The admission controller shared by every stream.
pub struct Admission {
    registry: Arc<Registry>,
    priorities: Option<Arc<dyn Priorities>>,
    settings: ArcSwap<AdmissionSettings>,
    queue: Mutex<Queue>,
    /// Requests dispatched (or admitted at once under flow control) and not yet routed.
    pending: Arc<AtomicUsize>,
    wake: Notify,
}

/// The waiting requests, and since when the pool has had endpoints or none.
struct Queue {
    waiting: FlowQueue<oneshot::Sender<Verdict>>,
    /// Whether the pool had no endpoint at the last look, and since when.
    empty: bool,
    since: Instant,
}

/// A waiting request's answer.
type Verdict = Result<Admitted, Dropped>;

/// What admission says at a request's headers.
#[derive(Debug)]
pub enum Admit {
    /// Go on; hold the value until the request is routed.
    Now(Admitted),
    /// Answer it with this.
    Refused(Dropped),
    /// Wait for the verdict.
    Wait(Waiter),
}

/// An admitted request not yet routed: counted in the pool's saturation until dropped.
#[derive(Debug)]
pub struct Admitted(Option<Arc<AtomicUsize>>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(pending) = &self.0 {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A request waiting in its band: resolves to its admission or why it was dropped, and
/// leaves the queue when dropped first.
#[derive(Debug)]
pub struct Waiter {
    rx: oneshot::Receiver<Verdict>,
    ticket: Ticket,
    admission: Arc<Admission>,
    /// Set when the receiver said it all.
    done: bool,
}

impl Future for Waiter {
    type Output = Result<Admitted, Dropped>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(Pin::new(&mut self.rx).poll(cx));
        self.done = true;
        // Every sender is answered before it is dropped (the queue lives as long as this
        // waiter's `Arc` on it); were one not, the request would be refused, never lost.
        Poll::Ready(out.unwrap_or(Err(Dropped::Saturated)))
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.done {
            self.admission.lock().waiting.remove(self.ticket);
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("settings", &self.settings.load())
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Admission over `registry`'s endpoints, a request's priority read from the objective
    /// it names in `priorities` (0 without one).
    pub fn new(
        registry: Arc<Registry>,
        priorities: Option<Arc<dyn Priorities>>,
        settings: AdmissionSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            priorities,
            settings: ArcSwap::from_pointee(settings),
            queue: Mutex::new(Queue {
                waiting: FlowQueue::default(),
                empty: true,
                since: Instant::now(),
            }),
            pending: Arc::new(AtomicUsize::new(0)),
            wake: Notify::new(),
        })
    }

    /// Replaces the settings (a reloaded configuration); requests waiting stay queued, and
    /// are all let through if flow control was turned off.
    pub fn configure(&self, settings: AdmissionSettings) {
        self.settings.store(Arc::new(settings));
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The priority of a request naming `objective`.
    pub fn priority(&self, objective: Option<&str>) -> i32 {
        objective
            .and_then(|o| self.priorities.as_ref()?.priority(o))
            .unwrap_or(0)
    }

    fn saturation(&self, settings: &AdmissionSettings, endpoints: &[Arc<EndpointState>]) -> f64 {
        settings.detector.pool_saturation(
            endpoints,
            Instant::now(),
            self.pending.load(Ordering::Acquire),
        )
    }

    fn admitted(&self) -> Admitted {
        self.pending.fetch_add(1, Ordering::AcqRel);
        Admitted(Some(Arc::clone(&self.pending)))
    }

    /// Admits a request of priority `priority` whose body is `bytes` long (its
    /// `Content-Length`, 0 unknown).
    pub fn admit(self: &Arc<Self>, priority: i32, bytes: u64) -> Admit {
        let settings = self.settings.load();
        let Some(flow) = &settings.flow else {
            // Upstream's legacy admission: only sheddable work is checked.
            if priority < 0 && self.saturation(&settings, &self.registry.snapshot()) >= 1.0 {
                return Admit::Refused(Dropped::Saturated);
            }
            return Admit::Now(Admitted(None));
        };
        let endpoints = self.registry.snapshot();
        let mut queue = self.lock();
        if queue.waiting.is_empty()
            && !endpoints.is_empty()
            && self.saturation(&settings, &endpoints) < 1.0
        {
            return Admit::Now(self.admitted());
        }
        let (tx, rx) = oneshot::channel();
        match queue
            .waiting
            .push(flow, priority, bytes, Instant::now(), tx)
        {
            Ok(ticket) => {
                drop(queue);
                self.wake.notify_one();
                Admit::Wait(Waiter {
                    rx,
                    ticket,
                    admission: Arc::clone(self),
                    done: false,
                })
            }
            Err(full) => {
                debug!(priority, %full, "request refused: flow-control queue full");
                Admit::Refused(Dropped::Saturated)
            }
        }
    }

    /// Dispatches and expires waiting requests until `stop`; then lets whatever still waits
    /// through, so that the server's drain routes it instead of leaving it unanswered.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let _release = Release(&self);
        loop {
            let next = self.step(Instant::now());
            let sleep = async {
                match next {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = sleep => {}
            }
        }
    }

    /// One look at the pool: expire what is out of time, dispatch while not saturated.
    /// Returns how soon to look again while requests wait.
    fn step(&self, now: Instant) -> Option<Duration> {
        let settings = self.settings.load();
        let endpoints = self.registry.snapshot();
        let mut queue = self.lock();
        let empty = endpoints.is_empty();
        if empty != queue.empty {
            queue.empty = empty;
            queue.since = now;
        }
        let Some(flow) = &settings.flow else {
            // Flow control turned off while requests waited: let them all through.
            self.release_all(&mut queue);
            return None;
        };
        let since = queue.since;
        let reason = if empty {
            Dropped::NoEndpoints
        } else {
            Dropped::TtlExpired
        };
        for (_, tx) in queue
            .waiting
            .expire(|queued| out_of_time(flow, empty, since, queued, now))
        {
            let _ = tx.send(Err(reason));
        }
        while !empty && !queue.waiting.is_empty() && self.saturation(&settings, &endpoints) < 1.0 {
            if let Some((ticket, tx)) = queue.waiting.pop() {
                debug!(
                    priority = ticket.priority(),
                    "request dispatched from the queue"
                );
                // A waiter gone meanwhile gives its count back with the value.
                let _ = tx.send(Ok(self.admitted()));
            }
        }
        let oldest = queue.waiting.oldest()?;
        let budget = if empty {
            flow.no_endpoint_ttl
        } else {
            flow.ttl
        };
        let until_expiry = budget.map_or(TICK, |ttl| {
            (oldest.max(since) + ttl).saturating_duration_since(now)
        });
        Some(until_expiry.clamp(Duration::from_millis(1), TICK))
    }

    /// Dispatches every waiting request, whatever the pool's state.
    fn release_all(&self, queue: &mut Queue) {
        while let Some((_, tx)) = queue.waiting.pop() {
            let _ = tx.send(Ok(self.admitted()));
        }
    }

    /// The pool's saturation now and the requests waiting per priority, for `/metrics`.
    fn observe(&self) -> (f64, Vec<(i32, usize)>) {
        let settings = self.settings.load();
        let saturation = self.saturation(&settings, &self.registry.snapshot());
        let bands = self.lock().waiting.band_lens().collect();
        (saturation, bands)
    }
}

/// Lets every waiting request through when the dispatcher ends, however it ends.
struct Release<'a>(&'a Admission);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        self.0.release_all(&mut queue);
    }
}

/// Whether a request queued at `queued` is out of time at `now`: its budget (the TTL of the
/// pool's state, endpoints or none) runs from when it was queued or the state last changed,
/// whichever is later, and no request waits longer than both budgets together. Monotone in
/// `queued`, as [`FlowQueue::expire`] needs.
fn out_of_time(
    flow: &FlowSettings,
    empty: bool,
    since: Instant,
    queued: Instant,
    now: Instant,
) -> bool {
    let budget = if empty {
        flow.no_endpoint_ttl
    } else {
        flow.ttl
    };
    let this_state = budget.is_some_and(|ttl| queued.max(since) + ttl <= now);
    let overall = match (flow.ttl, flow.no_endpoint_ttl) {
        (Some(a), Some(b)) => queued + a + b <= now,
        _ => false,
    };
    this_state || overall
}

impl EndpointsListener for Admission {
    /// Endpoints came or went: requests waiting for one may go now.
    fn endpoints_changed(&self, _current: &[Arc<EndpointState>], _departed: &[EndpointId]) {
        self.wake.notify_one();
    }
}

/// Exports the pool's saturation and the requests waiting per priority at scrape time.
#[derive(Debug)]
pub struct AdmissionCollector(pub Arc<Admission>);

impl Collector for AdmissionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (saturation, bands) = self.0.observe();
        let metric = encoder.encode_descriptor(
            "pool_saturation",
            "The saturation detector's view of the pool: 1.0 or more is saturated.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(saturation).encode(metric)?;
        let mut metric = encoder.encode_descriptor(
            "flow_control_queue_size",
            "Requests waiting in the flow-control queue, by priority band.",
            None,
            MetricType::Gauge,
        )?;
        for (priority, n) in bands {
            let p = priority.to_string();
            let labels = [("priority", p.as_str())];
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The same two figures under upstream's names (`llm_d_epp_flow_control_pool_saturation`,
/// `llm_d_epp_flow_control_queue_size` and their older `inference_extension_` twins), labelled
/// with the pool's name as upstream labels them, for autoscalers and dispatch gates built on
/// upstream's picker (KEDA's EPP-saturation trigger reads the first). The queue's series carry
/// `priority` only of upstream's flow labels: kvroute holds a request before it reads its
/// model, and its bands are not split by fairness ID.
#[derive(Debug)]
pub struct UpstreamAdmissionCollector {
    admission: Arc<Admission>,
    pool: String,
}

impl UpstreamAdmissionCollector {
    /// Collects from `admission`, for the pool named `pool`.
    pub fn new(admission: Arc<Admission>, pool: String) -> Self {
        Self { admission, pool }
    }
}

impl Collector for UpstreamAdmissionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (saturation, bands) = self.admission.observe();
        let pool = ("inference_pool", self.pool.as_str());
        for prefix in ["llm_d_epp", "inference_extension"] {
            let saturation_name = format!("{prefix}_flow_control_pool_saturation");
            let queue_name = format!("{prefix}_flow_control_queue_size");
            let mut metric = encoder.encode_descriptor(
                &saturation_name,
                "Pool saturation as the saturation detector sees it: 1.0 or more is saturated.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(saturation).encode(metric.encode_family(&[pool])?)?;
            let mut metric = encoder.encode_descriptor(
                &queue_name,
                "Requests waiting in the flow-control queue, by priority.",
                None,
                MetricType::Gauge,
            )?;
            for &(priority, n) in &bands {
                let p = priority.to_string();
                let labels = [pool, ("priority", p.as_str())];
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
