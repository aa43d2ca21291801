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
//! (`PromptBytes`), from the token counts the pod's answers report; where answers report
//! none, `CountedPromptBytes` learns it from the pod's own count of the prompts it finished.

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

/// The last value learnt, read without a lock: an `f64`'s bits, 0 while nothing has been
/// learnt.
#[derive(Debug, Default)]
struct Learnt(AtomicU64);

impl Learnt {
    fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.0.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

/// A running ratio of sums (recent numerators over recent denominators): updated under a
/// lock once per sample, read without one.
#[derive(Debug, Default)]
pub(crate) struct DecayedRatio {
    sums: Mutex<Sums>,
    value: Learnt,
}

impl DecayedRatio {
    /// The ratio, once [`MIN_SAMPLES`] samples have come.
    pub(crate) fn value(&self) -> Option<f64> {
        self.value.get()
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
                self.value.set(v);
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

/// A pod's totals of the prompts it finished (`vllm:request_prompt_tokens`: tokens and
/// requests) and this router's of the prompts it saw answered there (their bytes as the
/// index reads them, and how many), all read at one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PromptCounts {
    pub(crate) pod_tokens: f64,
    pub(crate) pod_requests: f64,
    pub(crate) own_bytes: u64,
    pub(crate) own_requests: u64,
}

/// What [`CountedPromptBytes`] keeps between scrapes: the last totals, the recent
/// increments (decayed by [`DECAY`] a request) and how many requests each side has counted
/// in all (up to the [`MIN_SAMPLES`] an estimate waits for).
#[derive(Debug, Default)]
struct Counted {
    last: Option<PromptCounts>,
    pod_tokens: f64,
    pod_requests: f64,
    own_bytes: f64,
    own_requests: f64,
    pod_seen: f64,
    own_seen: f64,
}

/// Prompt bytes per token from counts, for answers that carry no usage (a client that
/// streams without `stream_options.include_usage`): the mean bytes of the prompts this
/// router saw answered by a pod, over the mean tokens of the prompts the pod says it
/// finished, over the same recent stretch (the increments between scrapes, decayed a
/// request at a time).
///
/// A ratio of means, not of sums: with several replicas routing to a pod each sees only
/// its share of the pod's requests, but a random share of like traffic, so its mean prompt
/// is the pod's, and the pod's count need not match its own. With one router the two sets
/// are the same requests and the ratio of means is the ratio of sums the usage gives, up to
/// the requests a scrape catches on one side of the count and not yet on the other.
#[derive(Debug, Default)]
pub(crate) struct CountedPromptBytes {
    counted: Mutex<Counted>,
    value: Learnt,
}

impl CountedPromptBytes {
    /// Bytes per token, once both sides have counted [`MIN_SAMPLES`] requests of a mean
    /// long enough to say ([`MIN_PROMPT_TOKENS`]) and the ratio is plausible.
    pub(crate) fn per_token(&self) -> Option<f64> {
        self.value.get()
    }

