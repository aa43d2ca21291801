//! Admission: whether the pool can take more work, and the queue requests wait in when it
//! cannot. Upstream's `utilization-detector` (`UtilizationDetector`) and its flow-control
//! layer's priority bands (`FlowQueue`, limits from `flowControl`), as plain synchronous
//! logic: the ext_proc server owns the clock, the waiting and the answers.
//!
//! Saturation is upstream's roofline over the endpoints' scraped load: per endpoint
//! `max(waiting / queueDepthThreshold, kvUsage / kvCacheUtilThreshold)`, averaged over the
//! pool; an endpoint whose scrape is missing or older than `metricsStalenessThreshold`
//! counts 1.0, an empty pool counts 1.0. The queue term is corrected by this router's own
//! requests in flight that the last scrape does not show yet (upstream's scrape-lag credit),
//! so a burst between two scrapes is seen.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_endpoints::EndpointState;

/// Upstream's default `queueDepthThreshold`.
pub const DEFAULT_QUEUE_DEPTH_THRESHOLD: u32 = 5;
/// Upstream's default `kvCacheUtilThreshold`.
pub const DEFAULT_KV_CACHE_UTIL_THRESHOLD: f64 = 0.8;
/// Upstream's default `metricsStalenessThreshold`.
pub const DEFAULT_METRICS_STALENESS: Duration = Duration::from_millis(200);
/// Upstream's default `defaultRequestTTL` and `noEndpointRequestTTL`.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// Upstream's default `maxRequests` of a priority band.
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5_000;
/// Upstream's default `maxBytes` of a priority band (1G).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;

/// Whether the pool is saturated: upstream's `utilization-detector`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UtilizationDetector {
    queue_depth_threshold: u32,
    kv_cache_util_threshold: f64,
    staleness: Duration,
}

/// What the detector reads of one endpoint: its last fresh scrape (none when missing or
/// stale) and this router's requests in flight there.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// Scraped `(waiting, running, kv usage in 0..=1)`, if fresh.
    pub scraped: Option<(u32, u32, f64)>,
    /// Requests this router routed there whose response has not ended.
    pub in_flight: usize,
}

/// A detector parameter out of its range (upstream's validation).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DetectorError {
    /// `queueDepthThreshold` must be at least 1.
    #[error("queueDepthThreshold must be strictly positive, got {0}")]
    QueueDepth(i64),
    /// `kvCacheUtilThreshold` must be in (0, 1].
    #[error("kvCacheUtilThreshold must be in (0.0, 1.0], got {0}")]
    KvCache(f64),
    /// `metricsStalenessThreshold` must be positive.
    #[error("metricsStalenessThreshold must be strictly positive")]
    Staleness,
    /// `headroom` must not be negative.
    #[error("headroom must be a non-negative value, got {0}")]
    Headroom(f64),
}

impl Default for UtilizationDetector {
    /// Upstream's defaults: queue 5, KV 0.8, staleness 200 ms.
    fn default() -> Self {
        Self {
            queue_depth_threshold: DEFAULT_QUEUE_DEPTH_THRESHOLD,
            kv_cache_util_threshold: DEFAULT_KV_CACHE_UTIL_THRESHOLD,
            staleness: DEFAULT_METRICS_STALENESS,
        }
    }
}

impl UtilizationDetector {
    /// A detector with these thresholds, checked as upstream checks them.
    pub fn new(
        queue_depth_threshold: i64,
        kv_cache_util_threshold: f64,
        staleness: Duration,
    ) -> Result<Self, DetectorError> {
        let queue = u32::try_from(queue_depth_threshold)
            .ok()
            .filter(|&q| q > 0)
            .ok_or(DetectorError::QueueDepth(queue_depth_threshold))?;
        if !(kv_cache_util_threshold > 0.0 && kv_cache_util_threshold <= 1.0) {
            return Err(DetectorError::KvCache(kv_cache_util_threshold));
        }
        if staleness.is_zero() {
            return Err(DetectorError::Staleness);
        }
        Ok(Self {
            queue_depth_threshold: queue,
            kv_cache_util_threshold,
            staleness,
        })
    }

    /// How old a scrape may be and still count.
    pub fn staleness(&self) -> Duration {
        self.staleness
    }

    /// One endpoint's saturation: the larger of its queue and KV ratios, 1.0 without a fresh
    /// scrape. Requests this router has in flight there beyond what the scrape shows
    /// (waiting + running) count as waiting.
    pub fn endpoint_score(&self, sample: LoadSample) -> f64 {
        let Some((waiting, running, kv)) = sample.scraped else {
            return 1.0;
        };
        let shown = u64::from(waiting) + u64::from(running);
        let credit = (sample.in_flight as u64).saturating_sub(shown);
        let queue = (u64::from(waiting) + credit) as f64 / f64::from(self.queue_depth_threshold);
        // A KV usage that is not a number says nothing reassuring.
        let kv = if kv.is_nan() {
            1.0
        } else {
            kv.max(0.0) / self.kv_cache_util_threshold
        };
        queue.max(kv)
    }

