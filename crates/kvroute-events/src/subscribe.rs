//! One ZMQ SUB socket per endpoint, kept in sequence by a [`Follower`], started and stopped
//! as endpoints come and go in the registry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kvroute_core::EndpointId;
use kvroute_endpoints::{EndpointState, Registry};
use kvroute_index::{PrefixIndex, Shared};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::task::{Id as TaskId, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use crate::apply::Applied;
use crate::decode::{DEFAULT_MAX_BATCH_ENTRIES, DecodeError, sequence};
use crate::follow::{CatchUp, Follower, Order};
use crate::guard::{self, DEFAULT_MAX_FRAME_BYTES};

/// The replay socket's end-of-replay sequence number (-1 as 8 signed bytes).
const END_SEQ: u64 = u64::MAX;

/// How often the registry is read for endpoints that came or went.
const REGISTRY_POLL: Duration = Duration::from_millis(500);

/// Payload bytes one replay may bring back unless told otherwise: 256 MiB. vLLM buffers
/// its last 10,000 batches (`buffer_steps`), a few KiB each.
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 256 << 20;

/// Pause before reconnecting a stream that failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Where a pool's pods publish events, and how patiently to follow them.
#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    /// The PUB port on each pod (vLLM's default is 5557).
    pub port: u16,
    /// The replay ROUTER port on each pod, if the pods have one (`replay_endpoint`).
    pub replay_port: Option<u16>,
    /// Topic prefix to subscribe to (`""`: everything).
    pub topic: String,
    /// The pods' KV-cache block size, tokens.
    pub block_size: usize,
    /// An endpoint serving requests whose stream stays silent this long is marked
    /// unconfirmed and its stream reconnected (an idle pod publishes nothing, so silence
    /// alone proves nothing).
    pub silence: Duration,
    /// Longest wait for a replay to end.
    pub replay_timeout: Duration,
    /// How long after subscribing the replay socket is asked once more, for events
    /// published while the subscription was still reaching the publisher (ZMQ's "slow
    /// joiner"), unless a live message comes first.
    pub join_replay: Duration,
    /// ZMQ frames a pod announces above this length cut its connection (a hostile or broken
    /// peer could otherwise make kvroute reserve any amount of memory: `crate::guard`).
    pub max_frame: u64,
    /// Entries (events, block hashes, token ids) one batch may decode into; a batch over it
    /// is counted and the endpoint's entries dropped (`crate::decode_batch`).
    pub max_batch_entries: usize,
    /// Bytes of payload one replay may bring back; a replay sending more is abandoned and
    /// counted (the stream then resyncs as after a gap no replay filled).
    pub max_replay_bytes: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            port: 5557,
            replay_port: None,
            topic: String::new(),
            block_size: 16,
            silence: Duration::from_secs(10),
            replay_timeout: Duration::from_secs(2),
            join_replay: Duration::from_millis(500),
            max_frame: DEFAULT_MAX_FRAME_BYTES,
            max_batch_entries: DEFAULT_MAX_BATCH_ENTRIES,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
        }
    }
}

type Label = [(&'static str, &'static str); 1];

/// The subscribers' counters, registered under the caller's prefix (`kvroute_`).
#[derive(Clone, Debug, Default)]
pub struct EventMetrics {
    batches: Family<Label, Counter>,
    blocks: Family<Label, Counter>,
    resyncs: Family<Label, Counter>,
    silences: Counter,
    oversized: Counter,
    oversized_replays: Counter,
}