    /// The totals at one more scrape. A pod whose count went down restarted: its next
    /// scrape's increments count, not this one's.
    pub(crate) fn observe(&self, now: PromptCounts) {
        let mut c = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let Some(last) = c.last.replace(now) else {
            return;
        };
        let pod_tokens = now.pod_tokens - last.pod_tokens;
        let pod_requests = now.pod_requests - last.pod_requests;
        let own_bytes = now.own_bytes.saturating_sub(last.own_bytes) as f64;
        let own_requests = now.own_requests.saturating_sub(last.own_requests) as f64;
        // Written to be false for NaN too.
        if !(pod_tokens >= 0.0 && pod_requests >= 0.0 && pod_tokens.is_finite()) {
            return;
        }
        let requests = pod_requests.max(own_requests);
        if requests == 0.0 {
            return;
        }
        let decay = DECAY.powf(requests);
        c.pod_tokens = c.pod_tokens * decay + pod_tokens;
        c.pod_requests = c.pod_requests * decay + pod_requests;
        c.own_bytes = c.own_bytes * decay + own_bytes;
        c.own_requests = c.own_requests * decay + own_requests;
        c.pod_seen = (c.pod_seen + pod_requests).min(f64::from(MIN_SAMPLES));
        c.own_seen = (c.own_seen + own_requests).min(f64::from(MIN_SAMPLES));
        if c.pod_seen.min(c.own_seen) < f64::from(MIN_SAMPLES)
            || c.pod_requests <= 0.0
            || c.own_requests <= 0.0
        {
            return;
        }
        let pod_mean = c.pod_tokens / c.pod_requests;
        let v = c.own_bytes / c.own_requests / pod_mean;
        if pod_mean >= MIN_PROMPT_TOKENS as f64 && BYTES_PER_TOKEN_RANGE.contains(&v) {
            self.value.set(v);
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

    /// Totals after `n` requests of `bytes` bytes and `tokens` tokens, all of them this
    /// router's.
    fn alone(n: u64, bytes: u64, tokens: u64) -> PromptCounts {
        PromptCounts {
            pod_tokens: (n * tokens) as f64,
            pod_requests: n as f64,
            own_bytes: n * bytes,
            own_requests: n,
        }
    }

    /// One router: the pod's count and the router's are the same requests, and the ratio is
    /// theirs once each side has counted four.
    #[test]
    fn counts_teach_bytes_per_token_without_usage() {
        let c = CountedPromptBytes::default();
        c.observe(alone(0, 0, 0));
        for n in 1..4 {
            c.observe(alone(n, 6_000, 2_000));
            assert_eq!(c.per_token(), None, "{n} requests say little");
        }
        c.observe(alone(4, 6_000, 2_000));
        let v = c.per_token().unwrap();
        assert!((v - 3.0).abs() < 1e-9, "{v}");
        // A scrape that sees nothing new changes nothing.
        c.observe(alone(4, 6_000, 2_000));
        assert_eq!(c.per_token(), Some(v));
    }

    /// Three replicas route to the pod; this one sees every third request, of the same
    /// kind of prompts (two sizes), and a request the pod counted a scrape before the router
    /// did. The ratio of means still comes to the tokenizer's 2 bytes a token.
    #[test]
    fn a_share_of_the_pods_requests_is_enough() {
        let c = CountedPromptBytes::default();
        let mut t = PromptCounts::default();
        for i in 0..600u64 {
            let tokens = if i % 2 == 0 { 1_000 } else { 9_000 };
            t.pod_tokens += tokens as f64;
            t.pod_requests += 1.0;
            // Every third request of each size is this router's, counted one scrape late.
            if (i / 2) % 3 == 0 {
                c.observe(t);
                t.own_bytes += 2 * tokens;
                t.own_requests += 1;
            }
            c.observe(t);
        }
        let v = c.per_token().unwrap();
        assert!((1.9..2.1).contains(&v), "{v}");
    }

    /// A restarted pod counts from zero: the scrape that sees the drop teaches nothing, the
    /// next ones go on from the new totals.
    #[test]
    fn a_restarted_pod_is_read_from_its_new_totals() {
        let c = CountedPromptBytes::default();
        for n in 0..=8 {
            c.observe(alone(n, 4_000, 1_000));
        }
        let before = c.per_token().unwrap();
        assert!((before - 4.0).abs() < 1e-9, "{before}");
        let mut restarted = alone(1, 4_000, 1_000);
        restarted.own_bytes = 9 * 4_000;
        restarted.own_requests = 9;
        c.observe(restarted);
        assert_eq!(c.per_token(), Some(before), "the drop teaches nothing");
        restarted.pod_tokens += 2_000.0;
        restarted.pod_requests += 1.0;
        restarted.own_bytes += 4_000;
        restarted.own_requests += 1;
        c.observe(restarted);
        let v = c.per_token().unwrap();
        assert!(
            v < 4.0 && v > 3.5,
            "one request at 2 bytes a token moves it: {v}"
        );
    }

    /// Short prompts (mostly template), an implausible ratio and a pod's nonsense totals
    /// teach nothing.
    #[test]
    fn counts_that_cannot_say_teach_nothing() {
        let short = CountedPromptBytes::default();
        let absurd = CountedPromptBytes::default();
        let broken = CountedPromptBytes::default();
        for n in 0..10 {
            short.observe(alone(n, 120, 40));
            absurd.observe(alone(n, 100, 1_000));
            broken.observe(PromptCounts {
                pod_tokens: if n % 2 == 0 { f64::NAN } else { -1.0 },
                ..alone(n, 4_000, 1_000)
            });
        }
        assert_eq!(
            (short.per_token(), absurd.per_token(), broken.per_token()),
            (None, None, None)
        );
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

        /// Whatever totals a pod reports, an estimate from counts is a plausible ratio or none.
        #[test]
        fn counts_give_a_plausible_ratio_or_none(
            scrapes in proptest::collection::vec(
                (prop_oneof![Just(f64::NAN), -1e3..1e12f64], prop_oneof![Just(f64::INFINITY), -5.0..1e6f64], 0u64..1 << 40, 0u64..1 << 20),
                1..40,
            )
        ) {
            let c = CountedPromptBytes::default();
            for (pod_tokens, pod_requests, own_bytes, own_requests) in scrapes {
                c.observe(PromptCounts { pod_tokens, pod_requests, own_bytes, own_requests });
                if let Some(v) = c.per_token() {
                    prop_assert!(BYTES_PER_TOKEN_RANGE.contains(&v), "{}", v);
                }
            }
        }
    }
}
