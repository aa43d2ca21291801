//! kvroute's `prefix-replication-filter`: copies a popular prefix to one more pod while
//! every prefix asked for recently fits the pods with room to spare.
//!
//! Prefix affinity keeps each shared prompt (a tenant's system prompt, a document many
//! questions are asked about) on the pod that first computed it, and every later request for
//! it goes there: one that arrives while another's prefill runs there waits for it. When
//! every pod could hold every shared prompt, round-robin, blind to caches, ends up with each
//! on every pod and then spreads freely, and in a long run it beats affinity at every
//! percentile (docs/benchmarks.md, "Copying popular prefixes"). A greedy router never copies
//! (one miss now always costs more than one wait), so this filter plans for the requests to
//! come: when a prefix has been asked for often and for a while, each pod holding it has
//! prefill queued, another has none, and the prefixes asked for recently would still fit in
//! a share of the smallest pod's KV cache with one more copy each, it keeps only the idle
//! pods that lack the prefix. That request pays one miss; later ones have two places to go.
//! Bursts of siblings (a prefix seconds old), conversations (a prefix asked for once, by the
//! next turn) and tenants whose prompts fill the caches are never copied. The misses land in
//! a run's first minutes: a short benchmark's p99 pays for what a long run's p90 gains.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvroute_core::BYTES_PER_TOKEN;

use crate::{Candidates, CycleState, Decision, Filter, Plugin, SchedulingRequest};

/// Slots of the popularity table, direct-mapped by a prefix's last block hash.
const SLOTS: usize = 4096;

/// Fewest cached tokens that make a prefix worth copying: below it a wait costs little.
const MIN_PREFIX_TOKENS: u64 = 512;

/// A prefix whose decayed count is at least this was asked for recently (once within a
/// half-life, or more often before): it is part of what the pods are asked to hold.
const RECENT: f64 = 0.5;

/// How often the recent prefixes' total size is summed again.
const RESUM_EVERY: Duration = Duration::from_secs(1);

/// One prefix's recent popularity.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: u64,
    /// Requests that matched it, each halved every half-life since.
    count: f64,
    updated: Instant,
    first: Instant,
    /// Its length in tokens, as last matched.
    tokens: u64,
}

impl Entry {
    fn count_at(&self, now: Instant, half_life: Duration) -> f64 {
        let age = now.saturating_duration_since(self.updated).as_secs_f64();
        self.count * 0.5f64.powf(age / half_life.as_secs_f64())
    }
}

/// The popularity table and the recent prefixes' summed size.
#[derive(Debug)]
struct Popular {
    slots: Vec<Option<Entry>>,
    working_set: u64,
    summed: Option<Instant>,
}

/// When to copy a prefix (`prefix-replication-filter`'s parameters).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ReplicationPolicy {
    /// Requests (halved every `half_life`) that make a prefix popular.
    pub(crate) min_requests: f64,
    pub(crate) half_life: Duration,
    /// How long ago a prefix must first have been matched.
    pub(crate) min_age: Duration,
    /// Share of the smallest pod's KV cache the recent prefixes may take on average once
    /// copied.
    pub(crate) memory_share: f64,
    /// Pods a prefix is copied onto at most, counting the first.
    pub(crate) max_copies: u64,
}

/// The filter.
#[derive(Debug)]
pub(crate) struct PrefixReplication {
    policy: ReplicationPolicy,
    popular: Mutex<Popular>,
}

/// A request's longest cached prefix: its key (the hash of its last block) and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Matched {
    key: u64,
    tokens: u64,
}

/// The longest prefix any producer found cached anywhere in the cycle, if long enough.
fn matched(state: &CycleState) -> Option<Matched> {
    state
        .prefixes()
        .filter_map(|info| {
            let blocks = info.matches.iter().map(|m| m.blocks).max()? as usize;
            let key = info.blocks.get(blocks.checked_sub(1)?)?.0;
            let tokens = info.cached_tokens.iter().copied().max()?;
            Some(Matched { key, tokens })
        })
        .max_by_key(|m| m.tokens)
        .filter(|m| m.tokens >= MIN_PREFIX_TOKENS)
}

