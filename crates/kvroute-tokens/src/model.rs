//! A model's own tokenization: its `tokenizer.json` (HF `tokenizers`) and the chat template
//! of its `tokenizer_config.json` (rendered with minijinja the way transformers'
//! `apply_chat_template` does), with a cache that makes a prompt extending a known one pay
//! only for its new text. Built from file contents; reading the files is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use aho_corasick::{AhoCorasick, MatchKind};
use kvroute_chat::ChatTemplate;
use kvroute_core::{ChatMessage, ChatOptions, Prompt};
use serde_json::Value as Json;
use xxhash_rust::xxh3::xxh3_64;

/// Why a model's tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// `tokenizer.json` did not load.
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    /// `tokenizer_config.json` is not the JSON expected.
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    /// The chat template did not compile or render (including its own
    /// `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// A chat request for a model without a chat template.
    #[error("the model has no chat template")]
    NoTemplate,
    /// The tokenizer failed on the text.
    #[error("tokenizing: {0}")]
    Encode(String),
    /// A prompt kvroute does not tokenize (a batch).
    #[error("batched prompts are not tokenized")]
    Batch,
}

/// Tokens each generation of the segment cache holds (16 MiB of ids); the cache keeps two.
const CACHE_TOKENS: usize = 4 << 20;

/// A model's tokenizer and chat template.
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    /// Special tokens, which the tokenizer never merges with their neighbours: text splits
    /// there into segments that tokenize independently.
    specials: Option<(AhoCorasick, Vec<u32>)>,
    /// What the tokenizer adds in front of a completion prompt (a BOS token, or nothing).
    prefix: Vec<u32>,
    cache: Mutex<SegmentCache>,
}

/// Token ids of text segments seen, by a hash of the text, in two generations: when the
/// current one is full it becomes the previous one (the older previous is dropped), and a
/// hit in the previous one moves back to the current. Segments in use survive; a burst of
/// new text evicts only what was not used since the last turnover.
#[derive(Default)]
struct SegmentCache {
    current: HashMap<u64, Arc<[u32]>>,
    previous: HashMap<u64, Arc<[u32]>>,
    tokens: usize,
}

impl SegmentCache {
    fn get(&mut self, key: u64) -> Option<Arc<[u32]>> {
        if let Some(hit) = self.current.get(&key) {
            return Some(Arc::clone(hit));
        }
        let hit = self.previous.remove(&key)?;
        self.insert(key, Arc::clone(&hit));
        Some(hit)
    }

    fn insert(&mut self, key: u64, ids: Arc<[u32]>) {
        if ids.len() > CACHE_TOKENS {
            return;
        }
        if self.tokens + ids.len() > CACHE_TOKENS {
            self.previous = std::mem::take(&mut self.current);
            self.tokens = 0;
        }
        let len = ids.len();
        if self.current.insert(key, ids).is_none() {
            self.tokens += len;
        }
    }
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.template.is_some())
            .field("segment_cache", &self.specials.is_some())
            .finish_non_exhaustive()
    }
}

