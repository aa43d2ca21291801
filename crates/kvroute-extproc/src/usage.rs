//! Token usage read from model-server responses, for accounting: a JSON body's `usage`, or
//! the `usage` of the last server-sent event that carries one.

use serde::Deserialize;

/// Largest non-streamed response body kept to read `usage` from; bigger bodies are passed
/// through without accounting rather than held in memory.
pub const MAX_JSON_RESPONSE: usize = 4 << 20;

/// Token counts of one completed request, as the model server reported them.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Deserialize)]
pub struct Usage {
    /// Prompt tokens, cached or not.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Prompt tokens served from the prefix cache, when the server reports them.
    #[serde(
        default,
        deserialize_with = "cached_tokens",
        rename = "prompt_tokens_details"
    )]
    pub cached_tokens: Option<u64>,
}

fn cached_tokens<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Details {
        cached_tokens: Option<u64>,
    }
    Ok(Option::<Details>::deserialize(d)?.and_then(|x| x.cached_tokens))
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
}

/// Incremental reader of `usage` from a response body delivered in chunks.
#[derive(Debug)]
pub enum UsageScanner {
    /// A JSON body, kept until it ends (up to [`MAX_JSON_RESPONSE`]).
    Json {
        /// The body so far.
        buf: Vec<u8>,
        /// Set once the body outgrew the limit.
        overflow: bool,
    },
    /// A `text/event-stream` body, read line by line as it arrives.
    Sse {
        /// The unfinished last line.
        partial: Vec<u8>,
        /// The latest usage seen.
        usage: Option<Usage>,
    },
}

impl UsageScanner {
    /// A scanner for a response whose `content-type` is `content_type`.
    pub fn for_content_type(content_type: &str) -> Self {
        if content_type.contains("text/event-stream") {
            Self::Sse {
                partial: Vec::new(),
                usage: None,
            }
        } else {
            Self::Json {
                buf: Vec::new(),
                overflow: false,
            }
        }
    }

    /// Reads one more chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            Self::Json { buf, overflow } => {
                if *overflow || buf.len() + chunk.len() > MAX_JSON_RESPONSE {
                    *overflow = true;
                    *buf = Vec::new();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            Self::Sse { partial, usage } => {
                let mut rest = chunk;
                while let Some(nl) = memchr::memchr(b'\n', rest) {
                    let line = &rest[..nl];
                    if partial.is_empty() {
                        scan_event_line(line, usage);
                    } else {
                        partial.extend_from_slice(line);
                        scan_event_line(partial, usage);
                        partial.clear();
                    }
                    rest = &rest[nl + 1..];
                }
                if partial.len() + rest.len() <= MAX_JSON_RESPONSE {
                    partial.extend_from_slice(rest);
                } else {
                    partial.clear();
                }
            }
        }
    }

    /// The usage the body reported, once it has ended.
    pub fn finish(self) -> Option<Usage> {
        match self {
            Self::Json { buf, overflow } => {
                if overflow || buf.is_empty() {
                    return None;
                }
                serde_json::from_slice::<WithUsage>(&buf).ok()?.usage
            }
            Self::Sse { partial, mut usage } => {
                scan_event_line(&partial, &mut usage);
                usage
            }
        }
    }
}

