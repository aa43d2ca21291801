use std::sync::Arc;

use kvroute_core::{ContentPart, MessageContent, Prompt};
use kvroute_endpoints::EndpointState;

use crate::{
    Decision, PrecisePrefixScorer, PrefixCacheScorer, SchedulingRequest, Scorer, candidate_index,
};

/// Bytes of text per token, for prompts kvroute cannot tokenize (the Inference Extension's
/// estimate).
const BYTES_PER_TOKEN: usize = 4;

/// Prefers the endpoint where this request would get its first token soonest: the prefill
/// queued there (tokens routed and not yet answered, `EndpointState::prefill_backlog`)
/// plus the part of this prompt it does not hold cached. Prefill dominates time to first
/// token, and both terms are in prompt tokens, so their sum ranks endpoints by predicted
/// TTFT. Scores are `best / predicted`, in (0, 1].
///
/// What an endpoint holds comes from the prefix scorers' indexes: the precise one where the
/// prompt is tokenized, the approximate one (at [`BYTES_PER_TOKEN`]) otherwise or where it
/// knows more (requests routed but not yet reported by events).
#[derive(Debug)]
pub struct TtftScorer {
    precise: Option<Arc<PrecisePrefixScorer>>,
    approx: Option<Arc<PrefixCacheScorer>>,
}

impl TtftScorer {
    /// A scorer reading the given prefix scorers' indexes (none: the prompt's length alone).
    pub fn new(
        precise: Option<Arc<PrecisePrefixScorer>>,
        approx: Option<Arc<PrefixCacheScorer>>,
    ) -> Self {
        Self { precise, approx }
    }

    /// The prompt's length in tokens and how many of them each candidate holds cached.
    fn cached(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
    ) -> Option<(u64, Vec<u64>)> {
        let req = request.request?;
        let mut cached = vec![0u64; candidates.len()];
        let mut prompt = None;
        if let Some(precise) = &self.precise
            && let Some((len, _)) = precise.blocks(request)
        {
            prompt = Some(len as u64);
            let bs = precise.block_size() as u64;
            for m in precise.matches(request).map_or(&[][..], |(_, m)| m) {
                if let Some(i) = candidate_index(candidates, &m.endpoint)
                    && candidates[i].events_confirmed()
                {
                    cached[i] = cached[i].max(u64::from(m.blocks) * bs);
                }
            }
        }
        if let Some(approx) = &self.approx
            && let Some((_, matches)) = approx.matches(request)
        {
            let per_block = (approx.chunk_bytes() / BYTES_PER_TOKEN).max(1) as u64;
            for m in matches {
                if let Some(i) = candidate_index(candidates, &m.endpoint) {
                    cached[i] = cached[i].max(u64::from(m.blocks) * per_block);
                }
            }
        }
        let prompt = prompt.unwrap_or_else(|| estimate_tokens(&req.prompt));
        // The last prompt token is always computed (vLLM never serves a whole prompt from
        // cache).
        let most = prompt.saturating_sub(1);
        cached.iter_mut().for_each(|c| *c = (*c).min(most));
        Some((prompt, cached))
    }
}

/// Tokens in a prompt kvroute has not tokenized, estimated from its text.
fn estimate_tokens(prompt: &Prompt) -> u64 {
    let bytes: usize = match prompt {
        Prompt::Text(t) => t.len(),
        Prompt::Texts(ts) => ts.iter().map(String::len).sum(),
        Prompt::Tokens(t) => return t.len() as u64,
        Prompt::TokenBatches(b) => return b.iter().map(Vec::len).sum::<usize>() as u64,
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| match &m.content {
                MessageContent::Empty => 0,
                MessageContent::Text(t) => t.len(),
                MessageContent::Parts(parts) => parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text(t) => t.len(),
                        ContentPart::Other { .. } => 0,
                    })
                    .sum(),
            })
            .sum(),
    };
    (bytes / BYTES_PER_TOKEN) as u64
}

