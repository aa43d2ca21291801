//! The simulator as a real server, for end-to-end tests and demos: vLLM's OpenAI API
//! (`/v1/completions`, `/v1/chat/completions`, streaming or not, `/v1/models`, `/health`),
//! `/metrics` with vLLM's metric names, and KV events on ZMQ (a PUB socket and a replay
//! ROUTER socket) in vLLM's wire format. The engine steps in real time, each step sleeping
//! for its modelled duration divided by `speed`.
//!
//! Test hooks under `/sim/`: `POST /sim/fault` with `{"fault": ...}` (`stall`,
//! `drop-events`, `restart`, `errors`, `none`) and `GET /sim/cache` (the cached hashes).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kvroute_chat::ChatTemplate;
use kvroute_core::{
    ApiKind, ChatOptions, ContentPart, InferenceRequest, MessageContent, Prompt, RequestHints,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use xxhash_rust::xxh3::xxh3_64;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::engine::{Engine, KvEvent, RequestId, SimRequest};
use crate::profile::Profile;
use crate::prompt::PromptTokens;
use crate::wire::{self, EventEncoding};

/// How long one replay message may wait for a slow client.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request body read.
const MAX_BODY_BYTES: usize = 64 << 20;
/// Replay buffer length, as vLLM's `buffer_steps` default.
const REPLAY_BATCHES: usize = 10_000;
/// Vocabulary of the byte-chunk tokenizer (Llama 3's size).
const VOCAB: u64 = 128_256;
/// The header naming the prefill pod, as llm-d's routing sidecar reads it.
const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// The header a decode pod answers with, naming the prefill pod that computed the prompt
/// (so that tests see where each part ran).
pub const PREFILLED_BY_HEADER: &str = "x-sim-prefilled-by";
/// Longest wait for a prefill pod's answer.
const REMOTE_PREFILL_TIMEOUT: Duration = Duration::from_secs(120);
/// Tokens generated when a request does not say (vLLM's default for completions).
const DEFAULT_MAX_TOKENS: u64 = 16;

/// How to run one simulated pod.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// HTTP address (OpenAI API, `/metrics`).
    pub http: SocketAddr,
    /// KV-event PUB address.
    pub events: SocketAddr,
    /// KV-event replay ROUTER address.
    pub replay: SocketAddr,
    /// Frame 0 of every event message.
    pub topic: String,
    /// Model name served.
    pub model: String,
    /// Engine figures.
    pub profile: Profile,
    /// Steps take their modelled time divided by this.
    pub speed: f64,
    /// Event encoding (vLLM release family).
    pub encoding: EventEncoding,
    /// A real tokenizer (`tokenizer.json`); without one, text is tokenized by byte chunks.
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// The model's chat template (`tokenizer_config.json`); without one, chats are rendered
    /// with a plain `<|role|>` scheme.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// LoRA adapters served: a request whose `model` names one runs with it (at most
    /// `profile.max_loras` at once, which must then be at least 1); any other name is the
    /// base model.
    pub lora_adapters: Vec<String>,
    /// Its part in disaggregated serving.
    pub pd: PdConfig,
    /// Usage in every streamed answer, asked for or not (vLLM's
    /// `--enable-force-include-usage`); otherwise only where the request's
    /// `stream_options.include_usage` asks, as vLLM and OpenAI answer.
    pub force_include_usage: bool,
}

/// A pod's part in prefill/decode disaggregation (llm-d's `llm-d.ai/role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves requests whole, and as a decode pod when told of a prefill pod.
    #[default]
    Both,
    /// Computes prompts for decode pods: serves what it is sent, never forwards.
    Prefill,
    /// Has llm-d's routing sidecar: a request naming a prefill pod in
    /// `x-prefiller-host-port` is prefilled there first.
    Decode,
}

/// How a pod takes part in disaggregated serving.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PdConfig {
    /// Its role.
    pub role: Role,
    /// Microseconds to move one prompt token's KV from the prefill pod (NIXL over RDMA):
    /// Llama 3.1 8B keeps 128 KiB per token, about 5 µs at 25 GB/s.
    pub transfer_us_per_token: f64,
}

