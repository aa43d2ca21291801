use std::collections::HashMap;
use std::sync::Arc;

use kvroute_core::{BlockHash, Prompt};
use kvroute_endpoints::EndpointState;
use kvroute_index::{EndpointMatch, PrefixIndex, Shared};
use kvroute_tokens::{BlockHasher, ExtraKeys, ModelTokenizer};

use crate::{SchedulingRequest, Scorer, candidate_index};

/// Settings of the precise prefix-cache scorer.
#[derive(Clone, Debug)]
pub struct PrecisePrefixConfig {
    /// Tokens per block: the pool's engine block size (vLLM's default is 16).
    pub block_size: usize,
    /// What a block held in each tier is worth (`[gpu, cpu, disk]`): a GPU hit costs nothing,
    /// a CPU hit a copy back, a disk hit a load.
    pub tier_weights: [f64; 3],
    /// Tokenizers for prompts sent as text or chat messages.
    pub tokenizers: Tokenizers,
}

impl Default for PrecisePrefixConfig {
    /// Blocks of 16 tokens; tiers weighted 1.0 / 0.8 / 0.5.
    fn default() -> Self {
        Self {
            block_size: 16,
            tier_weights: [1.0, 0.8, 0.5],
            tokenizers: Tokenizers::new(),
        }
    }
}

/// The tokenizers of the models served, by model name (as requests name them), and one for
/// any other name; and the LoRA adapters served, by name, with their base model.
#[derive(Debug, Default, Clone)]
pub struct Tokenizers {
    by_model: HashMap<String, Arc<ModelTokenizer>>,
    default: Option<Arc<ModelTokenizer>>,
    adapters: HashMap<String, String>,
}

impl Tokenizers {
    /// No tokenizers: only prompts sent as token ids are hashed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `model`'s tokenizer.
    pub fn insert(&mut self, model: impl Into<String>, tokenizer: Arc<ModelTokenizer>) {
        self.by_model.insert(model.into(), tokenizer);
    }

    /// The tokenizer for models not named otherwise.
    pub fn set_default(&mut self, tokenizer: Arc<ModelTokenizer>) {
        self.default = Some(tokenizer);
    }

    /// Declares `adapter` a LoRA adapter of `base`: requests naming it are tokenized as
    /// `base` and their blocks rooted at the adapter's name, as vLLM hashes them.
    pub fn insert_adapter(&mut self, adapter: impl Into<String>, base: impl Into<String>) {
        self.adapters.insert(adapter.into(), base.into());
    }

    /// `model`'s tokenizer.
    pub fn get(&self, model: &str) -> Option<&Arc<ModelTokenizer>> {
        let base = self.adapters.get(model).map_or(model, String::as_str);
        self.by_model.get(base).or(self.default.as_ref())
    }

    /// The LoRA adapter a request for `model` runs under, if `model` names one.
    pub fn lora<'m>(&self, model: &'m str) -> Option<&'m str> {
        self.adapters.contains_key(model).then_some(model)
    }

    /// Whether there is no tokenizer at all.
    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty() && self.default.is_none()
    }
}

/// Scores each endpoint by the longest prefix of the prompt's token blocks that its KV
/// cache really holds, as its KV events report (`precise-prefix-cache-scorer`): held blocks
/// weighted by tier, over the prompt's blocks. Prompts it cannot tokenize (no tokenizer for
/// the model, a template that refuses the messages, a batch), and endpoints
/// whose event stream is not confirmed in sequence (`EndpointState::events_confirmed`),
/// score nothing, so a profile's other scorers (the approximate one) decide for them.
#[derive(Debug)]
pub struct PrecisePrefixScorer {
    index: Arc<Shared<PrefixIndex>>,
    hasher: BlockHasher,
    weights: [f64; 3],
    tokenizers: Tokenizers,
}

impl PrecisePrefixScorer {
    /// A scorer reading `index`, which an event applier keeps up to date.
    pub fn new(index: Arc<Shared<PrefixIndex>>, config: &PrecisePrefixConfig) -> Self {
        Self {
            index,
            hasher: BlockHasher::new(config.block_size),
            weights: config.tier_weights,
            tokenizers: config.tokenizers.clone(),
        }
    }