impl EventMetrics {
    /// Registers the counters.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kv_event_batches",
            "KV-event batches received, by outcome (applied, duplicate, malformed, oversized: over --kv-events-max-batch-entries)",
            m.batches.clone(),
        );
        registry.register(
            "kv_event_blocks",
            "Blocks in KV events, by what was done with them (stored, removed, orphaned, unknown_removed, rejected, skipped)",
            m.blocks.clone(),
        );
        registry.register(
            "kv_event_resyncs",
            "Times an endpoint's entries were dropped and rebuilt, by cause (gap, restart, oversized)",
            m.resyncs.clone(),
        );
        registry.register(
            "kv_event_silences",
            "Times an endpoint's stream said nothing while it served requests: unconfirmed, reconnected and caught up",
            m.silences.clone(),
        );
        registry.register(
            "kv_event_oversized_replays",
            "Replays abandoned because they brought back more than --kv-events-max-replay-bytes",
            m.oversized_replays.clone(),
        );
        registry.register(
            "kv_event_oversized_frames",
            "Connections to a pod's KV-event or replay socket cut because it announced a frame over --kv-events-max-frame-bytes",
            m.oversized.clone(),
        );
        m
    }

    fn batch(&self, outcome: &'static str) {
        self.batches.get_or_create(&[("outcome", outcome)]).inc();
    }

    fn resync(&self, cause: &'static str) {
        self.resyncs.get_or_create(&[("cause", cause)]).inc();
    }

    /// Counts one applied (or undecodable) batch.
    fn applied(&self, endpoint: &EndpointId, result: Result<(Applied, usize), DecodeError>) {
        match result {
            Ok((a, skipped)) => {
                self.batch("applied");
                for (op, n) in [
                    ("stored", a.stored),
                    ("removed", a.removed),
                    ("orphaned", a.orphaned),
                    ("unknown_removed", a.unknown_removed),
                    ("rejected", a.rejected),
                    ("skipped", skipped),
                ] {
                    if n > 0 {
                        self.blocks.get_or_create(&[("op", op)]).inc_by(n as u64);
                    }
                }
            }
            Err(e @ DecodeError::TooLarge(_)) => {
                self.batch("oversized");
                self.resync("oversized");
                warn!(endpoint = %endpoint, error = %e, "KV-event batch over the entry limit: entries dropped");
            }
            Err(e) => {
                self.batch("malformed");
                warn!(endpoint = %endpoint, error = %e, "skipping a malformed KV-event batch");
            }
        }
    }
}

/// Exports the precise index's size at scrape time.
#[derive(Debug)]
pub struct IndexCollector(pub Arc<Shared<PrefixIndex>>);