impl Default for PdConfig {
    fn default() -> Self {
        Self {
            role: Role::Both,
            transfer_us_per_token: 5.0,
        }
    }
}

/// Where a started server listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// HTTP.
    pub http: SocketAddr,
    /// KV-event PUB.
    pub events: SocketAddr,
    /// KV-event replay.
    pub replay: SocketAddr,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A fault to act out, for tests of what a router does when a pod misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Back to normal.
    None,
    /// The engine stops stepping (requests hang).
    Stall,
    /// Event messages are not sent (sequence numbers still advance; replay still has them).
    DropEvents,
    /// Answer every inference request 500.
    Errors,
}

/// What streams back to one request's HTTP handler.
enum Tok {
    Token(u32),
    Done {
        prompt: usize,
        cached: usize,
        output: usize,
    },
}

enum Command {
    Submit {
        req: SimRequest,
        out: mpsc::UnboundedSender<Tok>,
        /// The prompt's KV comes from a prefill pod.
        transferred: bool,
    },
    Restart,
    ResetPrefixCache,
    Cache(oneshot::Sender<Vec<u64>>),
    /// Start or stop dropping published events; passed down the event pipeline so that it
    /// applies exactly to the batches of what was submitted after it.
    DropEvents(bool),
}

/// Gauges and counters `/metrics` shows.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    running: usize,
    waiting: usize,
    kv_usage: f64,
    prefix_queries: u64,
    prefix_hits: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    finished: u64,
    /// `vllm:request_prompt_tokens`: each finished request's prompt length, by bucket
    /// ([`PROMPT_BUCKETS`], then +Inf), and their sum.
    prompt_buckets: [u64; PROMPT_BUCKETS.len() + 1],
    finished_prompt_tokens: u64,
}

/// `vllm:request_prompt_tokens`' upper bounds: vLLM's 1-2-5 series (`build_1_2_5_buckets`),
/// here up to 100,000 tokens.
const PROMPT_BUCKETS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
];

struct Shared {
    config: ServerConfig,
    commands: mpsc::UnboundedSender<Command>,
    stats: Mutex<Stats>,
    lora: Mutex<LoraSeries>,
    fault: Mutex<Fault>,
    next_id: Mutex<RequestId>,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Series of `vllm:lora_requests_info` kept at most: vLLM's gauge keeps every label set it
/// was ever given (a scraper reads the newest, by value); the sim keeps the latest few.
const LORA_SERIES: usize = 4;

/// `vllm:lora_requests_info` as vLLM's gauge holds it: one series per label set seen
/// (running adapters, waiting adapters), each valued at the time it was last set.
#[derive(Debug, Default)]
struct LoraSeries(VecDeque<(String, String, f64)>);

impl LoraSeries {
    /// Sets the series of `running` and `waiting` to `now`.
    fn set(&mut self, running: String, waiting: String, now: f64) {
        self.0.retain(|(r, w, _)| *r != running || *w != waiting);
        self.0.push_back((running, waiting, now));
        while self.0.len() > LORA_SERIES {
            self.0.pop_front();
        }
    }
}

/// The time now, seconds since the epoch (vLLM's `time.time()`).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Adapter names as vLLM's label writes them: comma-separated.
fn adapter_list(loras: &[Arc<str>]) -> String {
    loras
        .iter()
        .map(|a| a.as_ref())
        .collect::<Vec<&str>>()
        .join(",")
}

/// Binds every socket and starts the engine, HTTP and event tasks; they run until `stop`
/// is cancelled. Returns where they listen (ports may be 0 in `config`).
pub async fn start(config: ServerConfig, stop: CancellationToken) -> Result<Bound, StartError> {
    if !config.lora_adapters.is_empty() && config.profile.max_loras == 0 {
        return Err(StartError(
            "LoRA adapters are served with at least one adapter slot (max_loras)".into(),
        ));
    }
    let http = TcpListener::bind(config.http)
        .await
        .map_err(|e| StartError(format!("binding HTTP {}: {e}", config.http)))?;
    let mut publisher = zeromq::PubSocket::new();
    let events = bind_zmq(&mut publisher, config.events).await?;
    let mut router = zeromq::RouterSocket::new();
    let replay = bind_zmq(&mut router, config.replay).await?;
    let bound = Bound {
        http: http
            .local_addr()
            .map_err(|e| StartError(format!("HTTP address: {e}")))?,
        events,
        replay,
    };
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (batches, batch_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config,
        commands,
        stats: Mutex::new(Stats::default()),
        lora: Mutex::new(LoraSeries::default()),
        fault: Mutex::new(Fault::None),
        next_id: Mutex::new(0),
    });
    tokio::spawn(drive(
        Arc::clone(&shared),
        command_rx,
        batches,
        stop.clone(),
    ));
    tokio::spawn(publish(
        Arc::clone(&shared),
        publisher,
        router,
        batch_rx,
        stop.clone(),
    ));
    tokio::spawn(serve_http(shared, http, stop));
    Ok(bound)
}

