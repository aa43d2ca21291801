//! Reads every endpoint's Prometheus `/metrics` on an interval into its [`EndpointState`].
//!
//! One task per endpoint, each with one kept-alive HTTP/1.1 connection that the task drives
//! itself (no connection task to leak); a supervisor loop starts a task for each endpoint
//! that appears and cancels the task of each that leaves. Every scrape is bounded by the
//! timeout and the body by a size cap, so a hung or hostile pod costs a connection and a
//! few MiB at most. A failed scrape (refused, timed out, not 200, too large, not a model
//! server's metrics) is a health failure; the last good scrape is kept and goes stale.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{ACCEPT, CONTENT_LENGTH, HOST, HeaderValue, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use kvroute_core::EndpointId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::load::{LoadError, PodLoad, parse_load};
use crate::{EndpointState, Registry};

/// A buffer grown past this by one large body is given back rather than kept per endpoint.
const RETAINED_BUFFER: usize = 64 << 10;

/// How and how often to scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct ScrapeConfig {
    /// Time between two scrapes of one endpoint (upstream `--refresh-metrics-interval`).
    pub interval: Duration,
    /// A scrape older than this is not read as the endpoint's load (upstream
    /// `--metrics-staleness-threshold`); the scheduler passes it to
    /// [`EndpointState::fresh_load`].
    pub staleness: Duration,
    /// Longest one scrape may take, connecting included.
    pub timeout: Duration,
    /// Port serving `/metrics`; `None`: the endpoint's own port.
    pub port: Option<u16>,
    /// Path of the metrics page.
    pub path: String,
    /// Largest body read; a larger one fails the scrape.
    pub max_body_bytes: usize,
    /// Block size the router hashes with; an endpoint reporting another is warned about
    /// (once per endpoint).
    pub expected_block_size: Option<u32>,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            staleness: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            port: None,
            path: "/metrics".into(),
            max_body_bytes: 4 << 20,
            expected_block_size: None,
        }
    }
}

/// Why a scrape configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeConfigError {
    /// A zero interval or timeout.
    #[error("scrape {0} must be more than zero")]
    Zero(&'static str),
    /// The path is not an absolute HTTP path.
    #[error("scrape path {0:?} is not an absolute path")]
    Path(String),
}

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No TCP connection.
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    /// HTTP failed (handshake, reset, malformed answer).
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// The server closed the connection before its answer ended.
    #[error("connection closed before the answer ended")]
    Closed,
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 200.
    #[error("answered {0}")]
    Status(StatusCode),
    /// A body over the cap (announced or sent).
    #[error("body over {0} bytes")]
    TooLarge(usize),
    /// A body that is not UTF-8.
    #[error("body is not UTF-8")]
    NotUtf8,
    /// A body that is not a model server's metrics.
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl ScrapeError {
    /// The `outcome` label of this failure.
    fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Http(_) | Self::Closed => "http",
            Self::Timeout(_) => "timeout",
            Self::Status(_) => "status",
            Self::TooLarge(_) => "too_large",
            Self::NotUtf8 | Self::Load(_) => "parse",
        }
    }
}

type Label = [(&'static str, &'static str); 1];

/// Counts scrapes by outcome, registered under the caller's prefix (`kvroute_`); the
/// per-endpoint series come from [`crate::LoadCollector`].
#[derive(Clone, Debug, Default)]
pub struct ScrapeMetrics {
    scrapes: Family<Label, Counter>,
}

impl ScrapeMetrics {
    /// Registers the counters.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "endpoint_scrapes",
            "Scrapes of endpoints' /metrics, by outcome (ok, connect, http, timeout, status, too_large, parse)",
            m.scrapes.clone(),
        );
        m
    }

    fn count(&self, outcome: &'static str) {
        self.scrapes.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Scrapes counted with `outcome` so far.
    pub fn scrapes(&self, outcome: &'static str) -> u64 {
        self.scrapes.get_or_create(&[("outcome", outcome)]).get()
    }
}

/// Scrapes every endpoint of a registry until cancelled.
#[derive(Debug)]
pub struct Scraper {
    config: ScrapeConfig,
    metrics: ScrapeMetrics,
}

/// What every endpoint task reads.
#[derive(Debug)]
struct Shared {
    config: ScrapeConfig,
    metrics: ScrapeMetrics,
    uri: Uri,
}

