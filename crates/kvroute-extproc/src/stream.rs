//! One ext_proc stream (one HTTP request) as a synchronous state machine: a message in,
//! the responses Envoy expects out. No I/O here, so every processing mode is testable and
//! benchmarkable without a socket.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpHeaders, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::Struct;
use kvroute_core::{ApiKind, InferenceRequest, ParseError, RequestHints};
use kvroute_endpoints::{EndpointState, InFlightGuard, Registry};
use kvroute_scheduler::{BodyUse, Decision, ScheduleError, SchedulerHandle, SchedulingRequest};
use tracing::{debug, warn};

use crate::admission::Dropped;
use crate::metrics::{Metrics, Outcome};
use crate::protocol::{self, LocalReply, header};
use crate::upstream::RequestRecord;
use crate::usage::UsageScanner;
use crate::wire::{Body, Inbound, InboundKind, Outbound};

/// Default limit on a request body kvroute buffers: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

/// Bodies up to this size are parsed and scheduled inline on the async worker: a decision on
/// 8 KiB (about 2,000 tokens) takes well under a millisecond even when it tokenizes, less
/// than the hop to another thread costs in latency.
pub const DEFAULT_INLINE_DECISION_BYTES: usize = 8 << 10;

/// Bodies up to this size are parsed and scheduled inline when no configured plugin
/// tokenizes: parsing runs at about 5 GB/s, so even 1 MiB holds the worker for ~0.2 ms, less
/// than handing it to another thread costs in CPU and wake-ups.
pub const PARSE_INLINE_BYTES: usize = 1 << 20;

/// Settings of the ext_proc server.
#[derive(Clone, Debug)]
pub struct ExtProcConfig {
    /// Larger request bodies are answered 413 instead of being buffered.
    pub max_body_bytes: usize,
    /// The body mode (both directions) assumed for streams whose first message carries no
    /// `protocol_config` (Envoy before 1.34). Envoy's configuration must match it.
    pub assumed_body_mode: BodySendMode,
    /// Larger bodies are parsed, tokenized and scheduled on the blocking decision pool
    /// rather than on an async worker (where a cold 128k-token prompt would hold the worker
    /// for ~100 ms and every stream on it with it), when a configured plugin tokenizes;
    /// otherwise only bodies over [`PARSE_INLINE_BYTES`] go to the pool.
    pub inline_decision_bytes: usize,
    /// Threads of the blocking decision pool; streams wait their turn beyond that.
    pub decision_threads: usize,
    /// Decisions that may wait for the pool; a request beyond that is answered 503 at once
    /// rather than queued without bound (each waiting one holds its body).
    pub decision_queue: usize,
    /// ext_proc streams open at once (each may hold a body up to `max_body_bytes`); a
    /// stream beyond that is refused with `RESOURCE_EXHAUSTED`, and Envoy's failure mode
    /// answers its request.
    pub max_streams: usize,
    /// Whether the data plane's subset hint (`envoy.lb.subset_hint`) narrows the candidates;
    /// upstream's `--disable-endpoint-subset-filter` turns it off.
    pub subset_filter: bool,
    /// A stream whose request has not been answered (routed or refused) this long after it
    /// opened is ended with `DEADLINE_EXCEEDED`: a client trickling its body, or a data
    /// plane that stopped sending, holds neither the body nor a stream place for ever. The
    /// response that follows a routed request is not bounded here (Envoy's route timeout
    /// bounds it, and ends the stream with it).
    pub request_timeout: Duration,
}

/// Time from a stream's start to its request's answer, by default: far beyond any
/// upload a model server would accept, as Envoy's own stream idle timeout (5 min).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Streams open at once by default: far above what one Envoy opens to a cluster (1,024 by
/// its default circuit breaker), so only a flood or a leak reaches it.
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