async fn bind_zmq<S: Socket>(socket: &mut S, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    let endpoint = socket
        .bind(&format!("tcp://{addr}"))
        .await
        .map_err(|e| StartError(format!("binding ZMQ {addr}: {e}")))?;
    match endpoint {
        zeromq::Endpoint::Tcp(_, port) => Ok(SocketAddr::new(addr.ip(), port)),
        other => Err(StartError(format!("unexpected ZMQ endpoint {other}"))),
    }
}

/// What goes down the event pipeline to the publisher, in order.
#[derive(Debug)]
enum Batch {
    /// A batch to publish.
    Events(Vec<KvEvent>),
    /// A restart: sequence numbers start again, the replay buffer empties.
    Restart,
    /// Drop (or stop dropping) the batches that follow.
    DropEvents(bool),
}

/// The engine loop: admit commands, step, sleep the step's time, deliver its effects.
async fn drive(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    batches: mpsc::UnboundedSender<Batch>,
    stop: CancellationToken,
) {
    let mut engine = Engine::new(shared.config.profile.clone(), true);
    let mut streams: HashMap<RequestId, (mpsc::UnboundedSender<Tok>, u64)> = HashMap::new();
    let speed = shared.config.speed.max(1e-6);
    loop {
        if !engine.has_work() || shared.fault() == Fault::Stall {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                c = commands.recv() => c,
                () = tokio::time::sleep(Duration::from_millis(20)), if shared.fault() == Fault::Stall => continue,
            };
            let Some(c) = next else { return };
            handle(c, &mut engine, &mut streams, &batches, &shared);
        }
        while let Ok(c) = commands.try_recv() {
            handle(c, &mut engine, &mut streams, &batches, &shared);
        }
        if shared.fault() == Fault::Stall || !engine.has_work() {
            continue;
        }
        let report = engine.step();
        let pause = Duration::from_secs_f64(report.duration_us as f64 / 1e6 / speed);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        for id in &report.generated {
            if let Some((s, n)) = streams.get_mut(id) {
                let _ = s.send(Tok::Token(synthetic_token(*id, *n)));
                *n += 1;
            }
        }
        for f in &report.finished {
            if let Some((s, _)) = streams.remove(&f.id) {
                let _ = s.send(Tok::Done {
                    prompt: f.prompt_tokens,
                    cached: f.cached_tokens,
                    output: f.output_tokens,
                });
            }
        }
        if !report.events.is_empty() {
            let _ = batches.send(Batch::Events(report.events));
        }
        let mut stats = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.running = engine.running();
        stats.waiting = engine.waiting();
        stats.kv_usage = engine.kv_usage();
        (stats.prefix_queries, stats.prefix_hits) = engine.prefix_cache_counts();
        stats.prompt_tokens += report.prefill_tokens as u64;
        stats.generation_tokens += report.generated.len() as u64;
        stats.finished += report.finished.len() as u64;
        for f in &report.finished {
            let tokens = f.prompt_tokens as u64;
            let bucket = PROMPT_BUCKETS.partition_point(|&le| le < tokens);
            stats.prompt_buckets[bucket] += 1;
            stats.finished_prompt_tokens += tokens;
        }
        drop(stats);
        if shared.config.profile.max_loras > 0 {
            shared
                .lora
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set(
                    adapter_list(&engine.running_loras()),
                    adapter_list(&engine.waiting_loras()),
                    unix_now(),
                );
        }
    }
}