impl Scorer for TtftScorer {
    fn name(&self) -> &'static str {
        "ttft-scorer"
    }

    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    ) {
        let Some((prompt, cached)) = self.cached(request, candidates) else {
            return;
        };
        // Plus one: an idle endpoint holding all but nothing still costs something, and no
        // prediction is zero.
        let predicted: Vec<f64> = candidates
            .iter()
            .zip(&cached)
            .map(|(c, &hit)| (c.prefill_backlog() + prompt - hit + 1) as f64)
            .collect();
        let best = predicted.iter().copied().fold(f64::INFINITY, f64::min);
        for (s, p) in scores.iter_mut().zip(&predicted) {
            *s = best / p;
        }
    }

    fn decided(&self, request: &SchedulingRequest<'_>, decision: &Decision) {
        let primary = std::slice::from_ref(decision.primary());
        if let Some((prompt, cached)) = self.cached(request, primary) {
            decision.set_prefill_tokens(prompt - cached[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
    use kvroute_index::{PrefixIndex, Shared, Tier};
    use kvroute_tokens::{BlockHasher, ExtraKeys};

    use super::*;
    use crate::PrecisePrefixConfig;
    use crate::test_util::registry;

    #[test]
    fn predicted_ttft_is_backlog_plus_uncached_prompt() {
        let index = Arc::new(Shared::new(PrefixIndex::new()));
        let config = PrecisePrefixConfig {
            block_size: 4,
            ..PrecisePrefixConfig::default()
        };
        let precise = Arc::new(PrecisePrefixScorer::new(Arc::clone(&index), &config));
        let scorer = TtftScorer::new(Some(precise), None);
        let eps = registry(3).snapshot();
        eps.iter().for_each(|e| e.set_events_confirmed(true));
        let tokens: Vec<u32> = (0..40).collect();
        let mut hashes = Vec::new();
        BlockHasher::new(4).hash_tokens(&tokens, &ExtraKeys::default(), &mut hashes);
        // Endpoint 0 holds 8 of 10 blocks (32 tokens) but has 100 tokens of prefill queued;
        // endpoint 1 holds nothing and is idle; endpoint 2 holds 4 blocks, 10 queued.
        index.write().store(eps[0].id(), &hashes[..8], Tier::Gpu);
        index.write().store(eps[2].id(), &hashes[..4], Tier::Gpu);
        let _busy = eps[0].acquire_with_prefill(100);
        let _some = eps[2].acquire_with_prefill(10);
        let req = InferenceRequest {
            api: ApiKind::Completions,
            model: "m".into(),
            prompt: Prompt::Tokens(tokens),
            cache_salt: None,
            stream: false,
            max_tokens: None,
            chat: Default::default(),
            hints: RequestHints::default(),
        };
        let hints = RequestHints::default();
        let sr = SchedulingRequest::new(Some(&req), &hints);
        let mut scores = vec![0.0; 3];
        scorer.score(&sr, &eps, &mut scores);
        // Predicted: 100 + 8 + 1 = 109, 0 + 40 + 1 = 41, 10 + 24 + 1 = 35.
        let expect = [35.0 / 109.0, 35.0 / 41.0, 1.0];
        for (s, e) in scores.iter().zip(expect) {
            assert!((s - e).abs() < 1e-12, "{scores:?}");
        }
        let decision = Decision::new(Arc::clone(&eps[2]), []);
        scorer.decided(&sr, &decision);
        assert_eq!(decision.prefill_tokens(), 24);
    }

    #[test]
    fn the_expected_prefill_is_what_was_uncached_before_the_decision_recorded_it() {
        let approx = Arc::new(PrefixCacheScorer::new(&crate::PrefixCacheConfig::default()));
        let profile = crate::Profile::new(
            vec![
                (Box::new(Arc::clone(&approx)), 1.0),
                (Box::new(TtftScorer::new(None, Some(approx))), 1.0),
            ],
            0,
        );
        let eps = registry(2).snapshot();
        let req = InferenceRequest {
            api: ApiKind::Completions,
            model: "m".into(),
            prompt: Prompt::Text("x".repeat(4000)),
            cache_salt: None,
            stream: false,
            max_tokens: None,
            chat: Default::default(),
            hints: RequestHints::default(),
        };
        let hints = RequestHints::default();
        let sr = SchedulingRequest::new(Some(&req), &hints);
        let decision = crate::Scheduler::schedule(&profile, &sr, &eps).unwrap();
        // Nothing was cached: all 1,000 estimated tokens are to compute, though the
        // approximate scorer has recorded the prompt against the primary by now.
        assert_eq!(decision.prefill_tokens(), 1000);
    }

    #[test]
    fn text_prompts_are_estimated_from_their_length() {
        assert_eq!(estimate_tokens(&Prompt::Text("x".repeat(400))), 100);
        assert_eq!(estimate_tokens(&Prompt::Tokens(vec![1, 2, 3])), 3);
    }
}
