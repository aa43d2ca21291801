//! How fast an endpoint turns queued prompt tokens into a first token, learnt from the
//! requests kvroute routes there: each time a request's first answer bytes come back, the
//! time since it was routed over the prompt tokens that were queued ahead of it plus its
//! own uncached ones. The TTFT scorer ranks endpoints by predicted wait in tokens; with this
//! it ranks them in time, so a slower pod (an older GPU, a larger tensor-parallel split, a
//! busy decode batch) counts its queue for what it costs there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Fewest tokens a sample must cover to count: below it a request's time to first token is
/// mostly a step's fixed cost and the network, not prefill.
pub(crate) const MIN_SAMPLE_TOKENS: u64 = 512;

/// Weight of a new sample in the running estimate: about the last 20 count.
const ALPHA: f64 = 0.05;

/// A running estimate of microseconds per queued prompt token, lock-free (one atomic `f64`
/// updated by compare-and-swap), 0 while nothing has been learnt.
#[derive(Debug, Default)]
pub(crate) struct PrefillSpeed {
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
        let sample = elapsed.as_secs_f64() * 1e6 / tokens as f64;
        if !sample.is_finite() {
            return;
        }
        let mut current = self.us_per_token.load(Ordering::Relaxed);
        loop {
            let old = f64::from_bits(current);
            let new = if old > 0.0 {
                old + ALPHA * (sample - old)
            } else {
                sample
            };
            match self.us_per_token.compare_exchange_weak(
                current,
                new.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
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
        s.observe(1000, Duration::from_millis(40));
        assert!((s.us_per_token().unwrap() - 40.0).abs() < 1e-9);
        // The pod slows down to 80 µs a token: the estimate follows within ~60 samples.
        for _ in 0..60 {
            s.observe(2000, Duration::from_millis(160));
        }
        let v = s.us_per_token().unwrap();
        assert!((76.0..=80.0).contains(&v), "{v}");
    }

    proptest! {
        /// The estimate always lies within the samples seen.
        #[test]
        fn stays_within_the_samples(samples in proptest::collection::vec((512u64..100_000, 1u64..10_000_000), 1..50)) {
            let s = PrefillSpeed::default();
            let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
            for (tokens, us) in samples {
                s.observe(tokens, Duration::from_micros(us));
                let rate = us as f64 / tokens as f64;
                lo = lo.min(rate);
                hi = hi.max(rate);
                let v = s.us_per_token().unwrap();
                prop_assert!(v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9), "{} not in [{}, {}]", v, lo, hi);
            }
        }
    }
}