fn handle(
    c: Command,
    engine: &mut Engine,
    streams: &mut HashMap<RequestId, (mpsc::UnboundedSender<Tok>, u64)>,
    batches: &mpsc::UnboundedSender<Batch>,
    shared: &Shared,
) {
    match c {
        Command::Submit {
            req,
            out,
            transferred,
        } => {
            let id = req.id;
            let added = if transferred {
                engine.add_transferred(req)
            } else {
                engine.add(req)
            };
            if added {
                streams.insert(id, (out, 0));
            }
        }
        Command::Restart => {
            // A restarted pod: empty cache, no requests, sequence numbers from 0.
            *engine = Engine::new(shared.config.profile.clone(), true);
            streams.clear();
            let _ = batches.send(Batch::Restart);
            *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = Stats::default();
            *shared.lora.lock().unwrap_or_else(PoisonError::into_inner) = LoraSeries::default();
        }
        Command::ResetPrefixCache => {
            let _ = batches.send(Batch::Events(engine.clear_cache()));
        }
        Command::DropEvents(drop) => {
            let _ = batches.send(Batch::DropEvents(drop));
        }
        Command::Cache(reply) => {
            let _ = reply.send(engine.cached_hashes());
        }
    }
}

fn synthetic_token(id: RequestId, i: u64) -> u32 {
    (xxh3_64(&[id.to_le_bytes(), i.to_le_bytes()].concat()) % VOCAB) as u32
}

/// The PUB socket and the replay ROUTER, in one task as in vLLM's publisher thread.
async fn publish(
    shared: Arc<Shared>,
    mut publisher: zeromq::PubSocket,
    mut router: zeromq::RouterSocket,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    stop: CancellationToken,
) {
    let topic = Bytes::from(shared.config.topic.clone());
    let mut seq: u64 = 0;
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
    let mut drop_events = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            b = batches.recv() => {
                let events = match b {
                    None => return,
                    Some(Batch::Events(events)) => events,
                    Some(Batch::Restart) => {
                        seq = 0;
                        buffer.clear();
                        continue;
                    }
                    Some(Batch::DropEvents(d)) => {
                        drop_events = d;
                        continue;
                    }
                };
                let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                let payload = Bytes::from(wire::encode_batch(ts, &events, 0, shared.config.encoding));
                let this = seq;
                seq += 1;
                buffer.push_back((this, payload.clone()));
                if buffer.len() > REPLAY_BATCHES {
                    buffer.pop_front();
                }
                if drop_events {
                    continue;
                }
                let frames = vec![topic.clone(), Bytes::copy_from_slice(&wire::seq_frame(this)), payload];
                if let Ok(msg) = ZmqMessage::try_from(frames)
                    && let Err(e) = publisher.send(msg).await
                {
                    warn!(error = %e, "publishing KV events failed");
                }
            }
            r = router.recv() => {
                let Ok(msg) = r else { continue };
                replay(&mut router, msg, &topic, &buffer).await;
            }
        }
    }
}

/// Answers `[identity, "", start_seq]` with every buffered batch from `start_seq` on, each
/// `[identity, "", topic, seq, payload]`, then `[identity, "", topic, -1, ""]`.
async fn replay(
    router: &mut zeromq::RouterSocket,
    msg: ZmqMessage,
    topic: &Bytes,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    let frames = msg.into_vec();
    // Exactly [identity, "", start_seq (8 bytes)], as vLLM's publisher requires.
    let [identity, delimiter, start] = frames.as_slice() else {
        debug!(frames = frames.len(), "invalid replay request");
        return;
    };
    let (true, Ok(start)) = (
        delimiter.is_empty(),
        <[u8; 8]>::try_from(start.as_ref()).map(u64::from_be_bytes),
    ) else {
        debug!("invalid replay request");
        return;
    };
    let empty = Bytes::new();
    let reply = |seq: [u8; 8], payload: Bytes| {
        ZmqMessage::try_from(vec![
            identity.clone(),
            empty.clone(),
            topic.clone(),
            Bytes::copy_from_slice(&seq),
            payload,
        ])
    };
    // A client that stops reading must not stall live publishing: give up on it (libzmq's
    // ROUTER would drop at its high-water mark instead of waiting).
    let send = async |router: &mut zeromq::RouterSocket, m: ZmqMessage| {
        matches!(
            tokio::time::timeout(REPLAY_SEND_TIMEOUT, router.send(m)).await,
            Ok(Ok(()))
        )
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        if let Ok(m) = reply(wire::seq_frame(*seq), payload.clone())
            && !send(router, m).await
        {
            warn!("replay client not reading: replay abandoned");
            return;
        }
    }
    if let Ok(m) = reply(wire::END_SEQ, Bytes::new()) {
        send(router, m).await;
    }
}

