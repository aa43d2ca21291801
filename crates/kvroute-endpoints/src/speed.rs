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
//!
//! The same ratio of sums learns how many prompt bytes a pod's tokenizer makes a token
//! (`PromptBytes`), from the token counts the pod's answers report.

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

/// Recent numerators and denominators, each decayed by [`DECAY`] per sample, and how many
/// samples there were (up to [`MIN_SAMPLES`]).
#[derive(Debug, Default)]
struct Sums {
    num: f64,
    den: f64,
    samples: u32,
}

/// A running ratio of sums (recent numerators over recent denominators): updated under a
/// lock once per sample, read without one (the last value, as an `f64`'s bits; 0 while
/// nothing has been learnt).
#[derive(Debug, Default)]
pub(crate) struct DecayedRatio {
    sums: Mutex<Sums>,
    value: AtomicU64,
}

impl DecayedRatio {
    /// The ratio, once [`MIN_SAMPLES`] samples have come.
    pub(crate) fn value(&self) -> Option<f64> {
        let v = f64::from_bits(self.value.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// One more sample of `num` over `den`.
    pub(crate) fn observe(&self, num: f64, den: f64) {
        // A poisoned lock only means another observer panicked mid-update of two floats;
        // they are still numbers.
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        sums.num = sums.num * DECAY + num;
        sums.den = sums.den * DECAY + den;
        sums.samples = (sums.samples + 1).min(MIN_SAMPLES);
        if sums.samples == MIN_SAMPLES {
            let v = sums.num / sums.den;
            if v.is_finite() && v > 0.0 {
                self.value.store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }
}

/// Microseconds per queued prompt token: a [`DecayedRatio`] of time over tokens.
#[derive(Debug, Default)]
pub(crate) struct PrefillSpeed(DecayedRatio);

impl PrefillSpeed {
    /// Microseconds a queued prompt token costs here, once learnt.
    pub(crate) fn us_per_token(&self) -> Option<f64> {
        self.0.value()
    }

    /// A request that had `tokens` prompt tokens to wait for (those queued ahead of it and
    /// its own uncached ones) got its first answer bytes `elapsed` after it was routed.
    /// Samples under [`MIN_SAMPLE_TOKENS`] are ignored.
    pub(crate) fn observe(&self, tokens: u64, elapsed: Duration) {
        if tokens >= MIN_SAMPLE_TOKENS {
            self.0.observe(elapsed.as_secs_f64() * 1e6, tokens as f64);
        }
    }
}

/// Fewest tokens a prompt must have for its usage to teach [`PromptBytes`]: a short prompt's
/// count is mostly its chat template's tokens.
const MIN_PROMPT_TOKENS: u64 = 64;

/// Bytes a token can plausibly stand for; a sample outside is a pod's miscount (or a
/// hostile peer's), not a tokenizer.
const BYTES_PER_TOKEN_RANGE: std::ops::RangeInclusive<f64> = 0.5..=32.0;

/// Prompt bytes (as the approximate index reads a prompt, `Prompt::index_bytes`) per token
/// the pod counted: a [`DecayedRatio`] of bytes over the `prompt_tokens` its answers report.
/// A tokenizer turns text into tokens at its own rate (about 4 bytes a token for English
/// with Llama 3's, half that for some text), and the approximate index, which cuts text
/// into fixed byte chunks, needs it to know how many chunks a pod's KV cache holds. What
/// the index never reads but the pod caches (a chat template's tokens, tool definitions)
/// counts in the ratio too, as it should for that.
#[derive(Debug, Default)]
pub(crate) struct PromptBytes(DecayedRatio);

impl PromptBytes {
    /// Bytes per token, once learnt.
    pub(crate) fn per_token(&self) -> Option<f64> {
        self.0.value()
    }

    /// A prompt of `bytes` (`Prompt::index_bytes`) was `tokens` tokens, as the pod said.
    /// Short prompts and implausible ratios are ignored.
    pub(crate) fn observe(&self, bytes: u64, tokens: u64) {
        if tokens < MIN_PROMPT_TOKENS
            || !BYTES_PER_TOKEN_RANGE.contains(&(bytes as f64 / tokens as f64))
        {
            return;
        }
        self.0.observe(bytes as f64, tokens as f64);
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

    /// The bytes per token of the prompts a pod answered, once four long enough ones said;
    /// short prompts (mostly template) and implausible counts teach nothing.
    #[test]
    fn prompt_bytes_are_learnt_from_plausible_long_prompts() {
        let b = PromptBytes::default();
        for _ in 0..3 {
            b.observe(10_000, 4_000);
        }
        assert_eq!(b.per_token(), None, "three prompts say little");
        b.observe(10_000, 6_000);
        // (3 x 10,000 + 10,000) / (3 x 4,000 + 6,000), each older sample decayed.
        let v = b.per_token().unwrap();
        assert!((2.2..2.3).contains(&v), "{v}");
        let short = PromptBytes::default();
        let absurd = PromptBytes::default();
        for _ in 0..10 {
            short.observe(200, 50);
            absurd.observe(1_000_000, 100);
            absurd.observe(100, 1_000);
        }
        assert_eq!((short.per_token(), absurd.per_token()), (None, None));
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
