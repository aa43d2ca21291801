use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Which OpenAI-style API a request path names; decides whether the body is parsed at all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ApiKind {
    /// `/v1/completions`: `prompt` is text, texts, token ids or batches of token ids.
    Completions,
    /// `/v1/chat/completions`: `messages` whose content is text or an array of parts.
    ChatCompletions,
    /// Anything else (`/v1/models`, `/health`, embeddings, …): routed by load alone.
    Other,
}

impl ApiKind {
    /// Classifies a request path by suffix, ignoring the query string, so that gateways that
    /// prefix paths (`/openai/v1/chat/completions`) still match.
    pub fn from_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Self::ChatCompletions
        } else if path.ends_with("/completions") {
            Self::Completions
        } else {
            Self::Other
        }
    }
}

/// Hints carried in request headers rather than the body.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct RequestHints {
    /// Groups the turns of one conversation (header `x-session-id`).
    pub session_id: Option<String>,
    /// Names an `InferenceObjective` (header `x-llm-d-inference-objective`, or the older
    /// `x-gateway-inference-objective`).
    pub objective: Option<String>,
    /// The endpoint that served this session before, as the router encoded it in its last
    /// answer (header `x-session-token`, upstream's session affinity).
    pub session_token: Option<String>,
}

/// What the router needs to know of one inference request, parsed from its body once.
#[derive(Clone, PartialEq, Debug)]
pub struct InferenceRequest {
    /// The API the body was parsed as.
    pub api: ApiKind,
    /// Model (or LoRA adapter) name as the client sent it.
    pub model: String,
    /// The prompt, as sent: never re-rendered here.
    pub prompt: Prompt,
    /// Per-tenant cache isolation key (vLLM's `cache_salt`): blocks hashed with different salts
    /// never match.
    pub cache_salt: Option<String>,
    /// Whether the response comes as server-sent events.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// What a chat template reads besides the messages.
    pub chat: ChatOptions,
    /// Header-borne hints.
    pub hints: RequestHints,
}

/// The parts of a chat request its template reads besides the messages, kept as sent
/// (absent in almost every request, so they cost nothing then).
#[derive(Clone, Default, PartialEq, Debug)]
pub struct ChatOptions {
    /// `tools`: the function definitions offered.
    pub tools: Option<serde_json::Value>,
    /// `chat_template_kwargs`: extra template variables (`enable_thinking`, …).
    pub template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The prompt of a request in the shape the client sent it.
#[derive(Clone, PartialEq, Debug)]
pub enum Prompt {
    /// `prompt: "…"`.
    Text(String),
    /// `prompt: ["…", "…"]`: a batch of text prompts.
    Texts(Vec<String>),
    /// `prompt: [1, 2, 3]`: pre-tokenized.
    Tokens(Vec<u32>),
    /// `prompt: [[1, 2], [3]]`: a batch of pre-tokenized prompts.
    TokenBatches(Vec<Vec<u32>>),
    /// `messages: [...]` of a chat completion.
    Chat(Vec<ChatMessage>),
}

/// Bytes of text per token, for prompts kvroute has not tokenized (the Inference Extension's
/// estimate; a pod's own ratio is learnt from the usage its answers report).
pub const BYTES_PER_TOKEN: usize = 4;

impl Prompt {
    /// The prompt's length as kvroute reads it without a tokenizer: its text's bytes (chat:
    /// each message's role and text), or [`BYTES_PER_TOKEN`] per token id, which is what
    /// the approximate index hashes a token id as.
    pub fn index_bytes(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Texts(ts) => ts.iter().map(String::len).sum(),
            Self::Tokens(t) => t.len() * BYTES_PER_TOKEN,
            Self::TokenBatches(b) => b.iter().map(Vec::len).sum::<usize>() * BYTES_PER_TOKEN,
            Self::Chat(messages) => messages
                .iter()
                .map(|m| {
                    m.role.len()
                        + match &m.content {
                            MessageContent::Empty => 0,
                            MessageContent::Text(t) => t.len(),
                            MessageContent::Parts(parts) => parts
                                .iter()
                                .map(|p| match p {
                                    ContentPart::Text(t) => t.len(),
                                    ContentPart::Other { .. } => 0,
                                })
                                .sum(),
                        }
                })
                .sum(),
        }
    }
}

/// One chat message.
#[derive(Clone, Default, PartialEq, Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// Absent (or `null`) for assistant messages that only call tools.
    #[serde(default)]
    pub content: MessageContent,
    /// An assistant's tool calls, as sent (templates render them).
    #[serde(default)]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The participant's (or tool's) name.
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant's reasoning, when the client sends it back.
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with plain text.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: MessageContent::Text(text.into()),
            ..Self::default()
        }
    }
}

/// A message's content: a plain string or an array of typed parts.
#[derive(Clone, Default, PartialEq, Debug)]
pub enum MessageContent {
    /// No content (`null` or missing).
    #[default]
    Empty,
    /// `"content": "…"`.
    Text(String),
    /// `"content": [{"type": "text", "text": "…"}, {"type": "image_url", …}]`.
    Parts(Vec<ContentPart>),
}