impl PrefixReplication {
    /// A filter copying prefixes as `policy` says.
    pub(crate) fn new(policy: ReplicationPolicy) -> Self {
        Self {
            policy,
            popular: Mutex::new(Popular {
                slots: vec![None; SLOTS],
                working_set: 0,
                summed: None,
            }),
        }
    }

    fn slot(key: u64) -> usize {
        // The keys are hashes already.
        (key % SLOTS as u64) as usize
    }

    /// The recent prefixes' total size if `m` is popular enough to copy at `now`.
    fn popular(&self, m: Matched, now: Instant) -> Option<u64> {
        let popular = self.popular.lock().unwrap_or_else(PoisonError::into_inner);
        let e = popular.slots[Self::slot(m.key)].filter(|e| e.key == m.key)?;
        (e.count_at(now, self.policy.half_life) >= self.policy.min_requests
            && now.saturating_duration_since(e.first) >= self.policy.min_age)
            .then_some(popular.working_set)
    }

    /// Whether `m`, held by `holders` of `pods` pods (the smallest caching `smallest`
    /// tokens), busy all, with `idle_others` idle pods lacking it, is to be copied at `now`.
    fn copies(
        &self,
        m: Matched,
        holders: u64,
        idle_others: usize,
        smallest: u64,
        pods: usize,
        now: Instant,
    ) -> bool {
        if holders == 0 || holders >= self.policy.max_copies || idle_others == 0 {
            return false;
        }
        let Some(working_set) = self.popular(m, now) else {
            return false;
        };
        // On average a pod would hold every recent prefix (holders + 1) / pods times over.
        let per_pod = working_set.max(m.tokens) as f64 * (holders + 1) as f64 / pods as f64;
        per_pod <= self.policy.memory_share * smallest as f64
    }

    /// Counts one more request for `m` at `now`.
    fn record(&self, m: Matched, now: Instant) {
        let half_life = self.policy.half_life;
        let mut popular = self.popular.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut popular.slots[Self::slot(m.key)];
        match slot {
            Some(e) if e.key == m.key => {
                e.count = e.count_at(now, half_life) + 1.0;
                e.updated = now;
                e.tokens = m.tokens;
            }
            // Another prefix's slot: it keeps it while asked for at least as often.
            Some(e) if e.count_at(now, half_life) >= 1.0 => {}
            _ => {
                *slot = Some(Entry {
                    key: m.key,
                    count: 1.0,
                    updated: now,
                    first: now,
                    tokens: m.tokens,
                });
            }
        }
        if popular
            .summed
            .is_none_or(|at| now.saturating_duration_since(at) >= RESUM_EVERY)
        {
            popular.working_set = popular
                .slots
                .iter()
                .flatten()
                .filter(|e| e.count_at(now, half_life) >= RECENT)
                .map(|e| e.tokens)
                .sum();
            popular.summed = Some(now);
        }
    }
}

impl Plugin for PrefixReplication {
    fn type_name(&self) -> &'static str {
        "prefix-replication-filter"
    }

    fn filter(&self) -> Option<&dyn Filter> {
        Some(self)
    }

    fn decided(&self, request: &SchedulingRequest<'_>, state: &CycleState, _: &Decision) {
        if let Some(m) = matched(state) {
            self.record(m, request.now());
        }
    }
}