fn scan_event_line(line: &[u8], usage: &mut Option<Usage>) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if memchr::memmem::find(data, b"\"usage\"").is_none() {
        return;
    }
    if let Ok(WithUsage { usage: Some(u) }) = serde_json::from_slice(data.trim_ascii()) {
        *usage = Some(u);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SSE: &str = "data: {\"id\":\"1\",\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n\
        data: {\"id\":\"1\",\"choices\":[{\"text\":\"b\"}]}\n\n\
        data: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn json_usage() {
        let mut s = UsageScanner::for_content_type("application/json");
        s.feed(br#"{"choices":[],"usage":{"prompt_tokens":5,"#);
        s.feed(br#""completion_tokens":7,"total_tokens":12}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                cached_tokens: None
            })
        );
    }

    #[test]
    fn json_without_usage_or_broken() {
        for body in [&b"{}"[..], b"not json", b""] {
            let mut s = UsageScanner::for_content_type("application/json");
            s.feed(body);
            assert_eq!(s.finish(), None);
        }
    }

    #[test]
    fn oversized_json_is_not_kept() {
        let mut s = UsageScanner::for_content_type("application/json");
        s.feed(&vec![b' '; MAX_JSON_RESPONSE]);
        s.feed(br#"{"usage":{"prompt_tokens":1}}"#);
        assert!(matches!(&s, UsageScanner::Json { buf, overflow: true } if buf.is_empty()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn sse_usage_in_last_event() {
        let mut s = UsageScanner::for_content_type("text/event-stream; charset=utf-8");
        s.feed(SSE.as_bytes());
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 2,
                cached_tokens: Some(8)
            })
        );
    }

    proptest! {
        /// However the stream is cut into chunks, the same usage comes out.
        #[test]
        fn sse_chunking_does_not_matter(cuts in proptest::collection::vec(0..SSE.len(), 0..12)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut s = UsageScanner::for_content_type("text/event-stream");
            let mut last = 0;
            for c in cuts.into_iter().chain([SSE.len()]) {
                s.feed(&SSE.as_bytes()[last..c]);
                last = c;
            }
            prop_assert_eq!(s.finish().map(|u| u.completion_tokens), Some(2));
        }

        /// A generated body, JSON or events, cut anywhere: the usage it was built with.
        #[test]
        fn generated_bodies_give_their_usage(body in body(), cuts in cuts()) {
            let (content_type, bytes, want) = body;
            prop_assert_eq!(scan(content_type, &bytes, &cuts), want);
        }

        /// The same bodies with bytes flipped, inserted, deleted, cut off or copied: no panic,
        /// and still the same answer however the body is cut.
        #[test]
        fn mutated_bodies_read_the_same_however_cut(
            body in body(),
            edits in proptest::collection::vec(test_support::mutate::mutation(USAGE_TOKENS), 1..4),
            cuts in cuts(),
        ) {
            let (content_type, mut b, _) = body;
            for e in &edits {
                e.apply(&mut b);
            }
            prop_assert_eq!(scan(content_type, &b, &cuts), scan(content_type, &b, &[]));
        }
    }

    /// Feeds `body` cut at `cuts` (fractions of its length, in 1/256) and finishes.
    fn scan(content_type: &str, body: &[u8], cuts: &[u8]) -> Option<Usage> {
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|&c| usize::from(c) * body.len() / 256)
            .collect();
        at.sort_unstable();
        let mut s = UsageScanner::for_content_type(content_type);
        let mut last = 0;
        for c in at.into_iter().chain([body.len()]) {
            s.feed(&body[last..c]);
            last = c;
        }
        s.finish()
    }

    /// SSE and JSON syntax a mutation may insert out of place (`test_support::mutate`).
    const USAGE_TOKENS: &[&[u8]] = &[b"\n", b"\r\n", b"data:", b"\"usage\"", b"{", b"}", b"null"];

    fn cuts() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..6)
    }

    /// A `usage` object in the shapes servers send (fields missing, details null or without
    /// `cached_tokens`, extra fields), or `null`; and what it reads as.
    fn usage() -> impl Strategy<Value = (serde_json::Value, Option<Usage>)> {
        let n = prop_oneof![0..5000u64, any::<u64>()];
        let details = prop_oneof![
            Just(None),
            Just(Some(serde_json::Value::Null)),
            Just(Some(serde_json::json!({}))),
            Just(Some(serde_json::json!({"cached_tokens": null}))),
            (0..5000u64)
                .prop_map(|c| Some(serde_json::json!({"cached_tokens": c, "audio_tokens": 0}))),
        ];
        let some = (
            proptest::option::of(n.clone()),
            proptest::option::of(n),
            details,
        )
            .prop_map(|(p, c, d)| {
                let mut v = serde_json::json!({"total_tokens": 1});
                if let Some(p) = p {
                    v["prompt_tokens"] = p.into();
                }
                if let Some(c) = c {
                    v["completion_tokens"] = c.into();
                }
                let cached = d
                    .as_ref()
                    .and_then(|d| d.get("cached_tokens"))
                    .and_then(serde_json::Value::as_u64);
                if let Some(d) = d {
                    v["prompt_tokens_details"] = d;
                }
                let u = Usage {
                    prompt_tokens: p.unwrap_or(0),
                    completion_tokens: c.unwrap_or(0),
                    cached_tokens: cached,
                };
                (v, Some(u))
            });
        prop_oneof![1 => Just((serde_json::Value::Null, None)), 3 => some]
    }

    /// An event's JSON: a chunk with text (which may mention "usage"), with or without a
    /// `usage` field; and the usage it carries.
    fn event() -> impl Strategy<Value = (String, Option<Usage>)> {
        (".{0,12}", proptest::option::of(usage())).prop_map(|(text, usage)| {
            let mut v =
                serde_json::json!({"id": "cmpl-1", "choices": [{"index": 0, "text": text}]});
            let want = usage.and_then(|(json, u)| {
                v["usage"] = json;
                u
            });
            (v.to_string(), want)
        })
    }

    /// A response body of either kind, its content type, and the usage it reports.
    fn body() -> impl Strategy<Value = (&'static str, Vec<u8>, Option<Usage>)> {
        let line = prop_oneof![
            4 => event().prop_map(|(e, u)| (e, u, true)),
            1 => Just((": keep-alive".to_owned(), None, false)),
            1 => Just(("event: message".to_owned(), None, false)),
            1 => Just(("data: [DONE]".to_owned(), None, false)),
        ];
        let sse = (
            proptest::collection::vec((line, any::<bool>()), 0..6),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(lines, crlf, tail)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut out = String::new();
                let mut want = None;
                for ((text, usage, is_data), spaced) in lines {
                    if is_data {
                        out.push_str(if spaced { "data: " } else { "data:" });
                        want = usage.or(want);
                    }
                    out.push_str(&text);
                    out.push_str(eol);
                    out.push_str(eol);
                }
                if tail {
                    // A last event with no line end: read when the body ends.
                    out.push_str(r#"data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
                    want = Some(Usage {
                        prompt_tokens: 1,
                        completion_tokens: 2,
                        cached_tokens: None,
                    });
                }
                ("text/event-stream; charset=utf-8", out.into_bytes(), want)
            });
        let json = (proptest::option::of(usage()), any::<bool>()).prop_map(|(usage, pretty)| {
            let mut v = serde_json::json!({"id": "cmpl-2", "object": "text_completion", "choices": [{"text": "hi"}]});
            let want = usage.and_then(|(json, u)| {
                v["usage"] = json;
                u
            });
            let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) };
            ("application/json", text.unwrap_or_default().into_bytes(), want)
        });
        prop_oneof![sse, json]
    }
}