impl Default for ExtProcConfig {
    /// The endpoint-picker reference setup: 16 MiB bodies, full-duplex streaming.
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            assumed_body_mode: BodySendMode::FullDuplexStreamed,
            inline_decision_bytes: DEFAULT_INLINE_DECISION_BYTES,
            decision_threads: default_decision_threads(),
            decision_queue: DEFAULT_DECISION_QUEUE,
            max_streams: DEFAULT_MAX_STREAMS,
            subset_filter: true,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Decisions that may wait for the pool by default.
pub const DEFAULT_DECISION_QUEUE: usize = 128;

/// One thread fewer than the machine has, at least one: the async workers keep a core.
pub fn default_decision_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

/// What every stream shares: where endpoints are, how to choose, how to count.
#[derive(Debug)]
pub struct Router {
    registry: Arc<Registry>,
    scheduler: Arc<SchedulerHandle>,
    config: ExtProcConfig,
    metrics: Metrics,
}

impl Router {
    /// Routes over `registry`'s endpoints with the scheduler `scheduler` holds (replaced
    /// there when the configuration is reloaded).
    pub fn new(
        registry: Arc<Registry>,
        scheduler: Arc<SchedulerHandle>,
        config: ExtProcConfig,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            scheduler,
            config,
            metrics,
        })
    }

    /// The server's settings.
    pub fn config(&self) -> &ExtProcConfig {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// A message Envoy should not have sent at this point of the stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExtProcError {
    /// A `ProcessingRequest` with no request in it.
    #[error("ext_proc message carries no request")]
    EmptyMessage,
    /// A message that the protocol does not allow in the stream's current phase.
    #[error("{0} arrived out of order")]
    OutOfOrder(&'static str),
}

/// Envoy's processing modes for this stream, from the first message's `protocol_config`, or
/// the configured assumption when Envoy does not send one. `None` for a mode value this
/// build does not know: kvroute then answers every message at once.
#[derive(Clone, Copy, Debug)]
struct Modes {
    request_body: Option<BodySendMode>,
    response_body: Option<BodySendMode>,
    body_without_waiting: bool,
    /// Envoy announced these modes (else they are `--assume-body-mode` for both bodies,
    /// which may not be the response's: no mode override restates them).
    announced: bool,
}

impl Modes {
    fn assumed(config: &ExtProcConfig) -> Self {
        Self {
            request_body: Some(config.assumed_body_mode),
            response_body: Some(config.assumed_body_mode),
            body_without_waiting: false,
            announced: false,
        }
    }

    fn from_config(pc: &ProtocolConfiguration) -> Self {
        Self {
            request_body: BodySendMode::try_from(pc.request_body_mode).ok(),
            response_body: BodySendMode::try_from(pc.response_body_mode).ok(),
            body_without_waiting: pc.send_body_without_waiting_for_header_response,
            announced: true,
        }
    }

    fn request_full_duplex(&self) -> bool {
        self.request_body == Some(BodySendMode::FullDuplexStreamed)
    }

    fn response_full_duplex(&self) -> bool {
        self.response_body == Some(BodySendMode::FullDuplexStreamed)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RequestPhase {
    /// Nothing seen yet.
    AwaitHeaders,
    /// Reading the body; the decision comes when it is complete. With `headers_pending` the
    /// headers have not been answered yet (full-duplex, or streamed without waiting): the
    /// routing mutation goes on the headers response. Otherwise it goes on the body response.
    Collecting { headers_pending: bool },
    /// Decided; whatever is left of the body flows through.
    Forwarding,
    /// Answered with a local reply; nothing more is processed.
    Done,
}

/// The state of one ext_proc stream.
#[derive(Debug)]
pub struct StreamState {
    router: Arc<Router>,
    modes: Modes,
    phase: RequestPhase,
    api: ApiKind,
    request_id: String,
    hints: RequestHints,
    subset: Option<Vec<String>>,
    chunks: Vec<Bytes>,
    body_len: usize,
    /// Streamed-mode body messages received while the headers answer was deferred.
    unanswered_chunks: usize,
    /// A load-based destination already sent on the headers (streamed mode without waiting).
    provisional: bool,
    request_body_done: bool,
    guard: Option<InFlightGuard>,
    /// Disaggregated serving: the prefill endpoint (`ip:port`) the decode pod's sidecar
    /// is told of, and its claim, held until the answer starts (the prompt is computed).
    prefiller: Option<(String, InFlightGuard)>,
    status: Option<u16>,
    usage: Option<UsageScanner>,
    response_done: bool,
    /// Whether heavy decisions are handed to the caller ([`StreamState::take_job`]) instead
    /// of run inline.
    defer_heavy: bool,
    job: Option<DecisionJob>,
    /// Headers the scheduler asked the response to carry (session affinity).
    response_headers: Vec<(&'static str, String)>,
    /// What of the body the scheduler's plugins read, as of the request headers.
    body_use: BodyUse,
    /// When the request headers came.
    started: Instant,
    /// Upstream's `x-llm-d-inference-fairness-id`, for upstream's metric labels.
    fairness_id: String,
    /// The request's model and whether it streams its answer, once its body was parsed.
    model: String,
    streaming: bool,
    /// The prompt's `Prompt::index_bytes`, once parsed: with the `prompt_tokens` the answer
    /// reports, it teaches the endpoint its tokenizer's bytes per token.
    prompt_bytes: u64,
    /// The request as upstream's metrics see it, from its first decision on.
    record: Option<RequestRecord>,
}

/// The CPU-heavy part of routing one request (parsing its body, tokenizing the prompt,
/// scheduling), detached from its stream so that it can run on a blocking pool. Run it, then
/// hand the outcome back with [`StreamState::resume`].
#[derive(Debug)]
pub struct DecisionJob {
    router: Arc<Router>,
    api: ApiKind,
    hints: RequestHints,
    subset: Option<Vec<String>>,
    chunks: Vec<Bytes>,
    started: Instant,
    trailers_follow: bool,
}

/// What a [`DecisionJob`] found.
#[derive(Debug)]
pub struct DecisionOutcome {
    /// The body, joined: what full-duplex mode hands back.
    body: Bytes,
    subset: Option<Vec<String>>,
    result: Result<Result<Decision, ScheduleError>, ParseError>,
    started: Instant,
    trailers_follow: bool,
    /// The parsed request's model (empty when it did not parse) and `stream` flag.
    model: String,
    streaming: bool,
    /// The parsed prompt's `Prompt::index_bytes` (0 when it did not parse).
    prompt_bytes: u64,
}

impl DecisionJob {
    /// Parses the body and schedules the request. A body that came in pieces is joined
    /// once, for the parser, and handed back joined: full-duplex mode then returns it to
    /// Envoy in as few messages as its length allows, as slices of that one buffer.
    pub fn run(self) -> DecisionOutcome {
        let body = join(self.chunks);
        // The hints move into the request, which carries them to the scheduler.
        let parsed = InferenceRequest::parse(self.api, &body, self.hints);
        let (model, streaming, prompt_bytes) = parsed.as_ref().map_or_else(
            |_| (String::new(), false, 0),
            |r| (r.model.clone(), r.stream, r.prompt.index_bytes() as u64),
        );
        let result = parsed.map(|request| {
            schedule(
                &self.router,
                self.subset.as_deref(),
                &request.hints,
                Some(&request),
            )
        });
        DecisionOutcome {
            body,
            subset: self.subset,
            result,
            started: self.started,
            trailers_follow: self.trailers_follow,
            model,
            streaming,
            prompt_bytes,
        }
    }
}

/// The pieces of a body as one buffer: the piece itself when there is one, else one copy.
fn join(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut joined = bytes::BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for chunk in &chunks {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        }
    }
}

/// Asks the scheduler about `request` among the endpoints (in the data plane's `subset`).
fn schedule(
    router: &Router,
    subset: Option<&[String]>,
    hints: &RequestHints,
    request: Option<&InferenceRequest>,
) -> Result<Decision, ScheduleError> {
    let snapshot = router.registry.snapshot();
    let candidates: Cow<'_, [Arc<EndpointState>]> = match subset {
        None => Cow::Borrowed(snapshot.as_slice()),
        Some(subset) => Cow::Owned(
            snapshot
                .iter()
                .filter(|e| in_subset(subset, e.address()))
                .cloned()
                .collect(),
        ),
    };
    router
        .scheduler
        .load()
        .schedule(&SchedulingRequest::new(request, hints), &candidates)
}

impl StreamState {
    /// A fresh stream.
    pub fn new(router: Arc<Router>) -> Self {
        Self {
            modes: Modes::assumed(&router.config),
            router,
            phase: RequestPhase::AwaitHeaders,
            api: ApiKind::Other,
            request_id: String::new(),
            hints: RequestHints::default(),
            subset: None,
            chunks: Vec::new(),
            body_len: 0,
            unanswered_chunks: 0,
            provisional: false,
            request_body_done: false,
            guard: None,
            prefiller: None,
            status: None,
            usage: None,
            response_done: false,
            defer_heavy: false,
            job: None,
            response_headers: Vec::new(),
            body_use: BodyUse::Parsed,
            started: Instant::now(),
            fairness_id: String::new(),
            model: String::new(),
            streaming: false,
            prompt_bytes: 0,
            record: None,
        }
    }

    /// A fresh stream whose decisions on bodies over
    /// [`ExtProcConfig::inline_decision_bytes`] are left to the caller: after each message,
    /// [`StreamState::take_job`] says whether one is waiting.
    pub fn deferring(router: Arc<Router>) -> Self {
        let mut s = Self::new(router);
        s.defer_heavy = true;
        s
    }

    /// Whether the request has had its answer: routed, or answered locally. Until then the
    /// stream holds its body and counts against `--stream-request-timeout`.
    pub fn decided(&self) -> bool {
        matches!(self.phase, RequestPhase::Forwarding | RequestPhase::Done)
    }

    /// The decision the last message left to run, if any. Until it is resumed, no further
    /// message may be handled.
    pub fn take_job(&mut self) -> Option<DecisionJob> {
        self.job.take()
    }

    pub(crate) fn router_metrics(&self) -> &Metrics {
        &self.router.metrics
    }

    /// The endpoint this stream's request is counted against, once decided.
    pub fn target(&self) -> Option<&Arc<EndpointState>> {
        self.guard.as_ref().map(InFlightGuard::endpoint)
    }

    /// Handles one message from Envoy, appending the responses it calls for to `out` (in the
    /// order Envoy must receive them; possibly none while a body is being collected).
    pub fn on_message(
        &mut self,
        msg: impl Into<Inbound>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), ExtProcError> {
        let msg = msg.into();
        if let Some(pc) = &msg.protocol_config {
            self.modes = Modes::from_config(pc);
            debug!(modes = ?self.modes, "protocol configuration");
        }
        let metadata = msg.metadata_context.map(|m| m.filter_metadata);
        match msg.request.ok_or(ExtProcError::EmptyMessage)? {
            InboundKind::RequestHeaders(h) => self.on_request_headers(&h, metadata.as_ref(), out),
            InboundKind::RequestBody(b) => self.on_request_body(b, out),
            InboundKind::RequestTrailers(_) => self.on_request_trailers(out),
            InboundKind::ResponseHeaders(h) => {
                self.on_response_headers(&h, metadata.as_ref(), out);
                Ok(())
            }
            InboundKind::ResponseBody(b) => {
                self.on_response_body(b, out);
                Ok(())
            }
            InboundKind::ResponseTrailers(_) => {
                out.push(Outbound::Message(protocol::trailers_response(false)));
                self.finish_response();
                Ok(())
            }
        }
    }

    fn on_request_headers(
        &mut self,
        h: &HttpHeaders,
        metadata: Option<&HashMap<String, Struct>>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), ExtProcError> {
        if self.phase != RequestPhase::AwaitHeaders {
            return Err(ExtProcError::OutOfOrder("request headers"));
        }
        let headers = h.headers.as_ref();
        self.api = ApiKind::from_path(header(headers, ":path").unwrap_or("/"));
        self.request_id = header(headers, "x-request-id").unwrap_or("").to_owned();
        self.started = Instant::now();
        if self.router.metrics.upstream.is_some() {
            self.fairness_id = header(headers, "x-llm-d-inference-fairness-id")
                .or_else(|| header(headers, "x-gateway-inference-fairness-id"))
                .unwrap_or("")
                .to_owned();
        }
        self.hints = RequestHints {
            session_id: header(headers, "x-session-id").map(str::to_owned),
            objective: header(headers, "x-llm-d-inference-objective")
                .or_else(|| header(headers, "x-gateway-inference-objective"))
                .map(str::to_owned),
            session_token: header(headers, "x-session-token").map(str::to_owned),
        };
        self.subset = metadata
            .filter(|_| self.router.config.subset_filter)
            .and_then(|m| {
                protocol::metadata_strings(m, protocol::SUBSET_NAMESPACE, protocol::SUBSET_KEY)
            });
        let body_follows = !h.end_of_stream && self.modes.request_body != Some(BodySendMode::None);
        self.body_use = self.router.scheduler.load().body_use();
        if !body_follows || self.api == ApiKind::Other || self.body_use == BodyUse::None {
            // Nothing to read, or nothing the configured plugins would read: route by load
            // now, and let any body flow through. Where Envoy waits for this answer before
            // sending the body, ask it not to send the body at all (honoured with
            // allow_mode_override; Envoy ignores overrides while the response body is
            // full-duplex, and the response mode is only known when Envoy announced it).
            let skip_body = body_follows
                && self.modes.announced
                && !self.modes.request_full_duplex()
                && !self.modes.response_full_duplex()
                && !self.modes.body_without_waiting;
            let mode_override = skip_body.then(|| {
                protocol::request_body_mode(
                    BodySendMode::None,
                    self.modes.response_body.unwrap_or(BodySendMode::None),
                )
            });
            match self.decide(None) {
                Ok(dest) => {
                    self.router.metrics.outcome(Outcome::RoutedByLoad);
                    out.push(Outbound::Message(protocol::headers_response(
                        self.route_to(&dest),
                        Some(protocol::destination_metadata(&dest)),
                        mode_override,
                    )));
                    self.phase = RequestPhase::Forwarding;
                    self.request_body_done = !body_follows;
                }
                Err(none) => self.reply(LocalReply::NoEndpoints, none.message(), out),
            }
            return Ok(());
        }
        self.phase = match self.modes.request_body {
            Some(BodySendMode::FullDuplexStreamed) => RequestPhase::Collecting {
                headers_pending: true,
            },
            Some(BodySendMode::Streamed) if self.modes.body_without_waiting => {
                RequestPhase::Collecting {
                    headers_pending: true,
                }
            }
            Some(BodySendMode::Streamed) => {
                // Envoy waits for this answer before sending the body, and lets the headers
                // go upstream as soon as it has it. Ask it to buffer the body instead (honoured
                // when the filter allows mode overrides), and name a load-based destination in
                // case it does not.
                match self.decide(None) {
                    Ok(dest) => {
                        self.provisional = true;
                        let response_mode = self.modes.response_body.unwrap_or(BodySendMode::None);
                        out.push(Outbound::Message(protocol::headers_response(
                            self.route_to(&dest),
                            Some(protocol::destination_metadata(&dest)),
                            Some(protocol::request_body_mode(
                                BodySendMode::Buffered,
                                response_mode,
                            )),
                        )));
                    }
                    Err(none) => {
                        self.reply(LocalReply::NoEndpoints, none.message(), out);
                        return Ok(());
                    }
                }
                RequestPhase::Collecting {
                    headers_pending: false,
                }
            }
            _ => {
                out.push(Outbound::Message(protocol::headers_response(
                    protocol::pass(),
                    None,
                    None,
                )));
                RequestPhase::Collecting {
                    headers_pending: false,
                }
            }
        };
        Ok(())
    }

    fn on_request_body(&mut self, b: Body, out: &mut Vec<Outbound>) -> Result<(), ExtProcError> {
        match self.phase {
            RequestPhase::AwaitHeaders => Err(ExtProcError::OutOfOrder("request body")),
            RequestPhase::Done => Ok(()),
            RequestPhase::Forwarding => {
                if self.request_body_done {
                    // Envoy has been seen to repeat the end-of-stream chunk of large bodies;
                    // a second end must not be forwarded twice.
                    debug!(bytes = b.body.len(), "ignoring request body after its end");
                    return Ok(());
                }
                self.request_body_done = b.end_of_stream;
                if self.modes.request_full_duplex() {
                    push_streamed(out, b.body, b.end_of_stream, true);
                } else {
                    out.push(Outbound::Message(protocol::request_body_response(
                        protocol::pass(),
                        None,
                    )));
                }
                Ok(())
            }
            RequestPhase::Collecting { headers_pending } => {
                if self.body_len + b.body.len() > self.router.config.max_body_bytes {
                    self.router.metrics.outcome(Outcome::BodyTooLarge);
                    let msg = format!(
                        "request body exceeds the limit of {} bytes",
                        self.router.config.max_body_bytes
                    );
                    self.reply(LocalReply::TooLarge, &msg, out);
                    return Ok(());
                }
                self.body_len += b.body.len();
                if !b.body.is_empty() {
                    self.chunks.push(b.body);
                }
                // In buffered mode the one body message is the whole body, even when
                // trailers follow it.
                let complete =
                    b.end_of_stream || self.modes.request_body == Some(BodySendMode::Buffered);
                if headers_pending {
                    if !self.modes.request_full_duplex() {
                        self.unanswered_chunks += 1;
                    }
                    if complete {
                        self.complete_request_body(out, false);
                    }
                } else if complete {
                    self.complete_request_body(out, false);
                } else {
                    // Envoy wants an answer to this piece before the next, and may send the
                    // headers upstream meanwhile: route by load now (or keep the provisional
                    // destination) instead of waiting for a body that ends too late.
                    self.route_without_body(out);
                }
                Ok(())
            }
        }
    }

    fn on_request_trailers(&mut self, out: &mut Vec<Outbound>) -> Result<(), ExtProcError> {
        match self.phase {
            RequestPhase::AwaitHeaders => Err(ExtProcError::OutOfOrder("request trailers")),
            RequestPhase::Done => Ok(()),
            RequestPhase::Collecting {
                headers_pending: true,
            } => {
                self.complete_request_body(out, true);
                if self.phase != RequestPhase::Done {
                    out.push(Outbound::Message(protocol::trailers_response(true)));
                }
                Ok(())
            }
            RequestPhase::Collecting {
                headers_pending: false,
            } => {
                // Every body message was answered already and the headers have gone upstream:
                // no answer is left that could carry a destination. Only a provisional one
                // (streamed mode) stands.
                self.phase = RequestPhase::Forwarding;
                self.request_body_done = true;
                self.chunks = Vec::new();
                if self.provisional {
                    self.router.metrics.outcome(Outcome::RoutedByLoad);
                } else {
                    warn!(
                        request_id = %self.request_id,
                        mode = ?self.modes.request_body,
                        "trailers ended a body whose answers were all sent: request not routed"
                    );
                }
                out.push(Outbound::Message(protocol::trailers_response(true)));
                Ok(())
            }
            RequestPhase::Forwarding => {
                self.request_body_done = true;
                out.push(Outbound::Message(protocol::trailers_response(true)));
                Ok(())
            }
        }
    }

    /// Routes by load while the body is still incomplete; used only where the protocol leaves
    /// no later point to route at.
    fn route_without_body(&mut self, out: &mut Vec<Outbound>) {
        self.phase = RequestPhase::Forwarding;
        self.chunks.clear();
        if self.provisional {
            self.router.metrics.outcome(Outcome::RoutedByLoad);
            out.push(Outbound::Message(protocol::request_body_response(
                protocol::pass(),
                None,
            )));
            return;
        }
        warn!(
            request_id = %self.request_id,
            mode = ?self.modes.request_body,
            "request body arrives in pieces that must each be answered: routing by load"
        );
        match self.decide(None) {
            Ok(dest) => {
                self.router.metrics.outcome(Outcome::RoutedByLoad);
                out.push(Outbound::Message(protocol::request_body_response(
                    self.route_to(&dest),
                    Some(protocol::destination_metadata(&dest)),
                )));
            }
            Err(none) => self.reply(LocalReply::NoEndpoints, none.message(), out),
        }
    }

    /// The whole body is here: parse, decide, and release what was held back.
    fn complete_request_body(&mut self, out: &mut Vec<Outbound>, trailers_follow: bool) {
        let RequestPhase::Collecting { .. } = self.phase else {
            return;
        };
        self.request_body_done = true;
        // A provisional claim must not weigh against its own endpoint in the final choice.
        self.guard = None;
        // The job owns what it reads (the outcome gives the subset back); the hints are not
        // read again once the body is complete.
        let job = DecisionJob {
            router: Arc::clone(&self.router),
            api: self.api,
            hints: std::mem::take(&mut self.hints),
            subset: self.subset.take(),
            chunks: std::mem::take(&mut self.chunks),
            started: Instant::now(),
            trailers_follow,
        };
        let heavy = if self.body_use == BodyUse::Tokenized {
            self.body_len > self.router.config.inline_decision_bytes
        } else {
            self.body_len > PARSE_INLINE_BYTES
        };
        if self.defer_heavy && heavy {
            self.job = Some(job);
        } else {
            self.resume(job.run(), out);
        }
    }

    /// Answers the request without reading or routing it: admission dropped it at its
    /// headers (`reason`); `objective` is the one they named, for upstream's metric labels.
    /// Whatever Envoy sends after is ignored.
    pub fn refuse_admission(
        &mut self,
        reason: Dropped,
        objective: Option<&str>,
        out: &mut Vec<Outbound>,
    ) {
        self.hints.objective = objective.map(str::to_owned);
        self.router.metrics.outcome(reason.outcome());
        self.reply(reason.reply(), reason.message(), out);
    }

    /// Answers the request of a [`DecisionJob`] that could not be queued: 503, counted.
    pub fn refuse(&mut self, job: DecisionJob, out: &mut Vec<Outbound>) {
        drop(job);
        self.router.metrics.outcome(Outcome::Overloaded);
        self.reply(
            LocalReply::Overloaded,
            "kvroute's routing decision queue is full",
            out,
        );
    }

    /// Continues the stream with what its [`DecisionJob`] found: the routing answer (or a
    /// local reply), and whatever of the body was held back.
    pub fn resume(&mut self, outcome: DecisionOutcome, out: &mut Vec<Outbound>) {
        let RequestPhase::Collecting { headers_pending } = self.phase else {
            return;
        };
        let DecisionOutcome {
            body,
            subset,
            result,
            started,
            trailers_follow,
            model,
            streaming,
            prompt_bytes,
        } = outcome;
        self.subset = subset;
        self.model = model;
        self.streaming = streaming;
        self.prompt_bytes = prompt_bytes;
        let decided = match result {
            Ok(decided) => decided,
            Err(e) => {
                self.router.metrics.outcome(Outcome::BadRequest);
                self.reply(LocalReply::BadRequest, &e.to_string(), out);
                return;
            }
        };
        let decided = self.claim(decided);
        self.router
            .metrics
            .decision(started.elapsed().as_secs_f64());
        let dest = match decided {
            Ok(dest) => dest,
            Err(none) => {
                self.reply(LocalReply::NoEndpoints, none.message(), out);
                return;
            }
        };
        self.router.metrics.outcome(Outcome::Routed);
        self.phase = RequestPhase::Forwarding;
        let metadata = Some(protocol::destination_metadata(&dest));
        if !headers_pending {
            out.push(Outbound::Message(protocol::request_body_response(
                self.route_to(&dest),
                metadata,
            )));
        } else if self.modes.request_full_duplex() {
            out.push(Outbound::Message(protocol::headers_response(
                self.route_with_length(&dest, body.len()),
                metadata,
                None,
            )));
            push_streamed(out, body, !trailers_follow, true);
        } else {
            out.push(Outbound::Message(protocol::headers_response(
                self.route_to(&dest),
                metadata,
                None,
            )));
            for _ in 0..std::mem::take(&mut self.unanswered_chunks) {
                out.push(Outbound::Message(protocol::request_body_response(
                    protocol::pass(),
                    None,
                )));
            }
        }
    }

    /// Chooses targets for this request and counts it against the primary. Returns the
    /// destination value (`ip:port[,ip:port…]`).
    fn decide(&mut self, request: Option<&InferenceRequest>) -> Result<String, NoEndpoint> {
        // A provisional claim must not weigh against its own endpoint in the final choice.
        self.guard = None;
        let scheduled = schedule(&self.router, self.subset.as_deref(), &self.hints, request);
        self.claim(scheduled)
    }

    /// Counts a decision against its primary and writes its destination value.
    fn claim(&mut self, scheduled: Result<Decision, ScheduleError>) -> Result<String, NoEndpoint> {
        match scheduled {
            Ok(decision) => {
                self.response_headers = decision.response_headers().to_vec();
                self.prefiller = decision.prefill().map(|(ep, tokens)| {
                    (ep.address().to_string(), ep.acquire_with_prefill(tokens))
                });
                self.guard = Some(
                    decision
                        .primary()
                        .acquire_with_prefill(decision.prefill_tokens()),
                );
                if let Some(upstream) = &self.router.metrics.upstream {
                    let record = self.record.get_or_insert_with(|| {
                        upstream
                            .start(
                                &self.model,
                                &self.fairness_id,
                                self.hints.objective.as_deref(),
                            )
                            .since(self.started)
                    });
                    upstream.dispatched(record);
                }
                let mut dest = String::with_capacity(24 * (1 + decision.fallbacks().len()));
                for (i, t) in decision.targets().enumerate() {
                    if i > 0 {
                        dest.push(',');
                    }
                    dest.push_str(&t.address().to_string());
                }
                debug!(request_id = %self.request_id, destination = %dest, api = ?self.api, "routed");
                Ok(dest)
            }
            Err(ScheduleError::NoCandidates | ScheduleError::AllFiltered) => {
                self.router.metrics.outcome(Outcome::NoEndpoint);
                Err(NoEndpoint {
                    subset: self.subset.is_some(),
                })
            }
        }
    }

    fn reply(&mut self, reply: LocalReply, message: &str, out: &mut Vec<Outbound>) {
        if let Some(upstream) = &self.router.metrics.upstream {
            let record = self.record.get_or_insert_with(|| {
                upstream
                    .start(
                        &self.model,
                        &self.fairness_id,
                        self.hints.objective.as_deref(),
                    )
                    .since(self.started)
            });
            upstream.error(record, reply.code());
        }
        out.push(Outbound::Message(protocol::immediate(reply, message)));
        self.phase = RequestPhase::Done;
        self.chunks = Vec::new();
        self.guard = None;
        self.prefiller = None;
    }

    /// The routing mutation for `dest`, naming the prefill endpoint when the decision has
    /// one.
    fn route_to(&self, dest: &str) -> CommonResponse {
        protocol::route_to(dest, self.prefiller.as_ref().map(|(p, _)| p.as_str()))
    }

    /// [`StreamState::route_to`], stating the body's length.
    fn route_with_length(&self, dest: &str, length: usize) -> CommonResponse {
        protocol::route_with_length(
            dest,
            self.prefiller.as_ref().map(|(p, _)| p.as_str()),
            length,
        )
    }

    fn on_response_headers(
        &mut self,
        h: &HttpHeaders,
        metadata: Option<&HashMap<String, Struct>>,
        out: &mut Vec<Outbound>,
    ) {
        let headers = h.headers.as_ref();
        self.status = header(headers, ":status").and_then(|s| s.parse().ok());
        self.usage = Some(UsageScanner::for_content_type(
            header(headers, "content-type").unwrap_or(""),
        ));
        self.follow_served_endpoint(metadata);
        // Passive health: a 5xx (the pod's, or Envoy's own when it could not reach the pod)
        // counts against the endpoint, anything else for it.
        if let (Some(status), Some(target)) = (self.status, self.target()) {
            target.record_outcome(status < 500, Instant::now());
        }
        if let (Some(upstream), Some(record)) = (&self.router.metrics.upstream, &mut self.record) {
            if self.status != Some(200) {
                upstream.error(record, "ModelServerError");
            }
            if self.modes.response_body == Some(BodySendMode::None) {
                upstream.first_byte(record, self.streaming);
            }
        }
        if self.modes.response_body == Some(BodySendMode::None)
            && let Some(guard) = &mut self.guard
        {
            // No body will be seen: the headers are the last sign of the answer starting,
            // though they may come before its first token, so they time nothing.
            guard.prefilled_untimed();
            self.prefiller = None;
        }
        out.push(Outbound::Message(protocol::response_headers_response(
            &self.response_headers,
        )));
        if h.end_of_stream {
            self.finish_response();
        }
    }

    /// With fallbacks, the endpoint that served may not be the primary: move the in-flight
    /// count to the one the data plane reports.
    fn follow_served_endpoint(&mut self, metadata: Option<&HashMap<String, Struct>>) {
        let Some(served) = metadata
            .and_then(|m| {
                protocol::metadata_strings(m, protocol::LB_NAMESPACE, protocol::SERVED_KEY)
            })
            .and_then(|v| v.into_iter().next())
            .and_then(|s| s.parse::<SocketAddr>().ok())
        else {
            return;
        };
        if self.target().is_some_and(|t| t.address() != served)
            && let Some(ep) = self.router.registry.find_by_address(served)
        {
            self.guard = Some(ep.acquire());
        }
    }

    fn on_response_body(&mut self, b: Body, out: &mut Vec<Outbound>) {
        if self.response_done {
            debug!(bytes = b.body.len(), "ignoring response body after its end");
            return;
        }
        if let Some(scanner) = &mut self.usage {
            scanner.feed(&b.body);
        }
        if !b.body.is_empty()
            && let Some(guard) = &mut self.guard
        {
            // The first bytes of the answer: the prompt has been computed. Only a streamed
            // answer's first bytes are its first token, which times the endpoint's speed; a
            // whole answer's include its generation.
            if self.streaming {
                guard.prefilled();
            } else {
                guard.prefilled_untimed();
            }
            self.prefiller = None;
            if let (Some(upstream), Some(record)) =
                (&self.router.metrics.upstream, &mut self.record)
            {
                upstream.first_byte(record, self.streaming);
            }
        }
        if self.modes.response_full_duplex() {
            push_streamed(out, b.body, b.end_of_stream, false);
        } else {
            out.push(Outbound::Message(protocol::response_body_response(
                protocol::pass(),
            )));
        }
        if b.end_of_stream {
            self.finish_response();
        }
    }

    /// The response has ended: account its usage and give the endpoint's slot back.
    fn finish_response(&mut self) {
        if self.response_done {
            return;
        }
        self.response_done = true;
        let usage = self.usage.take().and_then(UsageScanner::finish);
        if let (Some(upstream), Some(record)) = (&self.router.metrics.upstream, &mut self.record) {
            upstream.ended(record, usage.as_ref(), true);
        }
        if let Some(guard) = self.guard.take() {
            if let Some(usage) = &usage {
                self.router.metrics.usage(guard.endpoint(), usage);
            }
            if self.status == Some(200) {
                guard
                    .endpoint()
                    .observe_answer(self.prompt_bytes, usage.map(|u| u.prompt_tokens));
            }
            self.router.metrics.response(self.status);
        }
    }
}

impl Drop for StreamState {
    /// The stream ended before the response did: the client went away, Envoy reset the
    /// stream, or Envoy sends no more of the response (response body mode NONE, or response
    /// headers SKIP). The slot is given back either way; the response is counted by its
    /// status if it was seen, else as aborted.
    fn drop(&mut self) {
        if self.guard.is_some() && !self.response_done {
            self.router.metrics.response(self.status);
        }
        if let (Some(upstream), Some(record)) = (&self.router.metrics.upstream, &mut self.record) {
            upstream.ended(record, None, false);
        }
    }
}

/// No endpoint could take the request: answered 503, as the endpoint-picker protocol asks.
#[derive(Clone, Copy, Debug)]
struct NoEndpoint {
    /// The data plane restricted the candidates.
    subset: bool,
}

impl NoEndpoint {
    fn message(self) -> &'static str {
        if self.subset {
            "failed to find endpoint candidates for serving the request (none in the data plane's subset)"
        } else {
            "failed to find endpoint candidates for serving the request"
        }
    }
}

/// Sends a body back in streamed form (request or response side), in pieces of at most
/// [`protocol::MAX_CHUNK`] bytes (slices, never copies), the last one carrying
/// `end_of_stream`.
fn push_streamed(out: &mut Vec<Outbound>, body: Bytes, end_of_stream: bool, request: bool) {
    let mut pieces = protocol::pieces(body).peekable();
    while let Some(body) = pieces.next() {
        out.push(Outbound::Chunk {
            request,
            body,
            end_of_stream: end_of_stream && pieces.peek().is_none(),
        });
    }
}

/// Whether `addr` is named by the data plane's subset, as `ip:port` or as a bare IP.
fn in_subset(subset: &[String], addr: SocketAddr) -> bool {
    subset.iter().any(|s| {
        s.parse::<SocketAddr>()
            .map(|a| a == addr)
            .or_else(|_| s.parse::<IpAddr>().map(|ip| ip == addr.ip()))
            .unwrap_or(false)
    })
}

#[cfg(test)]
pub(crate) mod tests;
