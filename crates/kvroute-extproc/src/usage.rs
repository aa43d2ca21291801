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

        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            for ct in ["text/event-stream", "application/json"] {
                let mut s = UsageScanner::for_content_type(ct);
                for c in &chunks {
                    s.feed(c);
                }
                let _ = s.finish();
            }
        }
    }
}