impl prometheus_client::collector::Collector for IndexCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let (blocks, entries) = {
            let index = self.0.read();
            (index.blocks(), index.entries())
        };
        for (name, help, value) in [
            (
                "kv_index_blocks",
                "Distinct KV blocks some endpoint holds, from KV events.",
                blocks,
            ),
            (
                "kv_index_entries",
                "(block, endpoint) pairs held, from KV events.",
                entries,
            ),
        ] {
            let metric = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

/// Follows the KV events of every endpoint in a registry, into one index.
#[derive(Debug)]
pub struct Subscriptions {
    config: Arc<SubscriberConfig>,
    index: Arc<Shared<PrefixIndex>>,
    metrics: EventMetrics,
}

impl Subscriptions {
    /// Subscriptions applying to `index`.
    pub fn new(
        config: SubscriberConfig,
        index: Arc<Shared<PrefixIndex>>,
        metrics: EventMetrics,
    ) -> Self {
        Self {
            config: Arc::new(config),
            index,
            metrics,
        }
    }

    /// Keeps one subscriber per endpoint of `registry` until `stop`; on the way out stops
    /// them all and waits for them. An endpoint that leaves (or changes address) loses its
    /// subscriber and its entries.
    pub async fn run(self, registry: Arc<Registry>, stop: CancellationToken) {
        let mut running: HashMap<EndpointId, (Arc<EndpointState>, CancellationToken, TaskId)> =
            HashMap::new();
        // Followers told to stop whose task has not ended: on its way out each forgets its
        // endpoint's entries by id, so a follower for an endpoint of the same id (one that
        // left and came back between two polls) must not start before, or the old one's
        // removal would wipe what the new one rebuilt.
        let mut leaving: HashMap<TaskId, EndpointId> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut poll = tokio::time::interval(REGISTRY_POLL);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = poll.tick() => {}
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let task = match &joined {
                        Ok((task, ())) => *task,
                        Err(e) => e.id(),
                    };
                    if leaving.remove(&task).is_none() {
                        continue;
                    }
                }
            }
            let now = registry.snapshot();
            running.retain(|id, (state, token, task)| {
                let kept = now.iter().any(|e| Arc::ptr_eq(e, state));
                if !kept {
                    debug!(endpoint = %id, "endpoint left: unsubscribing");
                    token.cancel();
                    leaving.insert(*task, id.clone());
                }
                kept
            });
            for ep in now.iter() {
                if running.contains_key(ep.id()) || leaving.values().any(|id| id == ep.id()) {
                    continue;
                }
                let token = stop.child_token();
                let span = info_span!("kv_events", endpoint = %ep.id());
                let task = tasks
                    .spawn(
                        follow(
                            Arc::clone(ep),
                            Arc::clone(&self.config),
                            Arc::clone(&self.index),
                            self.metrics.clone(),
                            token.clone(),
                        )
                        .instrument(span),
                    )
                    .id();
                running.insert(ep.id().clone(), (Arc::clone(ep), token, task));
            }
        }
        for (_, (_, token, _)) in running {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Follows one endpoint until `stop`, then forgets its entries.
pub async fn follow(
    ep: Arc<EndpointState>,
    config: Arc<SubscriberConfig>,
    index: Arc<Shared<PrefixIndex>>,
    metrics: EventMetrics,
    stop: CancellationToken,
) {
    let ip = ep.address().ip();
    // A data-parallel rank publishes on the base ports plus its rank, replay included
    // (vLLM's `ZmqEventPublisher.offset_endpoint_port`).
    let rank = ep.endpoint().rank;
    let (Some(port), Some(replay_port)) = (
        config.port.checked_add(rank),
        config
            .replay_port
            .map_or(Some(None), |p| p.checked_add(rank).map(Some)),
    ) else {
        warn!(
            rank,
            "KV-event port plus data-parallel rank is past 65535: not following"
        );
        return;
    };
    // kvroute's sockets reach the pod through relays that check the frame lengths it
    // announces; they end with this task.
    let relays = stop.child_token();
    let _relays_end = relays.clone().drop_guard();
    let relay = async |port: u16| {
        let oversized = metrics.oversized.clone();
        guard::start(
            SocketAddr::new(ip, port),
            config.max_frame,
            move || {
                oversized.inc();
            },
            relays.clone(),
        )
        .await
        .map(|local| format!("tcp://{local}"))
    };
    let events_at = match relay(port).await {
        Ok(at) => at,
        Err(e) => {
            warn!(error = %e, "no local port for the KV-event relay: not following");
            return;
        }
    };
    let replay_at = match replay_port {
        Some(p) => match relay(p).await {
            Ok(at) => Some(at),
            Err(e) => {
                warn!(error = %e, "no local port for the replay relay: not following");
                return;
            }
        },
        None => None,
    };
    let mut follower = Follower::new(ep.id().clone(), config.block_size)
        .with_max_entries(config.max_batch_entries);
    let check_every = (config.silence / 4).max(Duration::from_millis(10));
    'connect: while !stop.is_cancelled() {
        ep.set_events_confirmed(false);
        let mut sub = zeromq::SubSocket::new();
        // The socket reconnects by itself when the pod goes away; kvroute must know, to
        // check on return that the publisher is the same process.
        let mut monitor = sub.monitor();
        let connected = tokio::select! {
            () = stop.cancelled() => break,
            c = sub.connect(&events_at) => c,
        };
        if let Err(e) = connected.and(sub.subscribe(&config.topic).await) {
            debug!(error = %e, at = %events_at, "KV-event connection failed; retrying");
            pause(&stop).await;
            continue;
        }
        info!(at = %SocketAddr::new(ip, port), relay = %events_at, "following KV events");
        // In sequence once a replay has caught up, or (without one) from the first live
        // message on.
        if let Some(at) = &replay_at
            && catch_up(&mut follower, at, &config, &index, &metrics, &stop).await
        {
            ep.set_events_confirmed(true);
        }
        let mut last = Instant::now();
        let mut check = tokio::time::interval(check_every);
        // An event published while the subscription was still on its way to the publisher
        // is in neither that replay nor the live stream, and an idle pod publishes nothing
        // after it that would reveal the gap: ask the replay socket once more when the
        // subscription has surely arrived, unless a live message came first (any gap then
        // shows in its sequence).
        let join = tokio::time::sleep(config.join_replay);
        tokio::pin!(join);
        let mut joined = replay_at.is_none();
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break 'connect,
                () = &mut join, if !joined => {
                    joined = true;
                    if let Some(at) = &replay_at
                        && catch_up(&mut follower, at, &config, &index, &metrics, &stop).await
                    {
                        ep.set_events_confirmed(true);
                    }
                    continue;
                }
                _ = check.tick() => {
                    if last.elapsed() > config.silence && ep.in_flight() > 0 {
                        warn!(silent_for = ?last.elapsed(), "KV events silent while serving: unconfirmed, reconnecting");
                        metrics.silences.inc();
                        continue 'connect;
                    }
                    continue;
                }
                event = monitor.next() => {
                    if matches!(event, None | Some(SocketEvent::Disconnected(_))) {
                        debug!("KV-event publisher disconnected; reconnecting");
                        pause(&stop).await;
                        continue 'connect;
                    }
                    continue;
                }
                m = sub.recv() => m,
            };
            let msg = match received {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "KV-event stream broke; reconnecting");
                    pause(&stop).await;
                    continue 'connect;
                }
            };
            last = Instant::now();
            joined = true;
            ep.set_events_confirmed(true);
            let frames = msg.into_vec();
            let [_topic, seq, payload] = frames.as_slice() else {
                metrics.batch("malformed");
                warn!(
                    frames = frames.len(),
                    "skipping a KV-event message without 3 frames"
                );
                continue;
            };
            let Ok(seq) = sequence(seq) else {
                metrics.batch("malformed");
                warn!("skipping a KV-event message with a short sequence frame");
                continue;
            };
            match follower.order(seq, payload) {
                Order::InOrder => {}
                Order::Duplicate => {
                    metrics.batch("duplicate");
                    continue;
                }
                Order::Restart => {
                    let forgotten = follower.resync_at(&index, seq);
                    metrics.resync("restart");
                    warn!(
                        seq,
                        forgotten, "KV-event publisher restarted: entries dropped"
                    );
                }
                Order::Gap(from) => {
                    if let Some(at) = &replay_at {
                        catch_up(&mut follower, at, &config, &index, &metrics, &stop).await;
                    }
                    match follower.order(seq, payload) {
                        Order::InOrder => {}
                        Order::Duplicate => {
                            metrics.batch("duplicate");
                            continue;
                        }
                        Order::Gap(_) | Order::Restart => {
                            let forgotten = follower.resync_at(&index, seq);
                            metrics.resync("gap");
                            warn!(
                                from,
                                to = seq,
                                forgotten,
                                replay = replay_at.is_some(),
                                "KV-event gap not filled: entries dropped"
                            );
                        }
                    }
                }
            }
            metrics.applied(ep.id(), follower.apply(&index, seq, payload));
        }
    }
    ep.set_events_confirmed(false);
    follower.remove(&index);
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(RECONNECT_PAUSE) => {}
    }
}

