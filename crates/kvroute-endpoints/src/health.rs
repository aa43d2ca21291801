//! Passive health, after Envoy's outlier detection: a pod that answers 500 in a millisecond
//! has nothing in flight and looks like the least loaded one, so failures must push it
//! down, then out, and a recovered pod must come back by itself.
//!
//! Failures are failed requests (a 5xx answer, a refused connection); scrapes count neither
//! way (see `EndpointState::record_scrape_error`). A success resets the count, and failures
//! older than `base_ejection` are forgotten, so an endpoint scored down until nothing was sent
//! to it comes back. With `n` consecutive failures and no ejection running the endpoint is
//! [`Health::Degraded`] with factor `1 / (n + 1)` (one failure halves its score, four leave
//! a fifth); at [`HealthConfig::consecutive_failures`] it is ejected for `base_ejection ×
//! 2^(k-1)` (capped at `max_ejection`), `k` counting the ejections since it last stayed
//! healthy for `max_ejection`. When that time is up it is back on probation: degraded as if
//! one failure short of the threshold, and ejected again (for twice as long) at its next
//! failure; its next success clears it. A success during an ejection resets the count but
//! does not end the ejection.
//!
//! State is six atomics; reads are four loads. Time is passed in, so tests use a fake
//! clock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Health as the scheduler should see it now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Health {
    /// No recent failure.
    Healthy,
    /// Recent failures: score multiplied by this factor in (0,1).
    Degraded(f64),
    /// Filtered out until its ejection time is up.
    Ejected,
}

/// How failures turn into ejections; the same for every endpoint of a registry (see
/// [`crate::Registry::with_health`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures that eject an endpoint (at least 1).
    pub consecutive_failures: u32,
    /// First ejection's length; each further one doubles it.
    pub base_ejection: Duration,
    /// Longest ejection; also how long an endpoint must stay healthy for the doubling to
    /// start over.
    pub max_ejection: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// One endpoint's failure record. Times are nanoseconds since `born`.
#[derive(Debug)]
pub(crate) struct HealthState {
    config: HealthConfig,
    born: Instant,
    failures: AtomicU32,
    /// When the last failure was recorded.
    last_failure: AtomicU64,
    /// End of the last ejection (0: never ejected).
    ejected_until: AtomicU64,
    /// Ejected and not yet cleared by a success after the ejection.
    probation: AtomicBool,
    /// Ejections since the endpoint last stayed healthy for `max_ejection`.
    streak: AtomicU32,
    ejections: AtomicU64,
}

