//! A model's own tokenization: its `tokenizer.json` (HF `tokenizers`) and the chat template
//! of its `tokenizer_config.json` (rendered with minijinja the way transformers'
//! `apply_chat_template` does), with a cache that makes a prompt extending a known one pay
//! only for its new text. Built from file contents; reading the files is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use aho_corasick::{AhoCorasick, MatchKind};
use kvroute_core::{ChatMessage, ChatOptions, ContentPart, MessageContent, Prompt};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
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
    template: Option<Environment<'static>>,
    context: HashMap<String, Json>,
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
        let mut context = HashMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            // A plain string, or a serialised AddedToken with its `content`.
            let value = match &config[key] {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
                _ => None,
            };
            if let Some(v) = value {
                context.insert(key.to_owned(), Json::String(v));
            }
        }
        let template = match &config["chat_template"] {
            Json::String(t) => Some(environment(t.clone())?),
            // A list of named templates: the one named "default".
            Json::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(|t| environment(t.to_owned()))
                .transpose()?,
            _ => None,
        };
        let prefix = tokenizer
            .encode("", true)
            .map_err(|e| TokensError::Encode(e.to_string()))?
            .get_ids()
            .to_vec();
        let mut model = Self {
            tokenizer,
            template,
            context,
            specials: None,
            prefix,
            cache: Mutex::new(SegmentCache::default()),
        };
        model.specials = model.special_splitter();
        Ok(model)
    }

    /// The special tokens to split at, if splitting there gives exactly the tokenizer's
    /// own result on a probe (tokenizers that strip around, or normalise into, special
    /// tokens do not): otherwise the cache is off and every prompt is tokenized whole.
    fn special_splitter(&self) -> Option<(AhoCorasick, Vec<u32>)> {
        let (texts, ids): (Vec<String>, Vec<u32>) = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .unzip();
        if texts.is_empty() {
            return None;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .ok()?;
        let s = &texts[0];
        let probe = format!("Hello world{s}\n  indented text {s}{s}x\n\n{s} tail ");
        let whole = self.tokenizer.encode(probe.as_str(), false).ok()?;
        let candidate = Self {
            tokenizer: self.tokenizer.clone(),
            template: None,
            context: HashMap::new(),
            specials: Some((ac, ids)),
            prefix: Vec::new(),
            cache: Mutex::new(SegmentCache::default()),
        };
        let split = candidate.encode_segments(&probe).ok()?;
        if split == whole.get_ids() {
            candidate.specials
        } else {
            None
        }
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

    /// The chat template applied to `messages`, as transformers' `apply_chat_template`
    /// renders it: messages with `role`, string `content` (text parts of array content
    /// joined by newlines, as vLLM does for string-content templates) and, when sent,
    /// `tool_calls`, `tool_call_id`, `name`, `reasoning_content`; `tools` and the request's
    /// `chat_template_kwargs` as template variables.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        chat: &ChatOptions,
        add_generation_prompt: bool,
    ) -> Result<String, TokensError> {
        let env = self.template.as_ref().ok_or(TokensError::NoTemplate)?;
        let messages: Vec<Json> = messages
            .iter()
            .map(|m| {
                // vLLM turns a missing content into an empty string (no parts, joined).
                let content = match &m.content {
                    MessageContent::Empty => Json::String(String::new()),
                    MessageContent::Text(t) => Json::String(t.clone()),
                    MessageContent::Parts(parts) => Json::String(
                        parts
                            .iter()
                            .filter_map(|p| match p {
                                ContentPart::Text(t) => Some(t.as_str()),
                                ContentPart::Other { .. } => None,
                            })
                            .collect::<Vec<_>>()
                            .join("\n"),
                    ),
                };
                let mut value = serde_json::json!({"role": m.role, "content": content});
                if let Some(calls) = &m.tool_calls {
                    value["tool_calls"] = calls.clone();
                }
                for (key, field) in [
                    ("tool_call_id", &m.tool_call_id),
                    ("name", &m.name),
                    ("reasoning_content", &m.reasoning_content),
                ] {
                    if let Some(v) = field {
                        value[key] = Json::String(v.clone());
                    }
                }
                value
            })
            .collect();
        let mut ctx: HashMap<&str, Value> = self
            .context
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from_serialize(v)))
            .collect();
        if let Some(kwargs) = &chat.template_kwargs {
            for (k, v) in kwargs {
                ctx.insert(k.as_str(), Value::from_serialize(v));
            }
        }
        ctx.insert("messages", Value::from_serialize(&messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert(
            "tools",
            chat.tools
                .as_ref()
                .map_or(Value::from(()), Value::from_serialize),
        );
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| TokensError::Template(format!("{e:#}")))
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

/// A minijinja environment for one chat template, with what transformers provides:
/// `raise_exception`, `strftime_now`, `tojson`, Python string methods.
fn environment(source: String) -> Result<Environment<'static>, TokensError> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", source)
        .map_err(|e| TokensError::Template(format!("{e:#}")))?;
    Ok(env)
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, so
/// `", "` and `": "` between items (`","` and newlines with an indent), keys in their order,
/// non-ASCII as is. (minijinja's own writes compact, HTML-escaped JSON: other tokens.)
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&mut out, &json, indent, 0);
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, v: &Json, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&n.to_string()),
        Json::String(s) => write_json_str(out, s),
        Json::Array(items) if items.is_empty() => out.push_str("[]"),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if map.is_empty() => out.push_str("{}"),
        Json::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, k);
                out.push_str(": ");
                write_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Today's date (UTC) in `format` (`%d %b %B %m %Y %y %H %M %S %%`), as templates ask
/// with `strftime_now("%d %b %Y")`.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Days to civil date (Howard Hinnant's algorithm).
    let days = (unix_secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let secs_of_day = unix_secs % 86_400;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3_600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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
