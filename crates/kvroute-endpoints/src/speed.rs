//! How fast an endpoint turns queued prompt tokens into a first token, learnt from the
//! requests kvroute routes there: each time a request's first answer bytes come back, the
//! time since it was routed and the prompt tokens that were queued ahead of it plus its own
//! uncached ones. The TTFT scorer ranks endpoints by predicted wait in tokens; with this
//! it ranks them in time, so a slower pod (an older GPU, a larger tensor-parallel split)
//! counts its queue for what it costs there.
//!
//! The estimate is a ratio of sums, recent time over recent tokens, not a mean of each
//! request's time per token: a request's time to first token has a part that does not grow
//! with its tokens (a step's fixed cost, decode steps interleaved, the network), which makes
//! a short request's time per token several times a long one's. A mean of ratios follows
//! the mix of short and long requests a pod happened to get, and on a pool of like pods it
//! told them apart by more than 1.5x; the ratio of sums is carried by the long requests,
//! where that fixed part is small (docs/benchmarks.md, "Learning each pod's speed").

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Fewest tokens a sample must cover to count: below it a request's time to first token is
/// mostly a step's fixed cost and the network, not prefill.
pub(crate) const MIN_SAMPLE_TOKENS: u64 = 512;

/// How much each older sample's weight decays per new one: about the last 100 count.
const DECAY: f64 = 0.99;

/// Samples before an estimate is given: one request says little of a pod.
const MIN_SAMPLES: u32 = 4;

/// Recent microseconds and tokens, each decayed by [`DECAY`] per sample, and how many
/// samples there were (up to [`MIN_SAMPLES`]).
#[derive(Debug, Default)]
struct Sums {
    us: f64,
    tokens: f64,
    samples: u32,
}

/// A running estimate of microseconds per queued prompt token: updated under a lock once per
/// request answered, read without one (the last estimate, as an `f64`'s bits; 0 while
/// nothing has been learnt).
#[derive(Debug, Default)]
pub(crate) struct PrefillSpeed {
    sums: Mutex<Sums>,
    us_per_token: AtomicU64,
}

impl PrefillSpeed {
    /// Microseconds a queued prompt token costs here, once learnt.
    pub(crate) fn us_per_token(&self) -> Option<f64> {
        let v = f64::from_bits(self.us_per_token.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// A request that had `tokens` prompt tokens to wait for (those queued ahead of it and
    /// its own uncached ones) got its first answer bytes `elapsed` after it was routed.
    /// Samples under [`MIN_SAMPLE_TOKENS`] are ignored.
    pub(crate) fn observe(&self, tokens: u64, elapsed: Duration) {
        if tokens < MIN_SAMPLE_TOKENS {
            return;
        }
        let us = elapsed.as_secs_f64() * 1e6;
        // A poisoned lock only means another observer panicked mid-update of two floats;
        // they are still numbers.
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        sums.us = sums.us * DECAY + us;
        sums.tokens = sums.tokens * DECAY + tokens as f64;
        sums.samples = (sums.samples + 1).min(MIN_SAMPLES);
        if sums.samples == MIN_SAMPLES {
            let v = sums.us / sums.tokens;
            if v.is_finite() && v > 0.0 {
                self.us_per_token.store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn learns_from_long_enough_samples_and_follows_a_change() {
        let s = PrefillSpeed::default();
        assert_eq!(s.us_per_token(), None);
        s.observe(100, Duration::from_secs(1));
        assert_eq!(s.us_per_token(), None, "too few tokens to count");
        for _ in 0..3 {
            s.observe(1000, Duration::from_millis(40));
        }
        assert_eq!(s.us_per_token(), None, "three samples say little of a pod");
        s.observe(1000, Duration::from_millis(40));
        assert!((s.us_per_token().unwrap() - 40.0).abs() < 1e-9);
        // The pod slows down to 80 µs a token: the estimate follows within ~300 samples.
        for _ in 0..300 {
            s.observe(2000, Duration::from_millis(160));
        }
        let v = s.us_per_token().unwrap();
        assert!((76.0..=80.0).contains(&v), "{v}");
    }

    /// Two like pods, each request's first token costing 100 ms plus 40 µs a token: one is
    /// sent only long prompts, the other as many short ones besides. A mean of each
    /// request's time per token would find the second pod 2.8x slower; the ratio of sums
    /// finds them within 1.5x of each other, the ttft scorer's threshold.
    #[test]
    fn a_fixed_cost_per_request_does_not_make_a_pod_with_short_requests_look_slow() {
        let cost = |tokens: u64| Duration::from_micros(100_000 + 40 * tokens);
        let (long_only, mixed) = (PrefillSpeed::default(), PrefillSpeed::default());
        for _ in 0..200 {
            long_only.observe(20_000, cost(20_000));
            mixed.observe(20_000, cost(20_000));
            mixed.observe(600, cost(600));
        }
        let (a, b) = (
            long_only.us_per_token().unwrap(),
            mixed.us_per_token().unwrap(),
        );
        assert!((44.0..46.0).contains(&a), "{a}");
        assert!(b / a < 1.5, "{b} against {a}");
    }

    proptest! {
        /// The estimate, once given (from the fourth sample on), always lies within the
        /// samples seen.
        #[test]
        fn stays_within_the_samples(samples in proptest::collection::vec((512u64..100_000, 1u64..10_000_000), 1..50)) {
            let s = PrefillSpeed::default();
            let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
            for (i, (tokens, us)) in samples.into_iter().enumerate() {
                s.observe(tokens, Duration::from_micros(us));
                let rate = us as f64 / tokens as f64;
                lo = lo.min(rate);
                hi = hi.max(rate);
                let Some(v) = s.us_per_token() else {
                    prop_assert!(i + 1 < MIN_SAMPLES as usize);
                    continue;
                };
                prop_assert!(v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9), "{} not in [{}, {}]", v, lo, hi);
            }
        }
    }
}
