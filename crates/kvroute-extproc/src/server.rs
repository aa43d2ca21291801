//! The tonic side: one [`StreamState`] per gRPC stream, driven by the response stream
//! itself, so a stream's state lives exactly as long as Envoy keeps the stream open and
//! nothing is spawned per request.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::sync::Semaphore;
use tokio::task::JoinError;
use tokio_stream::Stream;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error};

use crate::admission::{Admission, Admit, Admitted, Waiter};
use crate::metrics::Outcome;
use crate::protocol::header;
use crate::stream::{DecisionJob, DecisionOutcome, Router, StreamState};
use crate::wire::{ExtProcCodec, Inbound, InboundKind, Outbound};

/// The connections `listener` accepts, with Nagle's algorithm off. tonic sets `TCP_NODELAY`
/// only on sockets it accepts itself, not on an incoming stream it is handed; without it a
/// small answer waits for the peer's delayed ACK (~40 ms stalls through Envoy).
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Slack over the body limit for the rest of a buffered-mode message (headers, metadata).
const MESSAGE_OVERHEAD: usize = 1 << 20;

/// The `envoy.service.ext_proc.v3.ExternalProcessor` service.
#[derive(Clone, Debug)]
pub struct ExtProcService {
    router: Arc<Router>,
    pool: DecisionPool,
    /// Streams open now.
    open: Arc<AtomicUsize>,
    /// Admission at each request's headers, when configured.
    admission: Option<Arc<Admission>>,
}

/// Threads for decisions too heavy for an async worker (long prompts to parse and tokenize):
/// at most `decision_threads` run at once, the rest wait in arrival order, so a burst of
/// cold long prompts queues behind itself instead of stalling every stream.
#[derive(Clone, Debug)]
struct DecisionPool {
    permits: Arc<Semaphore>,
    /// Jobs handed to the pool and not finished (running or waiting).
    queued: Arc<AtomicUsize>,
    /// Most jobs that may be queued: threads plus waiting places.
    capacity: usize,
}

/// Gives a pool place back when its job ends, however it ends.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DecisionPool {
    /// A place in the queue, if one is free.
    fn reserve(&self) -> Option<Place> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()?;
        Some(Place(Arc::clone(&self.queued)))
    }

    /// Runs `job` in its `place`: after the jobs ahead of it, on a blocking thread.
    fn run(&self, place: Place, job: DecisionJob) -> PendingDecision {
        let permits = Arc::clone(&self.permits);
        Box::pin(async move {
            let _place = place;
            // The semaphore is never closed, so acquiring only waits.
            let permit = permits.acquire_owned().await;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                job.run()
            })
            .await
        })
    }
}

/// A decision running on the pool.
type PendingDecision = Pin<Box<dyn Future<Output = Result<DecisionOutcome, JoinError>> + Send>>;

impl ExtProcService {
    /// A service routing with `router`.
    pub fn new(router: Arc<Router>) -> Self {
        let threads = router.config().decision_threads.max(1);
        let capacity = threads + router.config().decision_queue;
        Self {
            router,
            pool: DecisionPool {
                permits: Arc::new(Semaphore::new(threads)),
                queued: Arc::new(AtomicUsize::new(0)),
                capacity,
            },
            open: Arc::new(AtomicUsize::new(0)),
            admission: None,
        }
    }

    /// Admits every request through `admission` at its headers: sheddable work refused while
    /// the pool is saturated, or requests held in flow-control bands.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The gRPC service for a tonic server, accepting messages up to twice the body limit:
    /// a buffered-mode body over the limit then still reaches the state machine, which
    /// answers it 413, instead of failing gRPC decoding (which Envoy would turn into a 500).
    pub fn into_server(self) -> ExtProcServer {
        let max_message = self.router.config().max_body_bytes.saturating_mul(2) + MESSAGE_OVERHEAD;
        ExtProcServer {
            service: self,
            max_message,
        }
    }
}

impl StreamingService<Inbound> for ExtProcService {
    type Response = Outbound;
    type ResponseStream = ResponseStream;
    type Future = std::future::Ready<Result<Response<ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Inbound>>) -> Self::Future {
        let max = self.router.config().max_streams;
        let opened = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if opened.is_err() {
            self.router.metrics().outcome(Outcome::TooManyStreams);
            return std::future::ready(Err(Status::resource_exhausted(format!(
                "kvroute has {max} ext_proc streams open (--max-streams)"
            ))));
        }
        std::future::ready(Ok(Response::new(ResponseStream {
            _slot: Place(Arc::clone(&self.open)),
            inbound: request.into_inner(),
            state: StreamState::deferring(Arc::clone(&self.router)),
            pending: VecDeque::new(),
            scratch: Vec::new(),
            done: false,
            pool: self.pool.clone(),
            deciding: None,
            deadline: Some(Box::pin(tokio::time::sleep(
                self.router.config().request_timeout,
            ))),
            admission: self.admission.clone(),
            waiting: None,
            admitted: None,
        })))
    }
}