    /// The pool's saturation: the mean of its endpoints' scores, plus `pending` requests
    /// admitted but not yet routed spread over them as waiting ones; 1.0 for no endpoint.
    /// At 1.0 or more the pool is saturated.
    pub fn saturation(&self, samples: impl IntoIterator<Item = LoadSample>, pending: usize) -> f64 {
        let (mut sum, mut n) = (0.0, 0usize);
        for s in samples {
            sum += self.endpoint_score(s);
            n += 1;
        }
        if n == 0 {
            return 1.0;
        }
        (sum + pending as f64 / f64::from(self.queue_depth_threshold)) / n as f64
    }

    /// [`Self::saturation`] of live endpoints at `now`.
    pub fn pool_saturation(
        &self,
        endpoints: &[Arc<EndpointState>],
        now: Instant,
        pending: usize,
    ) -> f64 {
        self.saturation(
            endpoints.iter().map(|e| LoadSample {
                scraped: e
                    .fresh_load(now, self.staleness)
                    .map(|l| (l.waiting, l.running, l.kv_usage)),
                in_flight: e.in_flight(),
            }),
            pending,
        )
    }
}

/// Checks upstream's `headroom`: it sets the per-endpoint limits of the detector's filter
/// role, which kvroute does not run (its scorers weigh each endpoint's load), so it is
/// validated and not kept.
pub fn check_headroom(headroom: f64) -> Result<(), DetectorError> {
    if headroom >= 0.0 && headroom.is_finite() {
        Ok(())
    } else {
        Err(DetectorError::Headroom(headroom))
    }
}

/// Limits of one priority band.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandLimits {
    /// Requests the band may hold.
    pub max_requests: u64,
    /// Bytes of request bodies the band may hold.
    pub max_bytes: u64,
}

impl Default for BandLimits {
    /// Upstream's defaults: 5,000 requests, 1G bytes.
    fn default() -> Self {
        Self {
            max_requests: DEFAULT_BAND_MAX_REQUESTS,
            max_bytes: DEFAULT_BAND_MAX_BYTES,
        }
    }
}

/// The flow-control layer's settings (`flowControl`, when the `flowControl` gate is on).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSettings {
    /// Requests all bands may hold together; `None`: no global limit.
    pub max_requests: Option<u64>,
    /// Bytes all bands may hold together; `None`: no global limit.
    pub max_bytes: Option<u64>,
    /// How long a request may wait while the pool has endpoints; `None` (`0s`): until the
    /// client goes.
    pub ttl: Option<Duration>,
    /// How long a request may wait while the pool has no endpoint; `None`: until one comes.
    pub no_endpoint_ttl: Option<Duration>,
    /// Bands configured by priority.
    pub bands: BTreeMap<i32, BandLimits>,
    /// Limits of a band not configured, priority 0 or more.
    pub default_band: BandLimits,
    /// Limits of a band not configured, priority below 0.
    pub negative_band: BandLimits,
}

impl Default for FlowSettings {
    /// Upstream's defaults: no global limits, 60 s TTLs, default bands.
    fn default() -> Self {
        Self {
            max_requests: None,
            max_bytes: None,
            ttl: Some(DEFAULT_REQUEST_TTL),
            no_endpoint_ttl: Some(DEFAULT_REQUEST_TTL),
            bands: BTreeMap::new(),
            default_band: BandLimits::default(),
            negative_band: BandLimits::default(),
        }
    }
}

impl FlowSettings {
    /// The limits of priority `priority`'s band.
    pub fn band(&self, priority: i32) -> BandLimits {
        match self.bands.get(&priority) {
            Some(b) => *b,
            None if priority < 0 => self.negative_band,
            None => self.default_band,
        }
    }
}

/// How requests are admitted: the detector, and with the `flowControl` gate the queue's
/// settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdmissionSettings {
    /// The saturation detector.
    pub detector: UtilizationDetector,
    /// `Some` with the `flowControl` gate: requests wait in priority bands instead of
    /// sheddable ones being refused.
    pub flow: Option<FlowSettings>,
}

/// Where a request waits: its band and its place there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    priority: i32,
    seq: u64,
}

impl Ticket {
    /// The request's priority.
    pub fn priority(&self) -> i32 {
        self.priority
    }
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    /// Its band holds `maxRequests` or `maxBytes` already.
    #[error("priority band {0} is full")]
    Band(i32),
    /// All bands together hold the global `maxRequests` or `maxBytes`.
    #[error("the flow-control queue is full")]
    Global,
}