async fn serve_http(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => { if let Err(e) = r { debug!(error = %e, "sim connection ended"); } }
                () = stop.cancelled() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The request body, up to [`MAX_BODY_BYTES`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ()> {
    http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| ())
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": "BadRequestError", "code": status.as_u16()}}),
    )
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => Response::new(Full::new(Bytes::new()).boxed()),
        (Method::GET, "/v1/models") => json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [
                {"id": shared.config.model, "object": "model", "owned_by": "kvroute-sim", "max_model_len": shared.config.profile.kv_blocks * shared.config.profile.block_size}
            ]}),
        ),
        (Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(metrics(shared))).boxed());
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::POST, "/reset_prefix_cache") => {
            let _ = shared.commands.send(Command::ResetPrefixCache);
            Response::new(Full::new(Bytes::new()).boxed())
        }
        (Method::GET, "/sim/cache") => {
            let (tx, rx) = oneshot::channel();
            let _ = shared.commands.send(Command::Cache(tx));
            let hashes = rx.await.unwrap_or_default();
            json(StatusCode::OK, &serde_json::json!({ "hashes": hashes }))
        }
        (Method::POST, "/sim/fault") => {
            let Ok(body) = read_body(req).await else {
                return error(StatusCode::BAD_REQUEST, "unreadable or oversized body");
            };
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let fault = match v["fault"].as_str() {
                Some("none") => Fault::None,
                Some("stall") => Fault::Stall,
                Some("drop-events") => Fault::DropEvents,
                Some("errors") => Fault::Errors,
                Some("restart") => {
                    let _ = shared.commands.send(Command::Restart);
                    Fault::None
                }
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "fault: none|stall|drop-events|errors|restart",
                    );
                }
            };
            let _ = shared
                .commands
                .send(Command::DropEvents(fault == Fault::DropEvents));
            *shared.fault.lock().unwrap_or_else(PoisonError::into_inner) = fault;
            json(StatusCode::OK, &serde_json::json!({"fault": v["fault"]}))
        }
        (Method::POST, p) if ApiKind::from_path(p) != ApiKind::Other => {
            if shared.fault() == Fault::Errors {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "simulated failure");
            }
            let api = ApiKind::from_path(p);
            let prefiller = match shared.config.pd.role {
                Role::Prefill => None,
                Role::Both | Role::Decode => req
                    .headers()
                    .get(PREFILLER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            };
            let path = p.to_owned();
            let Ok(body) = read_body(req).await else {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "unreadable or oversized body",
                );
            };
            let parsed = match InferenceRequest::parse(api, &body, RequestHints::default()) {
                Ok(parsed) => parsed,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let usage = shared.config.force_include_usage || asks_for_usage(&body);
            let Some(prefiller) = prefiller else {
                return generate(shared, api, &parsed, usage, false).await;
            };
            // llm-d's sidecar: the prefill pod computes the prompt (one token asked of it),
            // its KV comes over, then this pod decodes. A prefill pod that fails costs the
            // request nothing: the prompt is computed here instead.
            match remote_prefill(&prefiller, &path, &body).await {
                Ok(prompt_tokens) => {
                    let pause = prompt_tokens as f64 * shared.config.pd.transfer_us_per_token
                        / 1e6
                        / shared.config.speed.max(1e-6);
                    tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                    let mut r = generate(shared, api, &parsed, usage, true).await;
                    if let Ok(v) = hyper::header::HeaderValue::from_str(&prefiller) {
                        r.headers_mut().insert(PREFILLED_BY_HEADER, v);
                    }
                    r
                }
                Err(e) => {
                    warn!(prefiller = %prefiller, error = %e, "remote prefill failed; prefilling here");
                    generate(shared, api, &parsed, usage, false).await
                }
            }
        }
        _ => {
            // Read what is sent to a path not served, so the connection stays usable for
            // the client's next request: hyper drains a short unread body itself, but
            // closes the connection after a long one, which a client that pools
            // connections (vllm-router asking for `/v1/chat/completions/render`) then
            // finds closed on its next request.
            let mut r = error(StatusCode::NOT_FOUND, "not found");
            if read_body(req).await.is_err() {
                r.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            r
        }
    }
}

