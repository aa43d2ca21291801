use kvroute_core::{BlockHash, ContentPart, MessageContent, Prompt};
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// Bytes of prompt text per approximate block: 16 tokens at ~4 bytes per token, the figures
/// the Gateway API Inference Extension's approximate prefix scorer uses (`blockSizeTokens`
/// 16 × 4 characters per token).
pub const DEFAULT_CHUNK_BYTES: usize = 64;
/// Blocks hashed at most per prompt: the Inference Extension's `maxPrefixBlocksToMatch`.
pub const DEFAULT_MAX_BLOCKS: usize = 256;

/// Separators that keep the text of different messages and fields from running together:
/// `["ab", "c"]` and `["a", "bc"]` must not hash alike.
const FIELD: u8 = 0x1f;
const RECORD: u8 = 0x1e;
const PART: u8 = 0x1d;

/// Chained hashes of fixed-size chunks of a prompt's text, for routing without a tokenizer.
/// The chain starts from the model and `cache_salt`, so different models or tenants never
/// share blocks.
#[derive(Clone, Debug)]
pub struct ApproxHasher {
    chunk_bytes: usize,
    max_blocks: usize,
}

impl Default for ApproxHasher {
    fn default() -> Self {
        Self::new(DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BLOCKS)
    }
}

impl ApproxHasher {
    /// Chunks of `chunk_bytes` (at least 1), at most `max_blocks` of them per prompt.
    pub fn new(chunk_bytes: usize, max_blocks: usize) -> Self {
        Self {
            chunk_bytes: chunk_bytes.max(1),
            max_blocks,
        }
    }

    /// Bytes of prompt text per block.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Appends the prompt's block hashes to `out`. The text is read where it lies: a chunk is
    /// copied only when it straddles two strings.
    pub fn hash_prompt(
        &self,
        model: &str,
        cache_salt: Option<&str>,
        prompt: &Prompt,
        out: &mut Vec<BlockHash>,
    ) {
        self.hash_prompt_with(model, cache_salt, prompt, &mut Vec::new(), out);
    }

    /// [`Self::hash_prompt`] with the caller's `scratch` bytes, so that a warm caller
    /// allocates nothing.
    pub fn hash_prompt_with(
        &self,
        model: &str,
        cache_salt: Option<&str>,
        prompt: &Prompt,
        scratch: &mut Vec<u8>,
        out: &mut Vec<BlockHash>,
    ) {
        // Streamed, so no key is built: the same bytes as one buffer would hash alike.
        let mut key = Xxh3::new();
        key.update(model.as_bytes());
        key.update(&[0]);
        if let Some(salt) = cache_salt {
            key.update(&[1]);
            key.update(salt.as_bytes());
        }
        scratch.clear();
        let mut chunker = Chunker {
            size: self.chunk_bytes,
            limit: out.len() + self.max_blocks,
            buf: scratch,
            parent: key.digest(),
            out,
        };
        match prompt {
            Prompt::Text(t) => chunker.feed(t.as_bytes()),
            Prompt::Texts(ts) => {
                for t in ts {
                    chunker.feed(t.as_bytes());
                    chunker.feed(&[RECORD]);
                }
            }
            Prompt::Tokens(ids) => chunker.feed_tokens(ids),
            Prompt::TokenBatches(batches) => {
                for ids in batches {
                    chunker.feed_tokens(ids);
                    chunker.feed(&[RECORD]);
                }
            }
            Prompt::Chat(messages) => {
                for m in messages {
                    chunker.feed(m.role.as_bytes());
                    chunker.feed(&[FIELD]);
                    match &m.content {
                        MessageContent::Empty => {}
                        MessageContent::Text(t) => chunker.feed(t.as_bytes()),
                        MessageContent::Parts(parts) => {
                            for p in parts {
                                match p {
                                    ContentPart::Text(t) => chunker.feed(t.as_bytes()),
                                    ContentPart::Other { kind } => {
                                        chunker.feed(&[PART]);
                                        chunker.feed(kind.as_bytes());
                                    }
                                }
                                chunker.feed(&[PART]);
                            }
                        }
                    }
                    chunker.feed(&[RECORD]);
                }
            }
        }
    }
}

struct Chunker<'a> {
    size: usize,
    limit: usize,
    buf: &'a mut Vec<u8>,
    parent: u64,
    out: &'a mut Vec<BlockHash>,
}