/// The `envoy.service.ext_proc.v3.ExternalProcessor` gRPC service with kvroute's codec
/// (body chunks as slices of the frames they came in: [`crate::wire`]), for a tonic server.
#[derive(Clone, Debug)]
pub struct ExtProcServer {
    service: ExtProcService,
    max_message: usize,
}

/// The one method of the service.
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

impl NamedService for ExtProcServer {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

impl<B> Service<http::Request<B>> for ExtProcServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PROCESS_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("kvroute serves ext_proc's Process only").into_http())
            });
        }
        let service = self.service.clone();
        let limit = Some(self.max_message);
        Box::pin(async move {
            let mut grpc = Grpc::new(ExtProcCodec).apply_max_message_size_config(limit, limit);
            Ok(grpc.streaming(service, req).await)
        })
    }
}

/// The answers to one ext_proc stream, produced as Envoy's messages are read. While a heavy
/// decision runs on the pool, no further message is read.
pub struct ResponseStream {
    /// This stream's place among `--max-streams`, given back when it ends.
    _slot: Place,
    inbound: Streaming<Inbound>,
    state: StreamState,
    pending: VecDeque<Outbound>,
    scratch: Vec<Outbound>,
    done: bool,
    pool: DecisionPool,
    deciding: Option<PendingDecision>,
    /// Until the request is answered: when the stream gives up on it.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Admission, until the request headers have been through it.
    admission: Option<Arc<Admission>>,
    /// The request headers, held while the request waits in a flow-control band.
    waiting: Option<(Waiter, Inbound)>,
    /// The request's admission, held until it is routed (it counts in the pool's load).
    admitted: Option<Admitted>,
}

impl std::fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("state", &self.state)
            .field("deciding", &self.deciding.is_some())
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl Stream for ResponseStream {
    type Item = Result<Outbound, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if let Some(deciding) = &mut this.deciding {
                let outcome = ready!(deciding.as_mut().poll(cx));
                this.deciding = None;
                match outcome {
                    Ok(outcome) => {
                        this.state.resume(outcome, &mut this.scratch);
                        this.pending.extend(this.scratch.drain(..));
                    }
                    Err(e) => {
                        error!(error = %e, "routing decision failed on the decision pool");
                        this.state.router_metrics().stream_error();
                        this.done = true;
                        return Poll::Ready(Some(Err(Status::internal("routing decision failed"))));
                    }
                }
                continue;
            }
            if let Some((waiter, _)) = &mut this.waiting {
                let Poll::Ready(verdict) = Pin::new(waiter).poll(cx) else {
                    // `--stream-request-timeout` bounds a wait in the queue too.
                    if let Some(deadline) = &mut this.deadline
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        this.state.router_metrics().outcome(Outcome::RequestTimeout);
                        this.waiting = None;
                        this.done = true;
                        return Poll::Ready(Some(Err(Status::deadline_exceeded(
                            "no answer to the request within --stream-request-timeout",
                        ))));
                    }
                    return Poll::Pending;
                };
                let held = this.waiting.take().map(|(_, msg)| msg);
                match verdict {
                    Ok(admitted) => {
                        this.admitted = Some(admitted);
                        if let Some(msg) = held
                            && let Err(status) = this.feed(msg)
                        {
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                    Err(dropped) => {
                        let objective = held.as_ref().and_then(objective_of);
                        this.state
                            .refuse_admission(dropped, objective, &mut this.scratch);
                        this.pending.extend(this.scratch.drain(..));
                    }
                }
                continue;
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.state.decided() {
                this.deadline = None;
                // Routed (or answered): its load is the endpoint's now.
                this.admitted = None;
            } else if let Some(deadline) = &mut this.deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                this.state.router_metrics().outcome(Outcome::RequestTimeout);
                this.done = true;
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "no answer to the request within --stream-request-timeout",
                ))));
            }
            match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
                None => {
                    this.done = true;
                }
                Some(Err(status)) => {
                    // Envoy reset the stream (client gone, timeout): nothing to answer.
                    debug!(%status, "ext_proc stream ended by the data plane");
                    this.done = true;
                }
                Some(Ok(msg)) => {
                    if let Err(status) = this.admit(msg) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
            }
        }
    }
}