/// A model's tokenizer and chat template, for tokenizing prompts as vLLM does.
#[derive(Clone, Debug, Default)]
pub struct PromptModel<'a> {
    /// `tokenizer.json`.
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
    /// The chat template of `tokenizer_config.json`.
    pub template: Option<&'a ChatTemplate>,
}

/// The prompt's token ids. With the model's files, as vLLM computes them: a completion's text
/// with the tokenizer's special tokens added (`add_special_tokens=True`), a chat rendered
/// by the model's template with the generation prompt and tokenized without adding any.
/// Without a tokenizer, text becomes one token per 4-byte chunk (a stable stand-in: about
/// the bytes per token of English, and equal text prefixes give equal token prefixes to
/// the last whole chunk); without a template, chat messages are rendered
/// `<|role|>\n{content}\n` then `<|assistant|>\n`.
pub fn tokenize(
    prompt: &Prompt,
    chat: &ChatOptions,
    model: PromptModel<'_>,
) -> Result<Vec<u32>, String> {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
    }
    let mut bytes = Vec::new();
    let mut special_tokens = true;
    match prompt {
        Prompt::Tokens(ids) => return Ok(ids.clone()),
        Prompt::TokenBatches(b) => return Ok(b.first().cloned().unwrap_or_default()),
        Prompt::Text(t) => text(&mut bytes, t),
        Prompt::Texts(ts) => ts.first().iter().for_each(|t| text(&mut bytes, t)),
        Prompt::Chat(messages) => {
            special_tokens = false;
            if let Some(template) = model.template {
                let rendered = template
                    .render(messages, chat, true)
                    .map_err(|e| e.to_string())?;
                text(&mut bytes, &rendered);
            } else {
                for m in messages {
                    text(&mut bytes, &format!("<|{}|>\n", m.role));
                    match &m.content {
                        MessageContent::Empty => {}
                        MessageContent::Text(t) => text(&mut bytes, t),
                        MessageContent::Parts(parts) => {
                            for p in parts {
                                match p {
                                    ContentPart::Text(t) => text(&mut bytes, t),
                                    ContentPart::Other { kind } => {
                                        text(&mut bytes, &format!("<{kind}>"))
                                    }
                                }
                            }
                        }
                    }
                    text(&mut bytes, "\n");
                }
                text(&mut bytes, "<|assistant|>\n");
            }
        }
    }
    if let Some(t) = model.tokenizer {
        let text = String::from_utf8_lossy(&bytes);
        return t
            .encode(text.as_ref(), special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing the prompt: {e}"));
    }
    Ok(bytes
        .chunks(4)
        .map(|c| (xxh3_64(c) % VOCAB) as u32)
        .collect())
}