impl Chunker<'_> {
    /// Token ids as their little-endian bytes, stopping once the block limit is reached
    /// (a long prompt's tail is never looked at).
    fn feed_tokens(&mut self, ids: &[u32]) {
        // The ids' little-endian bytes, 256 ids at a time: the same byte stream as one id at
        // a time, without a call per id.
        let mut bytes = [0u8; 1024];
        for group in ids.chunks(256) {
            if self.out.len() >= self.limit {
                return;
            }
            for (dst, t) in bytes.chunks_exact_mut(4).zip(group) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            self.feed(&bytes[..group.len() * 4]);
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.out.len() < self.limit {
            if self.buf.is_empty() && bytes.len() >= self.size {
                let (chunk, rest) = bytes.split_at(self.size);
                self.emit(chunk);
                bytes = rest;
            } else {
                let take = (self.size - self.buf.len()).min(bytes.len());
                self.buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.buf.len() == self.size {
                    let chunk = std::mem::take(self.buf);
                    self.emit(&chunk);
                    *self.buf = chunk;
                    self.buf.clear();
                }
            }
        }
    }

    fn emit(&mut self, chunk: &[u8]) {
        self.parent = xxh3_64_with_seed(chunk, self.parent);
        self.out.push(BlockHash(self.parent));
    }
}

#[cfg(test)]
mod tests {
    use kvroute_core::ChatMessage;
    use proptest::prelude::*;

    use super::*;

    fn hash(h: &ApproxHasher, model: &str, salt: Option<&str>, p: &Prompt) -> Vec<BlockHash> {
        let mut out = Vec::new();
        h.hash_prompt(model, salt, p, &mut out);
        out
    }

    fn chat(msgs: &[(&str, &str)]) -> Prompt {
        Prompt::Chat(
            msgs.iter()
                .map(|(r, c)| ChatMessage::text(*r, *c))
                .collect(),
        )
    }

    #[test]
    fn only_full_chunks_up_to_the_limit() {
        let h = ApproxHasher::new(4, 3);
        assert!(hash(&h, "m", None, &Prompt::Text("abc".into())).is_empty());
        assert_eq!(
            hash(&h, "m", None, &Prompt::Text("abcdefgh".into())).len(),
            2
        );
        assert_eq!(hash(&h, "m", None, &Prompt::Text("x".repeat(100))).len(), 3);
    }

    #[test]
    fn model_and_salt_separate_chains() {
        let h = ApproxHasher::default();
        let p = Prompt::Text("x".repeat(200));
        let base = hash(&h, "m", None, &p);
        assert_ne!(base, hash(&h, "other", None, &p));
        assert_ne!(base, hash(&h, "m", Some("tenant"), &p));
        assert_eq!(base, hash(&h, "m", None, &p));
    }

    #[test]
    fn conversations_that_grow_share_their_history() {
        let h = ApproxHasher::new(16, 256);
        let system = "You are a helpful assistant who answers in detail. ".repeat(4);
        let turn1 = chat(&[("system", &system), ("user", "first question")]);
        let turn2 = chat(&[
            ("system", &system),
            ("user", "first question"),
            ("assistant", "first answer"),
            ("user", "second question"),
        ]);
        let a = hash(&h, "m", None, &turn1);
        let b = hash(&h, "m", None, &turn2);
        assert!(a.len() > 10);
        assert_eq!(
            a[..a.len()],
            b[..a.len()],
            "the first turn's full blocks recur"
        );
    }

    #[test]
    fn message_boundaries_matter() {
        let h = ApproxHasher::new(4, 256);
        let a = hash(
            &h,
            "m",
            None,
            &chat(&[("user", "abcdefgh"), ("user", "ijkl")]),
        );
        let b = hash(
            &h,
            "m",
            None,
            &chat(&[("user", "abcd"), ("user", "efghijkl")]),
        );
        assert_ne!(a, b);
    }

    proptest! {
        /// However a text is split across strings of a `Texts` prompt's single element, the
        /// Token ids are hashed as their bytes, however many at a time.
        #[test]
        fn token_ids_hash_as_their_bytes(ids in proptest::collection::vec(any::<u32>(), 0..700), size in 1usize..100) {
            let run = |by_id: bool| {
                let (mut out, mut buf) = (Vec::new(), Vec::new());
                let mut c = Chunker { size, limit: 1000, buf: &mut buf, parent: 7, out: &mut out };
                if by_id {
                    for t in &ids {
                        c.feed(&t.to_le_bytes());
                    }
                } else {
                    c.feed_tokens(&ids);
                }
                out
            };
            prop_assert_eq!(run(true), run(false));
        }

        /// chunking sees one byte stream: text hashed at once equals text hashed in pieces.
        #[test]
        fn chunking_is_independent_of_string_boundaries(text in "[a-z ]{0,300}", cut in 0usize..300) {
            let h = ApproxHasher::new(7, 1000);
            let cut = cut.min(text.len());
            let whole = hash(&h, "m", None, &Prompt::Text(text.clone()));
            let mut out = Vec::new();
            let mut buf = Vec::new();
            let mut chunker = Chunker { size: 7, limit: 1000, buf: &mut buf, parent: {
                let mut key = b"m".to_vec(); key.push(0); xxhash_rust::xxh3::xxh3_64(&key) }, out: &mut out };
            chunker.feed(&text.as_bytes()[..cut]);
            chunker.feed(&text.as_bytes()[cut..]);
            prop_assert_eq!(whole, out);
        }
    }
}
