//! A strict, allocation-free reader of the Prometheus text exposition format (0.0.4), as
//! Python's `prometheus_client` writes it for vLLM and SGLang.
//!
//! Written here rather than taken from a crate: `prometheus-parse` 0.2.5 (the maintained-
//! looking one, last released in 2023) matches metric names with `\w+`, so it skips every
//! `vllm:`/`sglang:` series, and splits label values on commas, which breaks vLLM's
//! comma-separated LoRA adapter lists; the others are LGPL or on nom 5. The grammar is a
//! screenful, and the scraper reads 20 bodies per second per pod, so it reads in place.

use std::borrow::Cow;

/// Why a body is not Prometheus text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub what: &'static str,
}

/// One sample line, borrowed from the body.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample<'a> {
    /// Metric name, e.g. `vllm:num_requests_running`.
    pub(crate) name: &'a str,
    /// What is between the braces (already checked), or `""`.
    labels: &'a str,
    /// The value; may be NaN or infinite.
    pub(crate) value: f64,
}

impl<'a> Sample<'a> {
    /// The value of label `name`, unescaped; `None` when the sample has no such label.
    pub(crate) fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        Labels(self.labels)
            .flatten()
            .find(|(n, _)| *n == name)
            .map(|(_, raw)| unescape(raw))
    }
}

/// The sample lines of `text`, in order; comments and blank lines are skipped. The first
/// malformed line ends the iteration with its error.
pub(crate) fn samples(text: &str) -> impl Iterator<Item = Result<Sample<'_>, SyntaxError>> {
    let mut failed = false;
    text.split('\n').enumerate().filter_map(move |(i, line)| {
        if failed {
            return None;
        }
        let line = line.trim_matches([' ', '\t', '\r']);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let parsed = sample(line).map_err(|what| SyntaxError { line: i + 1, what });
        failed = parsed.is_err();
        Some(parsed)
    })
}

/// Label pairs of a brace body: `(name, raw value)` with escapes left in.
struct Labels<'a>(&'a str);

impl<'a> Iterator for Labels<'a> {
    type Item = Result<(&'a str, &'a str), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return None;
        }
        let name_len = name_len(rest, false);
        if name_len == 0 {
            self.0 = "";
            return Some(Err("bad label name"));
        }
        let (name, rest) = rest.split_at(name_len);
        let Some(rest) = rest.trim_start_matches([' ', '\t']).strip_prefix('=') else {
            self.0 = "";
            return Some(Err("label without '='"));
        };
        let Some(rest) = rest.trim_start_matches([' ', '\t']).strip_prefix('"') else {
            self.0 = "";
            return Some(Err("label value not quoted"));
        };
        let Some(end) = closing_quote(rest) else {
            self.0 = "";
            return Some(Err("unterminated label value"));
        };
        let value = &rest[..end];
        let rest = rest[end + 1..].trim_start_matches([' ', '\t']);
        self.0 = match rest.strip_prefix(',') {
            Some(after) => after,
            None if rest.is_empty() => rest,
            None => {
                self.0 = "";
                return Some(Err("labels not separated by ','"));
            }
        };
        Some(Ok((name, value)))
    }
}