/// Has the prefill pod at `host_port` compute the prompt of `body` (sent to `path` with one
/// token to generate, not streamed, as llm-d's sidecar asks it); returns the prompt's
/// length in tokens as the prefill pod counted it.
async fn remote_prefill(host_port: &str, path: &str, body: &[u8]) -> Result<u64, String> {
    let mut request: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let fields = request
        .as_object_mut()
        .ok_or("the body is not a JSON object")?;
    fields.insert("max_tokens".into(), 1.into());
    if fields.contains_key("max_completion_tokens") {
        fields.insert("max_completion_tokens".into(), 1.into());
    }
    fields.insert("stream".into(), false.into());
    fields.remove("stream_options");
    fields.insert(
        "kv_transfer_params".into(),
        serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false}),
    );
    let payload = Bytes::from(request.to_string());
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(host_port)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::post(path)
            .header("host", host_port)
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let answer = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| format!("answer: {e}"))?;
        answer["usage"]["prompt_tokens"]
            .as_u64()
            .ok_or_else(|| "answer without usage.prompt_tokens".to_owned())
    };
    tokio::time::timeout(REMOTE_PREFILL_TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Whether a request's `stream_options.include_usage` asks a streamed answer for its usage.
fn asks_for_usage(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        stream_options: Option<Options>,
    }
    serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.stream_options?.include_usage)
        .unwrap_or(false)
}