    /// The index read.
    pub fn index(&self) -> &Arc<Shared<PrefixIndex>> {
        &self.index
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.hasher.block_size()
    }

    /// The prompt's token count and block hashes, as the engine's events would name them;
    /// `None` when the prompt cannot be tokenized here.
    pub(crate) fn blocks<'r>(
        &self,
        request: &'r SchedulingRequest<'_>,
    ) -> Option<(usize, &'r [BlockHash])> {
        let req = request.request?;
        let cached = request.token_blocks.get_or_init(|| {
            let owned;
            let tokens: &[u32] = match &req.prompt {
                Prompt::Tokens(tokens) => tokens,
                prompt => {
                    owned = self
                        .tokenizers
                        .get(&req.model)?
                        .encode_prompt(prompt, &req.chat)
                        .ok()?;
                    &owned
                }
            };
            let mut out = Vec::new();
            let extra = ExtraKeys {
                lora: self.tokenizers.lora(&req.model),
                cache_salt: req.cache_salt.as_deref(),
            };
            self.hasher.hash_tokens(tokens, &extra, &mut out);
            Some((tokens.len(), out))
        });
        cached.as_ref().map(|(n, blocks)| (*n, blocks.as_slice()))
    }

    /// What the index holds of the prompt's blocks (looked up once per request), with the
    /// prompt's block count.
    pub(crate) fn matches<'r>(
        &self,
        request: &'r SchedulingRequest<'_>,
    ) -> Option<(usize, &'r [EndpointMatch])> {
        let (_, blocks) = self.blocks(request).filter(|(_, b)| !b.is_empty())?;
        let matches = request
            .precise_matches
            .get_or_init(|| self.index.read().match_prefix(blocks));
        Some((blocks.len(), matches))
    }
}