/// One part of an array-valued message content.
#[derive(Clone, PartialEq, Debug)]
pub enum ContentPart {
    /// `{"type": "text", "text": "…"}`.
    Text(String),
    /// Any other part (`image_url`, `input_audio`, …), kept by kind only: its payload is not
    /// copied out of the body.
    Other {
        /// The part's `type`.
        kind: String,
    },
}

/// Why a body could not be read as the inference request its path names. Each variant maps
/// to a 400 answer.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or JSON of the wrong shape. The messages are upstream's picker's, word for
    /// word where it has one (clients and tests built on it match them).
    #[error("error unmarshaling request bodyMap: {0}")]
    Json(#[from] serde_json::Error),
    /// The body has no string `model`.
    #[error("model not found in request body")]
    MissingModel,
    /// A completion without `prompt`.
    #[error("invalid completions request: must have prompt field")]
    MissingPrompt,
    /// A chat completion without `messages`.
    #[error("invalid chat completions request: must have valid messages field")]
    MissingMessages,
    /// The path does not name an API whose body kvroute reads.
    #[error("path does not name an inference API")]
    NotInference,
}

/// The fields of both APIs; unknown fields are skipped without being buffered.
#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    prompt: Option<Prompt>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    stream: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    cache_salt: Option<String>,
    tools: Option<serde_json::Value>,
    chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

impl InferenceRequest {
    /// Parses a complete request body as the API `api` names. Each string of the prompt is
    /// copied out of `body` exactly once; unknown fields are skipped in place.
    pub fn parse(api: ApiKind, body: &[u8], hints: RequestHints) -> Result<Self, ParseError> {
        if api == ApiKind::Other {
            return Err(ParseError::NotInference);
        }
        let parsed: Body = serde_json::from_slice(body)?;
        let model = parsed.model.ok_or(ParseError::MissingModel)?;
        let prompt = if api == ApiKind::ChatCompletions {
            Prompt::Chat(parsed.messages.ok_or(ParseError::MissingMessages)?)
        } else {
            parsed.prompt.ok_or(ParseError::MissingPrompt)?
        };
        Ok(Self {
            api,
            model,
            prompt,
            cache_salt: parsed.cache_salt,
            stream: parsed.stream.unwrap_or(false),
            max_tokens: parsed.max_completion_tokens.or(parsed.max_tokens),
            chat: ChatOptions {
                tools: parsed.tools.filter(|t| !t.is_null()),
                template_kwargs: parsed.chat_template_kwargs,
            },
            hints,
        })
    }
}

/// The keys of a content part that matter; others are skipped without allocating.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum PartKey {
    Type,
    Text,
    #[serde(other)]
    Other,
}

/// One element of a `prompt` array, before the array's shape is known.
enum PromptItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id or an array of token ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                token_id(v).map(PromptItem::Token)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("negative token id {v}")))
                    .and_then(token_id)
                    .map(PromptItem::Token)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
                Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(PromptItem::Tokens)
            }
        }
        d.deserialize_any(V)
    }
}

fn token_id<E: de::Error>(v: u64) -> Result<u32, E> {
    u32::try_from(v).map_err(|_| E::custom(format!("token id {v} out of range")))
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of strings, of token ids, or of token-id arrays")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let Some(first) = seq.next_element::<PromptItem>()? else {
                    return Err(de::Error::custom("prompt is an empty array"));
                };
                let mixed = || de::Error::custom("prompt array mixes element types");
                match first {
                    PromptItem::Text(t) => {
                        let mut out = vec![t];
                        while let Some(item) = seq.next_element::<PromptItem>()? {
                            let PromptItem::Text(t) = item else {
                                return Err(mixed());
                            };
                            out.push(t);
                        }
                        Ok(Prompt::Texts(out))
                    }
                    PromptItem::Token(id) => {
                        let mut out = vec![id];
                        while let Some(id) = seq.next_element::<u32>()? {
                            out.push(id);
                        }
                        Ok(Prompt::Tokens(out))
                    }
                    PromptItem::Tokens(ids) => {
                        let mut out = vec![ids];
                        while let Some(ids) = seq.next_element::<Vec<u32>>()? {
                            out.push(ids);
                        }
                        Ok(Prompt::TokenBatches(out))
                    }
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageContent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<MessageContent, E> {
                Ok(MessageContent::Empty)
            }
            fn visit_none<E: de::Error>(self) -> Result<MessageContent, E> {
                Ok(MessageContent::Empty)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MessageContent, A::Error> {
                Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(MessageContent::Parts)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentPart;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ContentPart, A::Error> {
                let mut kind: Option<String> = None;
                let mut text: Option<String> = None;
                while let Some(key) = map.next_key::<PartKey>()? {
                    match key {
                        PartKey::Type => kind = Some(map.next_value()?),
                        PartKey::Text => text = Some(map.next_value()?),
                        PartKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match (kind.as_deref(), text) {
                    (Some("text"), Some(text)) => Ok(ContentPart::Text(text)),
                    (Some("text"), None) => Err(de::Error::missing_field("text")),
                    (Some(_), _) => Ok(ContentPart::Other {
                        kind: kind.unwrap_or_default(),
                    }),
                    (None, _) => Err(de::Error::missing_field("type")),
                }
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests;