/// Runs a parsed request and answers it, streamed or whole; a streamed answer ends with its
/// usage when `usage` (a whole one always has it).
async fn generate(
    shared: &Shared,
    api: ApiKind,
    parsed: &InferenceRequest,
    usage_streamed: bool,
    transferred: bool,
) -> Response<Body> {
    let model = PromptModel {
        tokenizer: shared.config.tokenizer.as_deref(),
        template: shared.config.chat_template.as_deref(),
    };
    let tokens = match tokenize(&parsed.prompt, &parsed.chat, model) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let max_tokens = parsed.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).max(1);
    let id = {
        let mut next = shared
            .next_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *next += 1;
        *next
    };
    let lora = shared
        .config
        .lora_adapters
        .contains(&parsed.model)
        .then(|| Arc::from(parsed.model.as_str()));
    let req = SimRequest {
        id,
        prompt: PromptTokens::Explicit(Arc::from(tokens)),
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        lora,
    };
    let fits = req
        .prompt
        .len()
        .max(1)
        .checked_add(req.max_tokens)
        .is_some_and(|t| {
            t.div_ceil(shared.config.profile.block_size) <= shared.config.profile.kv_blocks
        });
    if !fits {
        return error(
            StatusCode::BAD_REQUEST,
            "prompt and max_tokens exceed the KV cache",
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    if shared
        .commands
        .send(Command::Submit {
            req,
            out: tx,
            transferred,
        })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "engine stopped");
    }
    let chat = api == ApiKind::ChatCompletions;
    let model = parsed.model.clone();
    let rid = format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" });
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let piece = |tok: u32| format!("t{tok} ");
    let choice = move |text: &str, finish: Option<&str>| {
        if chat {
            serde_json::json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
        }
    };
    let usage = |prompt: usize, cached: usize, output: usize| {
        serde_json::json!({"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached}})
    };
    if parsed.stream {
        let chunk_object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut first = true;
        let stream = UnboundedReceiverStream::new(rx).map(move |t| {
            let data = match t {
                Tok::Token(tok) => {
                    let mut c = choice(&piece(tok), None);
                    if chat && std::mem::take(&mut first) {
                        // The first chat chunk names the role, as OpenAI's stream does.
                        c["delta"]["role"] = serde_json::json!("assistant");
                    }
                    serde_json::json!({"id": rid, "object": chunk_object, "model": model, "choices": [c]})
                }
                Tok::Done { prompt, cached, output } => {
                    // The finish reason, then, when asked, usage in a chunk of its own with no
                    // choices (as OpenAI's `stream_options.include_usage`), then the end
                    // marker.
                    let last = serde_json::json!({"id": rid, "object": chunk_object, "model": model,
                        "choices": [choice("", Some("length"))]});
                    let counts = if usage_streamed {
                        let counts = serde_json::json!({"id": rid, "object": chunk_object, "model": model,
                            "choices": [], "usage": usage(prompt, cached, output)});
                        format!("data: {counts}\n\n")
                    } else {
                        String::new()
                    };
                    return Ok(Frame::data(Bytes::from(format!(
                        "data: {last}\n\n{counts}data: [DONE]\n\n"
                    ))));
                }
            };
            Ok(Frame::data(Bytes::from(format!("data: {data}\n\n"))))
        });
        let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    let mut rx = rx;
    let mut text = String::new();
    while let Some(t) = rx.recv().await {
        match t {
            Tok::Token(tok) => text.push_str(&piece(tok)),
            Tok::Done {
                prompt,
                cached,
                output,
            } => {
                let message = if chat {
                    serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
                } else {
                    serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
                };
                return json(
                    StatusCode::OK,
                    &serde_json::json!({"id": rid, "object": object, "model": model, "choices": [message],
                        "usage": usage(prompt, cached, output)}),
                );
            }
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "request aborted (engine restarted)",
    )
}

/// `/metrics` in Prometheus text format, with vLLM's names and labels.
fn metrics(shared: &Shared) -> String {
    let s = shared.stats();
    let p = &shared.config.profile;
    let m = &shared.config.model;
    let mut out = String::new();
    // Text format 0.0.4, as Python's prometheus_client writes it: a counter's family is
    // named with its `_total` suffix.
    let mut metric = |name: &str, kind: &str, help: &str, labels: &str, value: String| {
        let name = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_owned()
        };
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        out.push_str(&format!("{name}{{model_name=\"{m}\"{labels}}} {value}\n"));
    };
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Requests in model execution batches.",
        "",
        s.running.to_string(),
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Requests waiting to be processed.",
        "",
        s.waiting.to_string(),
    );
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        "",
        s.kv_usage.to_string(),
    );
    metric(
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage (name before vLLM 0.10).",
        "",
        s.kv_usage.to_string(),
    );
    metric(
        "vllm:prefix_cache_queries",
        "counter",
        "Prefix-cache queries, in tokens.",
        "",
        s.prefix_queries.to_string(),
    );
    metric(
        "vllm:prefix_cache_hits",
        "counter",
        "Prefix-cache hits, in tokens.",
        "",
        s.prefix_hits.to_string(),
    );
    metric(
        "vllm:prompt_tokens",
        "counter",
        "Prefill tokens processed.",
        "",
        s.prompt_tokens.to_string(),
    );
    metric(
        "vllm:generation_tokens",
        "counter",
        "Generation tokens processed.",
        "",
        s.generation_tokens.to_string(),
    );
    metric(
        "vllm:request_success",
        "counter",
        "Successfully processed requests.",
        ",finished_reason=\"length\"",
        s.finished.to_string(),
    );
    metric(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig.",
        &format!(
            ",block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"True\"",
            p.block_size, p.kv_blocks
        ),
        "1".into(),
    );
    // A histogram, as vLLM observes each finished request's prompt length.
    let name = "vllm:request_prompt_tokens";
    out.push_str(&format!(
        "# HELP {name} Number of prefill tokens processed.\n# TYPE {name} histogram\n"
    ));
    let mut below = 0;
    for (i, n) in s.prompt_buckets.iter().enumerate() {
        below += n;
        let le = PROMPT_BUCKETS
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |b| format!("{b}.0"));
        out.push_str(&format!(
            "{name}_bucket{{le=\"{le}\",model_name=\"{m}\"}} {below}\n"
        ));
    }
    out.push_str(&format!(
        "{name}_count{{model_name=\"{m}\"}} {below}\n{name}_sum{{model_name=\"{m}\"}} {}\n",
        s.finished_prompt_tokens
    ));
    if p.max_loras > 0 {
        // Served only with LoRA enabled, as vLLM registers it; every series it holds, the
        // value the time it was last set (the newest says what is loaded now). Before the
        // first step, one series says nothing runs or waits.
        let name = "vllm:lora_requests_info";
        out.push_str(&format!(
            "# HELP {name} Running stats on LoRA requests.\n# TYPE {name} gauge\n"
        ));
        let series = shared.lora.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = (String::new(), String::new(), 0.0);
        let rows = series.0.iter().chain(series.0.is_empty().then_some(&idle));
        for (running, waiting, at) in rows {
            out.push_str(&format!(
                "{name}{{max_lora=\"{}\",running_lora_adapters=\"{running}\",waiting_lora_adapters=\"{waiting}\"}} {at}\n",
                p.max_loras
            ));
        }
    }
    out
}