/// Parses one non-comment, trimmed line.
fn sample(line: &str) -> Result<Sample<'_>, &'static str> {
    let n = name_len(line, true);
    if n == 0 {
        return Err("bad metric name");
    }
    let (name, mut rest) = line.split_at(n);
    match rest.as_bytes().first() {
        None => return Err("no value"),
        Some(b' ' | b'\t' | b'{') => {}
        Some(_) => return Err("bad metric name"),
    }
    let mut labels = "";
    if let Some(body) = rest.trim_start_matches([' ', '\t']).strip_prefix('{') {
        let end = brace_end(body).ok_or("unterminated label set")?;
        labels = &body[..end];
        for label in Labels(labels) {
            label?;
        }
        rest = &body[end + 1..];
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    let value: f64 = value.parse().map_err(|_| "value is not a number")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| "timestamp is not an integer")?;
    }
    if fields.next().is_some() {
        return Err("trailing fields");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Length of the leading metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or label name (no `:`).
fn name_len(s: &str, colons: bool) -> usize {
    let ok = |b: u8, first: bool| {
        b.is_ascii_alphabetic()
            || b == b'_'
            || (colons && b == b':')
            || (!first && b.is_ascii_digit())
    };
    s.bytes()
        .enumerate()
        .take_while(|&(i, b)| ok(b, i == 0))
        .count()
}

/// Index of the quote closing a label value that starts just after its opening quote.
fn closing_quote(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Index of the `}` closing a label set, skipping braces inside quoted values.
fn brace_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i += closing_quote(&s[i + 1..])? + 2,
            b'}' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Undoes the format's three escapes (`\\`, `\"`, `\n`); any other backslash stays.
fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(c @ ('\\' | '"')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn all(text: &str) -> Result<Vec<Sample<'_>>, SyntaxError> {
        samples(text).collect()
    }

    #[test]
    fn reads_python_client_output() {
        let text = "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
                    # TYPE vllm:num_requests_running gauge\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 3.0\n\
                    vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 12.0\n\
                    \n\
                    plain 1e3 1700000000000\r\n\
                    \tspaced { a = \"x\" , b=\"y\", } -Inf\n\
                    nan_value NaN\n";
        let s = all(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "vllm:num_requests_running");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[0].label("engine").as_deref(), Some("0"));
        assert_eq!(
            s[0].label("model_name").as_deref(),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );
        assert_eq!(s[0].label("missing"), None);
        assert_eq!(s[1].label("le").as_deref(), Some("+Inf"));
        assert_eq!(s[2].value, 1000.0);
        assert_eq!(s[3].name, "spaced");
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        assert_eq!(s[3].label("b").as_deref(), Some("y"));
        assert!(s[4].value.is_nan());
    }

    #[test]
    fn escapes_and_commas_inside_values() {
        let text = r#"vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="q\"x\\y\nz}"} 1.7e9"#;
        let s = all(text).unwrap();
        assert_eq!(s[0].label("running_lora_adapters").as_deref(), Some("a,b"));
        assert_eq!(
            s[0].label("waiting_lora_adapters").as_deref(),
            Some("q\"x\\y\nz}")
        );
        assert_eq!(s[0].label("max_lora").as_deref(), Some("2"));
    }

    #[test]
    fn rejects_garbage() {
        for (text, what) in [
            ("<html><body>oops</body></html>", "bad metric name"),
            ("{\"status\": \"ok\"}", "bad metric name"),
            ("metric", "no value"),
            ("metric abc", "value is not a number"),
            ("metric 1 2 3", "trailing fields"),
            ("metric 1 1.5", "timestamp is not an integer"),
            ("metric{a=\"1\" 1", "unterminated label set"),
            ("metric{a=1} 1", "label value not quoted"),
            ("metric{a} 1", "label without '='"),
            ("metric{a=\"1\" b=\"2\"} 1", "labels not separated by ','"),
            ("metric{9=\"1\"} 1", "bad label name"),
            ("metric{a=\"1} 1", "unterminated label set"),
            ("met-ric 1", "bad metric name"),
        ] {
            let err = all(&format!("ok 1\n{text}\nafter 2")).unwrap_err();
            assert_eq!(err, SyntaxError { line: 2, what }, "{text}");
        }
    }

    #[test]
    fn stops_after_the_first_error() {
        let v: Vec<_> = samples("a 1\nbad line\nc 3").collect();
        assert_eq!(v.len(), 2);
        assert!(v[1].is_err());
    }

    fn escape(v: &str) -> String {
        v.replace('\\', r"\\")
            .replace('"', "\\\"")
            .replace('\n', r"\n")
    }

    proptest! {
        /// Any label values (escaped as the Python client does) and values round-trip.
        #[test]
        fn round_trips(
            name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
            labels in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,8}", "\\PC{0,12}", 0..5),
            value in proptest::num::f64::ANY,
            ts in proptest::option::of(any::<i64>()),
        ) {
            let body: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let mut line = format!("{name}{{{}}} {value:?}", body.join(","));
            if let Some(ts) = ts {
                line.push_str(&format!(" {ts}"));
            }
            let s = all(&line).unwrap();
            prop_assert_eq!(s.len(), 1);
            prop_assert_eq!(s[0].name, name.as_str());
            prop_assert!(s[0].value == value || (value.is_nan() && s[0].value.is_nan()));
            for (k, v) in &labels {
                let got = s[0].label(k);
                prop_assert_eq!(got.as_deref(), Some(v.as_str()));
            }
        }

        /// A generated body (comments, blank lines, CRLF, spacing the format allows,
        /// escaped label values, every value spelling) reads back sample for sample.
        #[test]
        fn generated_bodies_read_back(body in body()) {
            let (text, want) = body;
            let got = all(&text).unwrap();
            prop_assert_eq!(got.len(), want.len());
            for (s, (name, labels, value)) in got.iter().zip(&want) {
                prop_assert_eq!(s.name, name.as_str());
                prop_assert!(s.value == *value || (value.is_nan() && s.value.is_nan()));
                for (k, v) in labels {
                    let got = s.label(k);
                    prop_assert_eq!(got.as_deref(), Some(v.as_str()));
                }
            }
        }

        /// The same bodies with bytes flipped, inserted, deleted, cut off or copied: samples
        /// up to the first error, which ends the iteration; a load in range or an error;
        /// never a panic.
        #[test]
        fn mutated_bodies_fail_cleanly(
            body in body(),
            edits in proptest::collection::vec(test_support::mutate::mutation(EXPOSITION_TOKENS), 1..4),
        ) {
            let mut bytes = body.0.into_bytes();
            for e in &edits {
                e.apply(&mut bytes);
            }
            let text = String::from_utf8_lossy(&bytes);
            let read: Vec<_> = samples(&text).collect();
            prop_assert!(read.iter().rev().skip(1).all(Result::is_ok));
            for s in read.iter().flatten() {
                let _ = (s.label("a"), s.label("le"), s.label("model_name"));
            }
            if let Ok(load) = crate::parse_load(&text) {
                prop_assert!((0.0..=1.0).contains(&load.kv_usage));
            }
        }
    }

    /// One sample as generated: name, labels, value.
    type Want = (String, Vec<(String, String)>, f64);

    /// A value and a spelling of it the Python client (or a hand) may write.
    fn value() -> impl Strategy<Value = (String, f64)> {
        prop_oneof![
            3 => proptest::num::f64::ANY.prop_map(|v| (format!("{v:?}"), v)),
            1 => (0..10_000u32).prop_map(|v| (v.to_string(), f64::from(v))),
            1 => proptest::sample::select(vec![
                ("+Inf", f64::INFINITY),
                ("-Inf", f64::NEG_INFINITY),
                ("NaN", f64::NAN),
                ("1e3", 1000.0),
                ("-0", -0.0),
                ("1.7e9", 1.7e9),
            ])
            .prop_map(|(s, v)| (s.to_owned(), v)),
        ]
    }

    /// One sample line in any spacing the format allows, and what it says.
    fn line() -> impl Strategy<Value = (String, Want)> {
        let name = prop_oneof![
            proptest::sample::select(vec![
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:lora_requests_info",
                "vllm:cache_config_info",
                "sglang:token_usage",
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z_:][a-zA-Z0-9_:]{0,12}",
        ];
        let labels = proptest::collection::btree_map(
            "[a-zA-Z_][a-zA-Z0-9_]{0,8}",
            prop_oneof![
                "[a-z0-9,]{0,6}",
                "\\PC{0,8}",
                Just("q\"x\\y\nz}{,=".to_owned())
            ],
            0..4,
        );
        let pad = proptest::sample::select(vec!["", "", " ", "\t", " \t "]);
        (
            name,
            labels,
            value(),
            proptest::option::of(any::<i64>()),
            [pad.clone(), pad.clone(), pad.clone(), pad],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(name, labels, (spelt, v), ts, [p0, p1, p2, p3], braces, trailing_comma)| {
                    let mut line = format!("{p0}{name}");
                    if braces || !labels.is_empty() {
                        let body: Vec<String> = labels
                            .iter()
                            .map(|(k, v)| format!("{p1}{k}{p2}={p2}\"{}\"{p1}", escape(v)))
                            .collect();
                        let comma = if trailing_comma && !labels.is_empty() {
                            ","
                        } else {
                            ""
                        };
                        line.push_str(&format!("{p1}{{{}{comma}}}", body.join(",")));
                    }
                    line.push_str(&format!(" {p1}{spelt}"));
                    if let Some(ts) = ts {
                        line.push_str(&format!("{p2} {ts}"));
                    }
                    line.push_str(p3);
                    (line, (name, labels.into_iter().collect(), v))
                },
            )
    }

    /// A body: sample lines among `# HELP` / `# TYPE` comments and blank lines, LF or CRLF.
    fn body() -> impl Strategy<Value = (String, Vec<Want>)> {
        let entry = prop_oneof![
            4 => line().prop_map(|(l, w)| (l, Some(w))),
            1 => Just(("# HELP vllm:num_requests_running Number of requests {in} \"batches\".".to_owned(), None)),
            1 => Just(("# TYPE vllm:num_requests_running gauge".to_owned(), None)),
            1 => Just(("  ".to_owned(), None)),
        ];
        (
            proptest::collection::vec(entry, 0..8),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(entries, crlf, final_eol)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let (lines, want): (Vec<String>, Vec<Option<Want>>) = entries.into_iter().unzip();
                let mut text = lines.join(eol);
                if final_eol {
                    text.push_str(eol);
                }
                (text, want.into_iter().flatten().collect())
            })
    }

    /// Prometheus text syntax a mutation may insert out of place (`test_support::mutate`).
    const EXPOSITION_TOKENS: &[&[u8]] = &[
        b"\n", b"\"", b"\\", b"{", b"}", b",", b"=", b" ", b"#", b"\xc3", b"1e999",
    ];
}