impl Scorer for PrecisePrefixScorer {
    fn name(&self) -> &'static str {
        "precise-prefix-cache-scorer"
    }

    fn score(
        &self,
        request: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointState>],
        scores: &mut [f64],
    ) {
        let Some((total, matches)) = self.matches(request) else {
            return;
        };
        for m in matches {
            if let Some(i) = candidate_index(candidates, &m.endpoint)
                && candidates[i].events_confirmed()
            {
                let held: f64 = m
                    .per_tier
                    .iter()
                    .zip(&self.weights)
                    .map(|(&n, w)| f64::from(n) * w)
                    .sum();
                scores[i] = held / total as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
    use kvroute_index::Tier;

    use super::*;
    use crate::test_util::registry;

    fn request(tokens: Vec<u32>, salt: Option<&str>) -> InferenceRequest {
        InferenceRequest {
            api: ApiKind::Completions,
            model: "m".into(),
            prompt: Prompt::Tokens(tokens),
            cache_salt: salt.map(Into::into),
            stream: false,
            max_tokens: None,
            chat: Default::default(),
            hints: RequestHints::default(),
        }
    }

    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        BlockHasher::new(4).hash_tokens(tokens, &ExtraKeys::default(), &mut out);
        out
    }

    fn scores(
        scorer: &PrecisePrefixScorer,
        req: &InferenceRequest,
        eps: &[Arc<EndpointState>],
    ) -> Vec<f64> {
        let hints = RequestHints::default();
        let mut out = vec![0.0; eps.len()];
        scorer.score(&SchedulingRequest::new(Some(req), &hints), eps, &mut out);
        out
    }

    #[test]
    fn text_and_chat_prompts_are_tokenized_with_the_models_tokenizer() {
        let path = std::env::var("KVROUTE_TEST_TOKENIZER")
            .expect("KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json");
        let json = std::fs::read(&path).unwrap();
        let config =
            std::fs::read(std::path::Path::new(&path).with_file_name("tokenizer_config.json"))
                .unwrap();
        let qwen = Arc::new(ModelTokenizer::new(&json, Some(&config)).unwrap());
        let mut tokenizers = Tokenizers::new();
        tokenizers.insert("qwen", Arc::clone(&qwen));
        let config = PrecisePrefixConfig {
            block_size: 4,
            tokenizers,
            ..PrecisePrefixConfig::default()
        };
        let index = Arc::new(Shared::new(PrefixIndex::new()));
        let scorer = PrecisePrefixScorer::new(Arc::clone(&index), &config);
        let eps = registry(2).snapshot();
        eps.iter().for_each(|e| e.set_events_confirmed(true));
        let text = "The quick brown fox jumps over the lazy dog, again and again and again.";
        let mut req = request(Vec::new(), None);
        req.model = "qwen".into();
        req.prompt = Prompt::Text(text.into());
        // What the pod would report: the blocks of the tokens vLLM computes.
        let tokens = qwen.encode_prompt(&req.prompt, &req.chat).unwrap();
        assert!(tokens.len() >= 8);
        let mut held = Vec::new();
        BlockHasher::new(4).hash_tokens(&tokens, &ExtraKeys::default(), &mut held);
        index.write().store(eps[1].id(), &held, Tier::Gpu);
        assert_eq!(scores(&scorer, &req, &eps), [0.0, 1.0]);
        // A model without a tokenizer: no opinion.
        req.model = "other".into();
        assert_eq!(scores(&scorer, &req, &eps), [0.0, 0.0]);
        // A LoRA adapter of the model: tokenized as the base, its blocks rooted at the
        // adapter's name, as vLLM reports them (`lora_name`).
        let mut with_adapter = config.clone();
        with_adapter.tokenizers.insert_adapter("qwen-sql", "qwen");
        let scorer = PrecisePrefixScorer::new(Arc::clone(&index), &with_adapter);
        req.model = "qwen-sql".into();
        assert_eq!(
            scores(&scorer, &req, &eps),
            [0.0, 0.0],
            "base blocks do not serve it"
        );
        let mut lora_blocks = Vec::new();
        let lora = ExtraKeys {
            lora: Some("qwen-sql"),
            cache_salt: None,
        };
        BlockHasher::new(4).hash_tokens(&tokens, &lora, &mut lora_blocks);
        index.write().store(eps[0].id(), &lora_blocks, Tier::Gpu);
        assert_eq!(scores(&scorer, &req, &eps), [1.0, 0.0]);
    }

    #[test]
    fn longest_held_prefix_weighted_by_tier() {
        let index = Arc::new(Shared::new(PrefixIndex::new()));
        let eps = registry(3).snapshot();
        eps.iter().for_each(|e| e.set_events_confirmed(true));
        let tokens: Vec<u32> = (0..16).collect();
        let h = hashes(&tokens);
        {
            let mut w = index.write();
            w.store(eps[0].id(), &h[..2], Tier::Gpu);
            w.store(eps[1].id(), &h, Tier::Gpu);
            w.store(eps[2].id(), &h[..2], Tier::Cpu);
            // A block held beyond a gap does not count.
            w.store(eps[0].id(), &h[3..], Tier::Gpu);
        }
        let config = PrecisePrefixConfig {
            block_size: 4,
            ..PrecisePrefixConfig::default()
        };
        let scorer = PrecisePrefixScorer::new(Arc::clone(&index), &config);
        let s = scores(&scorer, &request(tokens.clone(), None), &eps);
        assert_eq!(s[0], 0.5);
        assert_eq!(s[1], 1.0);
        assert!((s[2] - 0.4).abs() < 1e-12, "{s:?}");
        // A salted request names other blocks: nothing held.
        assert_eq!(
            scores(&scorer, &request(tokens.clone(), Some("tenant")), &eps),
            [0.0; 3]
        );
        // An endpoint whose stream is broken: its entries are not trusted.
        eps[1].set_events_confirmed(false);
        assert_eq!(
            scores(&scorer, &request(tokens.clone(), None), &eps)[1],
            0.0
        );
        // Shorter than a block, or text: no opinion.
        assert_eq!(scores(&scorer, &request(vec![1, 2], None), &eps), [0.0; 3]);
    }
}