impl ModelTokenizer {
    /// From the contents of `tokenizer.json` and, if there is one, `tokenizer_config.json`
    /// (chat template, special tokens).
    pub fn new(tokenizer_json: &[u8], config_json: Option<&[u8]>) -> Result<Self, TokensError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| TokensError::Tokenizer(e.to_string()))?;
        let config: Json = match config_json {
            Some(c) => serde_json::from_slice(c).map_err(|e| TokensError::Config(e.to_string()))?,
            None => Json::Null,
        };
        let template =
            ChatTemplate::from_config(&config).map_err(|e| TokensError::Template(e.0))?;
        let prefix = tokenizer
            .encode("", true)
            .map_err(|e| TokensError::Encode(e.to_string()))?
            .get_ids()
            .to_vec();
        let mut model = Self {
            tokenizer,
            template,
            specials: None,
            prefix,
            cache: Mutex::new(SegmentCache::default()),
        };
        model.enable_segment_cache();
        Ok(model)
    }

    /// Splits text at the special tokens if that gives exactly the tokenizer's own result on
    /// a probe (tokenizers that strip around, or normalise into, special tokens do not):
    /// otherwise the cache stays off and every prompt is tokenized whole.
    fn enable_segment_cache(&mut self) {
        let (texts, ids): (Vec<String>, Vec<u32>) = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .unzip();
        let Some(s) = texts.first() else {
            return;
        };
        let Ok(ac) = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
        else {
            return;
        };
        let probe = format!("Hello world{s}\n  indented text {s}{s}x\n\n{s} tail ");
        let whole = self.encode_plain(&probe);
        self.specials = Some((ac, ids));
        let split = self.encode_segments(&probe);
        if !matches!((&whole, &split), (Ok(w), Ok(s)) if w[..] == s[..]) {
            self.specials = None;
        }
        *self.lock() = SegmentCache::default();
    }

    /// The prompt's token ids as vLLM computes them: a completion's text with the
    /// tokenizer's special tokens added (`add_special_tokens=True`), token ids as given, a
    /// chat rendered by the model's template with the generation prompt and tokenized
    /// without adding any (the template writes them).
    pub fn encode_prompt(
        &self,
        prompt: &Prompt,
        chat: &ChatOptions,
    ) -> Result<Vec<u32>, TokensError> {
        match prompt {
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Text(text) => {
                let mut ids = self.prefix.clone();
                ids.extend(self.encode_segments(text)?);
                Ok(ids)
            }
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages, chat, true)?;
                self.encode_segments(&text)
            }
            Prompt::Texts(_) | Prompt::TokenBatches(_) => Err(TokensError::Batch),
        }
    }

    /// The model's chat template applied to `messages` (`kvroute_chat::ChatTemplate`).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        chat: &ChatOptions,
        add_generation_prompt: bool,
    ) -> Result<String, TokensError> {
        let template = self.template.as_ref().ok_or(TokensError::NoTemplate)?;
        template
            .render(messages, chat, add_generation_prompt)
            .map_err(|e| TokensError::Template(e.0))
    }

    /// `text` tokenized without added special tokens, through the segment cache.
    fn encode_segments(&self, text: &str) -> Result<Vec<u32>, TokensError> {
        let Some((ac, ids)) = &self.specials else {
            return self.encode_plain(text).map(|t| t.to_vec());
        };
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut at = 0;
        for m in ac.find_iter(text) {
            if m.start() > at {
                out.extend_from_slice(&self.encode_cached(&text[at..m.start()])?);
            }
            out.push(ids[m.pattern().as_usize()]);
            at = m.end();
        }
        if at < text.len() {
            out.extend_from_slice(&self.encode_cached(&text[at..])?);
        }
        Ok(out)
    }

    fn encode_cached(&self, segment: &str) -> Result<Arc<[u32]>, TokensError> {
        let key = xxh3_64(segment.as_bytes()) ^ (segment.len() as u64).rotate_left(32);
        if let Some(hit) = self.lock().get(key) {
            return Ok(hit);
        }
        let ids = self.encode_plain(segment)?;
        self.lock().insert(key, Arc::clone(&ids));
        Ok(ids)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentCache> {
        // A panic mid-insert leaves a usable map.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn encode_plain(&self, text: &str) -> Result<Arc<[u32]>, TokensError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| Arc::from(e.get_ids()))
            .map_err(|e| TokensError::Encode(e.to_string()))
    }

    /// The tokenizer alone, for comparison (benchmarks, tests): `text` tokenized in one go.
    pub fn encode_uncached(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokensError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokensError::Encode(e.to_string()))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn segments_in_use_survive_a_turnover() {
        let mut cache = SegmentCache::default();
        let ids = |n: usize| -> Arc<[u32]> { Arc::from(vec![7u32; n]) };
        let half = CACHE_TOKENS / 2;
        cache.insert(1, ids(half));
        cache.insert(2, ids(half));
        // Full: the next insert turns over; 1 and 2 move to the previous generation.
        cache.insert(3, ids(10));
        assert!(cache.current.contains_key(&3) && cache.previous.len() == 2);
        // 1 is used: back to the current generation. 2 is not.
        assert!(cache.get(1).is_some());
        cache.insert(4, ids(half));
        assert!(cache.get(1).is_some(), "in use since the last turnover");
        assert!(cache.get(2).is_none(), "unused since the last turnover");
        assert!(cache.tokens <= CACHE_TOKENS);
        // Too big to cache at all.
        cache.insert(5, ids(CACHE_TOKENS + 1));
        assert!(cache.get(5).is_none());
    }
}