#[derive(Debug)]
struct Waiting<T> {
    seq: u64,
    bytes: u64,
    enqueued: Instant,
    item: T,
}

#[derive(Debug)]
struct Band<T> {
    items: VecDeque<Waiting<T>>,
    bytes: u64,
}

/// Requests waiting in priority bands: the highest priority leaves first, first come first
/// served within a band (upstream's `global-strict-fairness-policy` and
/// `fcfs-ordering-policy`). Bounded per band and overall; a waiting request can leave at
/// any time (its client went away) by its [`Ticket`].
#[derive(Debug)]
pub struct FlowQueue<T> {
    /// Bands by priority; a band is removed when it empties.
    bands: BTreeMap<i32, Band<T>>,
    len: u64,
    bytes: u64,
    next_seq: u64,
}

impl<T> Default for FlowQueue<T> {
    fn default() -> Self {
        Self {
            bands: BTreeMap::new(),
            len: 0,
            bytes: 0,
            next_seq: 0,
        }
    }
}

impl<T> FlowQueue<T> {
    /// Queues `item` (a request of `bytes` bytes arriving at `now`) in priority `priority`'s
    /// band, unless that band or the whole queue is at its limits.
    pub fn push(
        &mut self,
        settings: &FlowSettings,
        priority: i32,
        bytes: u64,
        now: Instant,
        item: T,
    ) -> Result<Ticket, QueueFull> {
        let limits = settings.band(priority);
        let (band_len, band_bytes) = self
            .bands
            .get(&priority)
            .map_or((0, 0), |b| (b.items.len() as u64, b.bytes));
        if band_len >= limits.max_requests || band_bytes.saturating_add(bytes) > limits.max_bytes {
            return Err(QueueFull::Band(priority));
        }
        if settings.max_requests.is_some_and(|m| self.len >= m)
            || settings
                .max_bytes
                .is_some_and(|m| self.bytes.saturating_add(bytes) > m)
        {
            return Err(QueueFull::Global);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let band = self.bands.entry(priority).or_insert_with(|| Band {
            items: VecDeque::new(),
            bytes: 0,
        });
        band.items.push_back(Waiting {
            seq,
            bytes,
            enqueued: now,
            item,
        });
        band.bytes += bytes;
        self.len += 1;
        self.bytes += bytes;
        Ok(Ticket { priority, seq })
    }

    /// Takes the next request to dispatch: the oldest of the highest priority.
    pub fn pop(&mut self) -> Option<(Ticket, T)> {
        let mut entry = self.bands.last_entry()?;
        let priority = *entry.key();
        let band = entry.get_mut();
        let w = band.items.pop_front()?;
        band.bytes -= w.bytes;
        if band.items.is_empty() {
            entry.remove();
        }
        self.len -= 1;
        self.bytes -= w.bytes;
        Some((
            Ticket {
                priority,
                seq: w.seq,
            },
            w.item,
        ))
    }

    /// Takes the request `ticket` names out of the queue, if it is still there.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let band = self.bands.get_mut(&ticket.priority)?;
        // Sequence numbers grow in each band's order.
        let at = band
            .items
            .binary_search_by_key(&ticket.seq, |w| w.seq)
            .ok()?;
        let w = band.items.remove(at)?;
        band.bytes -= w.bytes;
        if band.items.is_empty() {
            self.bands.remove(&ticket.priority);
        }
        self.len -= 1;
        self.bytes -= w.bytes;
        Some(w.item)
    }

    /// Takes out every request `expired` says is out of time (given when it was queued),
    /// oldest first in each band. `expired` must be monotone in the queueing time (what
    /// expires, so does everything older), which every TTL rule is.
    pub fn expire(&mut self, mut expired: impl FnMut(Instant) -> bool) -> Vec<(Ticket, T)> {
        let mut out = Vec::new();
        let (len, bytes) = (&mut self.len, &mut self.bytes);
        self.bands.retain(|&priority, band| {
            while band.items.front().is_some_and(|w| expired(w.enqueued)) {
                if let Some(w) = band.items.pop_front() {
                    band.bytes -= w.bytes;
                    *len -= 1;
                    *bytes -= w.bytes;
                    out.push((
                        Ticket {
                            priority,
                            seq: w.seq,
                        },
                        w.item,
                    ));
                }
            }
            !band.items.is_empty()
        });
        out
    }

    /// When the longest-waiting request was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.bands
            .values()
            .filter_map(|b| b.items.front().map(|w| w.enqueued))
            .min()
    }

    /// Requests waiting.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the requests waiting.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Requests waiting per priority, highest first.
    pub fn band_lens(&self) -> impl Iterator<Item = (i32, usize)> + '_ {
        self.bands.iter().rev().map(|(&p, b)| (p, b.items.len()))
    }
}

#[cfg(test)]
mod tests;