/// Asks the replay socket for everything from where the follower can check continuity,
/// and applies it. Returns whether the stream is in sequence now (a replay came back and
/// was applied, whatever it took).
async fn catch_up(
    follower: &mut Follower,
    at: &str,
    config: &SubscriberConfig,
    index: &Shared<PrefixIndex>,
    metrics: &EventMetrics,
    stop: &CancellationToken,
) -> bool {
    let from = follower.resume_from();
    let batches = tokio::select! {
        () = stop.cancelled() => return false,
        r = tokio::time::timeout(config.replay_timeout, replay(at, from, config.max_replay_bytes)) => r,
    };
    let batches = match batches {
        Ok(Ok(b)) => b,
        Ok(Err(e @ ReplayError::TooLarge(_))) => {
            metrics.oversized_replays.inc();
            warn!(error = %e, at, "KV-event replay abandoned");
            return false;
        }
        Ok(Err(e)) => {
            debug!(error = %e, at, "KV-event replay failed");
            return false;
        }
        Err(_) => {
            debug!(at, "KV-event replay timed out");
            return false;
        }
    };
    let endpoint = follower.endpoint().clone();
    match follower.catch_up(index, &batches, |r| metrics.applied(&endpoint, r)) {
        CatchUp::Synced | CatchUp::Empty => {
            debug!(from, batches = batches.len(), "KV events replayed");
        }
        CatchUp::Resynced(forgotten) => {
            metrics.resync("gap");
            warn!(
                from,
                forgotten, "KV-event replay could not be joined to what was known: entries dropped"
            );
        }
    }
    true
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Zmq(#[from] zeromq::ZmqError),
    #[error("malformed replay message of {0} frames")]
    Frames(usize),
    #[error(transparent)]
    Sequence(#[from] DecodeError),
    #[error("replay brought back more than {0} bytes")]
    TooLarge(usize),
}

/// vLLM's replay protocol from a DEALER: send `["", start_seq]`, read `(seq, payload)`
/// messages (with or without the topic frame newer releases add) until the end marker, at
/// most `max_bytes` of payload in all.
async fn replay(at: &str, from: u64, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>, ReplayError> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(at).await?;
    let request: ZmqMessage = vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&from.to_be_bytes()),
    ]
    .try_into()
    .map_err(|_| ReplayError::Frames(0))?;
    dealer.send(request).await?;
    let mut out = Vec::new();
    let mut held = 0usize;
    loop {
        let frames = dealer.recv().await?.into_vec();
        let body = match frames.split_first() {
            Some((delimiter, rest)) if delimiter.is_empty() => rest,
            _ => frames.as_slice(),
        };
        let (seq, payload) = match body {
            [_, seq, payload] | [seq, payload] => (sequence(seq)?, payload),
            other => return Err(ReplayError::Frames(other.len())),
        };
        if seq == END_SEQ {
            return Ok(out);
        }
        held = held.saturating_add(payload.len());
        if held > max_bytes {
            return Err(ReplayError::TooLarge(max_bytes));
        }
        out.push((seq, payload.to_vec()));
    }
}