/// The objective a request's headers name (upstream's header, or its older form).
fn objective_of(msg: &Inbound) -> Option<&str> {
    let Some(InboundKind::RequestHeaders(h)) = &msg.request else {
        return None;
    };
    let headers = h.headers.as_ref();
    header(headers, "x-llm-d-inference-objective")
        .or_else(|| header(headers, "x-gateway-inference-objective"))
}

impl ResponseStream {
    /// Passes the request headers through admission (once per stream): on, held while the
    /// request waits, or answered; any other message goes on at once.
    fn admit(&mut self, msg: Inbound) -> Result<(), Status> {
        let Some(admission) = &self.admission else {
            return self.feed(msg);
        };
        let Some(InboundKind::RequestHeaders(h)) = &msg.request else {
            return self.feed(msg);
        };
        let objective = objective_of(&msg);
        let bytes = header(h.headers.as_ref(), "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let priority = admission.priority(objective);
        let verdict = admission.admit(priority, bytes);
        self.admission = None;
        match verdict {
            Admit::Now(admitted) => {
                self.admitted = Some(admitted);
                self.feed(msg)
            }
            Admit::Refused(dropped) => {
                self.state
                    .refuse_admission(dropped, objective, &mut self.scratch);
                self.pending.extend(self.scratch.drain(..));
                Ok(())
            }
            Admit::Wait(waiter) => {
                self.waiting = Some((waiter, msg));
                Ok(())
            }
        }
    }

    /// Hands one of Envoy's messages to the state machine, and a heavy decision it leaves to
    /// the pool.
    fn feed(&mut self, msg: Inbound) -> Result<(), Status> {
        if let Err(e) = self.state.on_message(msg, &mut self.scratch) {
            self.state.router_metrics().stream_error();
            self.done = true;
            return Err(Status::invalid_argument(e.to_string()));
        }
        self.pending.extend(self.scratch.drain(..));
        if let Some(job) = self.state.take_job() {
            match self.pool.reserve() {
                Some(place) => self.deciding = Some(self.pool.run(place, job)),
                None => {
                    self.state.refuse(job, &mut self.scratch);
                    self.pending.extend(self.scratch.drain(..));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvroute_scheduler::SchedulerHandle;
    use test_support::envoy::{full_duplex_chat_headers, immediate, request_body};
    use test_support::{chat_body, registry};
    use tokio_stream::StreamExt;

    use super::*;
    use crate::{ExtProcConfig, Metrics};

    /// A stream holding a heavy decision job, over `router`.
    fn with_job(router: &Arc<Router>) -> (StreamState, DecisionJob) {
        let mut s = StreamState::deferring(Arc::clone(router));
        let mut out = Vec::new();
        let headers = full_duplex_chat_headers();
        s.on_message(headers, &mut out).unwrap();
        s.on_message(
            request_body(&chat_body(crate::PARSE_INLINE_BYTES + 1_000), true),
            &mut out,
        )
        .unwrap();
        let job = s.take_job().unwrap();
        (s, job)
    }

    #[test]
    fn a_full_decision_queue_answers_503_at_once() {
        let mut prom = prometheus_client::registry::Registry::default();
        let router = Router::new(
            registry(&[8001]),
            Arc::new(SchedulerHandle::new(crate::stream::tests::body_reading(0))),
            ExtProcConfig::default(),
            Metrics::register(&mut prom),
        );
        let pool = DecisionPool {
            permits: Arc::new(Semaphore::new(1)),
            queued: Arc::new(AtomicUsize::new(0)),
            capacity: 2,
        };
        let (_, a) = with_job(&router);
        let (_, b) = with_job(&router);
        let (mut refused, c) = with_job(&router);
        let running = pool.run(pool.reserve().unwrap(), a);
        let waiting = pool.run(pool.reserve().unwrap(), b);
        assert!(
            pool.reserve().is_none(),
            "a third decision finds the queue full"
        );
        let mut out = Vec::new();
        refused.refuse(c, &mut out);
        let out: Vec<_> = out.into_iter().map(Outbound::into_message).collect();
        assert_eq!(
            immediate(&out[0]).unwrap().status.as_ref().unwrap().code,
            503
        );
        // A place comes back when a queued decision ends (here: is dropped unpolled).
        drop((running, waiting));
        assert!(pool.reserve().is_some());
    }

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(server_side.nodelay().unwrap());
    }
}