impl HealthState {
    pub(crate) fn new(config: HealthConfig) -> Self {
        Self {
            config: HealthConfig {
                consecutive_failures: config.consecutive_failures.max(1),
                ..config
            },
            born: Instant::now(),
            failures: AtomicU32::new(0),
            last_failure: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            streak: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since `born`, at least 1 (0 means "never" in `ejected_until`).
    fn ns(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.born).as_nanos();
        u64::try_from(d).unwrap_or(u64::MAX).max(1)
    }

    pub(crate) fn health(&self, now: Instant) -> Health {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until != 0 && self.ns(now) < until {
            return Health::Ejected;
        }
        let threshold = self.config.consecutive_failures;
        let n = if self.probation.load(Ordering::Acquire) {
            threshold - 1
        } else {
            self.recent_failures(now).min(threshold - 1)
        };
        match n {
            0 => Health::Healthy,
            n => Health::Degraded(1.0 / (f64::from(n) + 1.0)),
        }
    }

    /// Failures since the last success, unless the last of them is older than a first
    /// ejection would last: forgotten, since an endpoint scored down until nothing is sent
    /// to it could not otherwise show it recovered. Without failures there is no clock to
    /// read (every candidate's health is read every decision).
    fn recent_failures(&self, now: Instant) -> u32 {
        let failures = self.failures.load(Ordering::Relaxed);
        if failures == 0 {
            return 0;
        }
        let forgotten = u64::try_from(self.config.base_ejection.as_nanos()).unwrap_or(u64::MAX);
        let since = self
            .ns(now)
            .saturating_sub(self.last_failure.load(Ordering::Relaxed));
        if since > forgotten { 0 } else { failures }
    }

    pub(crate) fn success(&self, now: Instant) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        let until = self.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return;
        }
        let t = self.ns(now);
        if t < until {
            return;
        }
        if self.probation.load(Ordering::Relaxed) {
            self.probation.store(false, Ordering::Release);
        }
        let forget = u64::try_from(self.config.max_ejection.as_nanos()).unwrap_or(u64::MAX);
        if t - until >= forget && self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn failure(&self, now: Instant) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n == u32::MAX {
            self.failures.store(u32::MAX - 1, Ordering::Relaxed);
        }
        let until = self.ejected_until.load(Ordering::Acquire);
        let t = self.ns(now);
        self.last_failure.fetch_max(t, Ordering::Relaxed);
        if until != 0 && t < until {
            return;
        }
        if !(self.probation.load(Ordering::Acquire) || n >= self.config.consecutive_failures) {
            return;
        }
        let k = self.streak.load(Ordering::Relaxed).saturating_add(1);
        let length = self
            .config
            .base_ejection
            .saturating_mul(2u32.saturating_pow(k - 1))
            .min(self.config.max_ejection);
        let length = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
        let new_until = t.saturating_add(length).max(t + 1);
        // One thread wins the transition; the others saw the same expired ejection.
        if self
            .ejected_until
            .compare_exchange(until, new_until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.streak.store(k, Ordering::Relaxed);
            self.probation.store(true, Ordering::Release);
            self.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Times ejected since the endpoint appeared.
    pub(crate) fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Consecutive failures now.
    pub(crate) fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
        }
    }

    #[test]
    fn default_is_documented() {
        let d = HealthConfig::default();
        assert_eq!(d.consecutive_failures, 5);
        assert_eq!(d.base_ejection, Duration::from_secs(10));
        assert_eq!(d.max_ejection, Duration::from_secs(300));
    }

    #[test]
    fn degrades_then_ejects_then_probation_then_recovers() {
        let h = HealthState::new(cfg());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        assert_eq!(h.health(t0), Health::Healthy);
        h.failure(at(0.0));
        assert_eq!(h.health(at(0.0)), Health::Degraded(0.5));
        h.failure(at(0.1));
        assert_eq!(h.health(at(0.1)), Health::Degraded(1.0 / 3.0));
        h.success(at(0.2));
        assert_eq!(
            h.health(at(0.2)),
            Health::Healthy,
            "a success resets the count"
        );
        h.failure(at(0.3));
        assert_eq!(h.health(at(10.2)), Health::Degraded(0.5));
        assert_eq!(
            h.health(at(10.4)),
            Health::Healthy,
            "a failure older than the first ejection's length is forgotten"
        );
        h.success(at(0.5));

        for i in 0..3 {
            h.failure(at(1.0 + f64::from(i) * 0.01));
        }
        assert_eq!(h.health(at(1.05)), Health::Ejected);
        assert_eq!(h.ejections(), 1);
        h.success(at(2.0));
        h.failure(at(3.0));
        h.failure(at(4.0));
        h.failure(at(5.0));
        assert_eq!(
            h.health(at(10.9)),
            Health::Ejected,
            "10 s, successes or not"
        );
        assert_eq!(h.ejections(), 1, "failures while ejected do not re-eject");

        // Time up: on probation, one strike from re-ejection.
        assert_eq!(h.health(at(11.1)), Health::Degraded(1.0 / 3.0));
        h.failure(at(11.2));
        assert_eq!(h.health(at(11.2)), Health::Ejected);
        assert_eq!(h.ejections(), 2);
        assert_eq!(h.health(at(31.1)), Health::Ejected, "second ejection: 20 s");
        assert_eq!(h.health(at(31.3)), Health::Degraded(1.0 / 3.0));
        h.failure(at(31.3));
        assert_eq!(
            h.health(at(56.2)),
            Health::Ejected,
            "third: 40 s capped at 25"
        );
        assert_eq!(h.health(at(56.4)), Health::Degraded(1.0 / 3.0));

        // A success after the ejection clears it.
        h.success(at(56.5));
        assert_eq!(h.health(at(56.5)), Health::Healthy);
        h.failure(at(57.0));
        assert_eq!(
            h.health(at(57.0)),
            Health::Degraded(0.5),
            "not one strike any more"
        );
        h.success(at(57.1));
        // The doubling is remembered until the endpoint stays healthy for max_ejection...
        for i in 0..3 {
            h.failure(at(60.0 + f64::from(i)));
        }
        assert_eq!(h.health(at(84.9)), Health::Ejected, "still capped at 25 s");
        assert_eq!(h.health(at(87.1)), Health::Degraded(1.0 / 3.0));
        // ...and forgotten after.
        h.success(at(113.0));
        h.success(at(200.0));
        for i in 0..3 {
            h.failure(at(300.0 + f64::from(i)));
        }
        assert_eq!(h.health(at(311.9)), Health::Ejected);
        assert_eq!(
            h.health(at(312.1)),
            Health::Degraded(1.0 / 3.0),
            "back to 10 s"
        );
        assert_eq!(h.ejections(), 5);
    }

    #[test]
    fn concurrent_failures_eject_once() {
        let h = std::sync::Arc::new(HealthState::new(cfg()));
        let now = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        h.failure(now);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().ok();
        }
        assert_eq!(h.ejections(), 1);
        assert_eq!(h.health(now), Health::Ejected);
    }

    #[test]
    fn threshold_of_zero_means_one() {
        let h = HealthState::new(HealthConfig {
            consecutive_failures: 0,
            ..cfg()
        });
        let now = Instant::now();
        h.failure(now);
        assert_eq!(h.health(now), Health::Ejected);
    }
}