/// One followed endpoint.
struct Followed {
    state: Arc<EndpointState>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

type Conn = http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

/// A kept-alive connection and the future that drives it.
struct Link {
    sender: http1::SendRequest<Empty<Bytes>>,
    conn: Pin<Box<Conn>>,
    /// The driver returned: never poll it again.
    ended: bool,
}

impl ScrapeConfig {
    /// Checks what `Scraper::run` would otherwise refuse or clamp.
    pub fn validate(&self) -> Result<(), ScrapeConfigError> {
        if self.interval.is_zero() {
            return Err(ScrapeConfigError::Zero("interval"));
        }
        if self.timeout.is_zero() {
            return Err(ScrapeConfigError::Zero("timeout"));
        }
        self.uri().map(drop)
    }

    fn uri(&self) -> Result<Uri, ScrapeConfigError> {
        let bad = || ScrapeConfigError::Path(self.path.clone());
        if !self.path.starts_with('/') {
            return Err(bad());
        }
        self.path.parse().map_err(|_| bad())
    }
}

impl Scraper {
    /// A scraper with `config` (see [`ScrapeConfig::validate`]), counting into `metrics`.
    pub fn new(config: ScrapeConfig, metrics: ScrapeMetrics) -> Self {
        Self { config, metrics }
    }

    /// Every `interval`, makes sure each endpoint of `registry` has its scraping task and
    /// that endpoints gone have none; returns once `token` is cancelled and every task has
    /// stopped. Returns at once, with an error logged, if the config's path is unusable.
    pub async fn run(self, registry: Arc<Registry>, token: CancellationToken) {
        let uri = match self.config.uri() {
            Ok(uri) => uri,
            Err(e) => {
                error!(error = %e, "not scraping");
                return;
            }
        };
        let mut config = self.config;
        config.interval = config.interval.max(Duration::from_millis(1));
        config.timeout = config.timeout.max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            config,
            metrics: self.metrics,
            uri,
        });
        let mut followed: HashMap<EndpointId, Followed> = HashMap::new();
        let mut seen: Option<Arc<Vec<Arc<EndpointState>>>> = None;
        let mut tick = tokio::time::interval(shared.config.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            let snapshot = registry.snapshot();
            if seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &snapshot)) {
                continue;
            }
            reconcile(&mut followed, &snapshot, &shared, &token);
            seen = Some(snapshot);
        }
        for f in followed.into_values() {
            f.stop.cancel();
            if let Err(e) = f.task.await {
                warn!(error = %e, "scrape task failed");
            }
        }
    }
}

/// Follows the endpoints of `snapshot` (sorted by id) and only those.
fn reconcile(
    followed: &mut HashMap<EndpointId, Followed>,
    snapshot: &[Arc<EndpointState>],
    shared: &Arc<Shared>,
    token: &CancellationToken,
) {
    followed.retain(|id, f| {
        let listed = snapshot
            .binary_search_by(|e| e.id().cmp(id))
            .is_ok_and(|i| Arc::ptr_eq(&snapshot[i], &f.state));
        if !listed {
            // The task sees the cancellation at its next poll and drops its connection.
            f.stop.cancel();
        }
        listed
    });
    for ep in snapshot {
        if followed.contains_key(ep.id()) {
            continue;
        }
        let stop = token.child_token();
        let span = info_span!("scrape", endpoint = %ep.id());
        let task =
            tokio::spawn(follow(Arc::clone(ep), Arc::clone(shared), stop.clone()).instrument(span));
        followed.insert(
            ep.id().clone(),
            Followed {
                state: Arc::clone(ep),
                stop,
                task,
            },
        );
    }
}