impl Filter for PrefixReplication {
    fn filter(
        &self,
        request: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &Candidates<'_>,
        keep: &mut [bool],
    ) {
        let Some(m) = matched(state) else { return };
        let Some(prompt) = state.prompt_tokens(request) else {
            return;
        };
        // Holders: within half of the longest match, by any producer. `keep` is written in
        // the same pass as the copy's targets (idle pods without the prefix) and given back
        // whole if no copy is made, so each pod's queue is read once.
        let (mut holders, mut idle_others, mut smallest) = (0u64, 0usize, u64::MAX);
        for (i, (pos, ep)) in candidates.iter().enumerate() {
            // Without every pod's KV capacity there is no telling what fits. In tokens as
            // kvroute estimates a prompt's (at the pod's learnt bytes per token).
            let Some(capacity) = ep
                .kv_capacity_index_bytes()
                .map(|bytes| bytes / BYTES_PER_TOKEN as u64)
            else {
                keep.fill(true);
                return;
            };
            smallest = smallest.min(capacity);
            let idle = ep.prefill_backlog() == 0;
            let holds = 2 * state.cached_tokens(&[], pos, prompt) >= m.tokens;
            if holds && idle {
                keep.fill(true);
                return;
            }
            holders += u64::from(holds);
            keep[i] = !holds && idle;
            idle_others += usize::from(keep[i]);
        }
        if !self.copies(
            m,
            holders,
            idle_others,
            smallest,
            candidates.len(),
            request.now(),
        ) {
            keep.fill(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kvroute_core::{Prompt, RequestHints};

    use crate::test_util::{registry, request};
    use crate::{BuildContext, EndpointPickerConfig, SchedulingRequest};

    const CONFIG: &str = "
plugins:
- {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 16}}
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer}}
- type: prefix-replication-filter
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-replication-filter}
  - {pluginRef: prefix-cache-scorer}
  - {pluginRef: max-score-picker}
";

    /// A shared prompt asked for again and again goes to the pod holding it until it has
    /// been popular for `minAge`; then, while that pod has prefill queued and another none,
    /// one request is sent to an idle pod, and after that both hold it; a third copy is
    /// never made (`maxCopies` 2). Too little memory copies nothing.
    #[test]
    fn a_popular_prefix_is_copied_to_an_idle_pod_when_it_fits() {
        let run = |capacity: u64| {
            let reg = registry(3);
            let eps = reg.snapshot();
            for ep in eps.iter() {
                ep.set_kv_capacity_tokens(capacity);
            }
            let s = EndpointPickerConfig::load(CONFIG, &BuildContext::new(16)).unwrap();
            let hints = RequestHints::default();
            let system = "You answer questions about the shipping policy. ".repeat(200);
            let t0 = Instant::now();
            let mut picks = Vec::new();
            for i in 0..12u64 {
                let req = request(Prompt::Text(format!("{system} Question {i}?")));
                let at = t0 + Duration::from_millis(500 * i);
                let d = s
                    .schedule(&SchedulingRequest::new(Some(&req), &hints).at(at), &eps)
                    .unwrap();
                picks.push(d.primary().address().port());
                // The pod just chosen is busy prefilling when the next request comes.
                std::mem::forget(d.primary().acquire_with_prefill(100));
            }
            picks
        };
        let roomy = run(10_000_000);
        let first = roomy[0];
        let copied = roomy.iter().position(|&p| p != first).expect("copied once");
        // Popular (4 requests) and 2 s old: the fifth request (at 2 s) is the first that may.
        assert!(copied >= 4, "{roomy:?}");
        // Then both hold it, and with every holder busy the third pod still gets no copy.
        let second = roomy[copied];
        assert!(
            roomy.iter().all(|&p| p == first || p == second),
            "at most two copies: {roomy:?}"
        );
        // A cache too small for the prompt twice over: never copied.
        let tight = run(3_000);
        assert!(tight.iter().all(|&p| p == tight[0]), "{tight:?}");
    }

    /// Parameters are checked when the configuration is built.
    #[test]
    fn bad_parameters_are_refused_by_name() {
        for (params, what) in [
            ("{memoryShare: 0}", "memoryShare"),
            ("{memoryShare: 1.5}", "memoryShare"),
            ("{maxCopies: 1}", "maxCopies"),
            ("{minRequests: 0.5}", "minRequests"),
            ("{halfLife: 0s}", "halfLife"),
            ("{minAge: soon}", "minAge"),
        ] {
            let yaml =
                format!("plugins: [{{type: prefix-replication-filter, parameters: {params}}}]");
            let err = EndpointPickerConfig::load(&yaml, &BuildContext::new(16)).unwrap_err();
            assert!(err.to_string().contains(what), "{params}: {err}");
        }
        let yaml = "plugins: [{type: prefix-replication-filter, parameters: {minRequests: 2, halfLife: 30s, minAge: 0s, memoryShare: 1, maxCopies: 8}}]";
        EndpointPickerConfig::load(yaml, &BuildContext::new(16)).unwrap();
    }
}