/// Scrapes one endpoint every interval until `stop`.
async fn follow(ep: Arc<EndpointState>, shared: Arc<Shared>, stop: CancellationToken) {
    let config = &shared.config;
    let addr = match config.port {
        Some(port) => SocketAddr::new(ep.address().ip(), port),
        None => ep.address(),
    };
    let host =
        HeaderValue::try_from(addr.to_string()).unwrap_or(HeaderValue::from_static("localhost"));
    // Spread the endpoints over the interval rather than scraping them all at once.
    let period = u64::try_from(config.interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let phase = std::hash::RandomState::new().hash_one(ep.id()) % period;
    let start = tokio::time::Instant::now() + Duration::from_nanos(phase);
    let mut tick = tokio::time::interval_at(start, config.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut link: Option<Link> = None;
    let mut buf = Vec::new();
    let mut failing = false;
    let mut warned_block_size = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let once = scrape_once(&mut link, addr, &host, &shared, &mut buf);
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            r = tokio::time::timeout(config.timeout, once) => {
                r.unwrap_or(Err(ScrapeError::Timeout(config.timeout)))
            }
        };
        if buf.capacity() > RETAINED_BUFFER {
            buf = Vec::new();
        }
        let now = Instant::now();
        match result {
            Ok(load) => {
                shared.metrics.count("ok");
                if let (Some(want), Some(got)) = (config.expected_block_size, load.block_size)
                    && want != got
                    && !warned_block_size
                {
                    warned_block_size = true;
                    warn!(
                        expected = want,
                        reported = got,
                        "endpoint reports another KV block size than the router's; prefix matches will be off"
                    );
                }
                ep.record_scrape(load, now);
                if failing {
                    failing = false;
                    info!("scrapes succeed again");
                }
            }
            Err(e) => {
                link = None;
                shared.metrics.count(e.label());
                ep.record_scrape_error();
                if failing {
                    debug!(error = %e, "scrape failed");
                } else {
                    failing = true;
                    warn!(error = %e, "scrape failed; logged again at debug until one succeeds");
                }
            }
        }
    }
}

/// One scrape over the kept connection, or a new one; a kept connection that fails before
/// answering (the server closed it while idle) is retried once on a fresh one.
async fn scrape_once(
    link: &mut Option<Link>,
    addr: SocketAddr,
    host: &HeaderValue,
    shared: &Shared,
    buf: &mut Vec<u8>,
) -> Result<PodLoad, ScrapeError> {
    if link.as_mut().is_some_and(Link::ended) {
        *link = None;
    }
    let reused = link.is_some();
    let mut result = exchange(link, addr, host, shared, buf).await;
    if reused && matches!(result, Err(ScrapeError::Http(_) | ScrapeError::Closed)) {
        *link = None;
        result = exchange(link, addr, host, shared, buf).await;
    }
    result?;
    let text = std::str::from_utf8(buf).map_err(|_| ScrapeError::NotUtf8)?;
    Ok(parse_load(text)?)
}

impl Link {
    /// Whether the server closed the kept connection while it was idle (polls the driver
    /// once, without waiting, so that it reads a pending close).
    fn ended(&mut self) -> bool {
        if !self.ended && !self.sender.is_closed() {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            self.ended = self.conn.as_mut().poll(&mut cx).is_ready();
        }
        self.ended || self.sender.is_closed()
    }
}

/// Sends one GET and reads the body into `buf`, connecting first if need be.
async fn exchange(
    link: &mut Option<Link>,
    addr: SocketAddr,
    host: &HeaderValue,
    shared: &Shared,
    buf: &mut Vec<u8>,
) -> Result<(), ScrapeError> {
    let l = match link {
        Some(l) => l,
        None => {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(ScrapeError::Connect)?;
            stream.set_nodelay(true).map_err(ScrapeError::Connect)?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(ScrapeError::Http)?;
            link.insert(Link {
                sender,
                conn: Box::pin(conn),
                ended: false,
            })
        }
    };
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = shared.uri.clone();
    let headers = req.headers_mut();
    headers.insert(HOST, host.clone());
    headers.insert(ACCEPT, HeaderValue::from_static("text/plain;version=0.0.4"));
    headers.insert(USER_AGENT, HeaderValue::from_static("kvroute"));
    let max = shared.config.max_body_bytes;
    buf.clear();
    let Link {
        sender,
        conn,
        ended,
    } = l;
    let read = async {
        let resp = sender.send_request(req).await.map_err(ScrapeError::Http)?;
        if resp.status() != StatusCode::OK {
            return Err(ScrapeError::Status(resp.status()));
        }
        let announced = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > max as u64) {
            return Err(ScrapeError::TooLarge(max));
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ScrapeError::Http)?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(ScrapeError::TooLarge(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    let mut read = std::pin::pin!(read);
    // The connection makes progress only while polled: drive it beside the exchange. If it
    // ends first, the exchange still completes from what was buffered, or fails.
    let outcome = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if *ended {
            return Poll::Pending;
        }
        match conn.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                *ended = true;
                Poll::Ready(Err(ScrapeError::Closed))
            }
        }
    })
    .await;
    match outcome {
        // The connection ended; whatever the exchange got before that decides.
        Err(ScrapeError::Closed) => read.await,
        other => other,
    }
}

#[cfg(test)]
#[path = "scrape_tests.rs"]
mod tests;
