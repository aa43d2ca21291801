use proptest::prelude::*;
use test_support::mutate::mutation;

use super::*;

fn parse(api: ApiKind, body: &str) -> Result<InferenceRequest, ParseError> {
    InferenceRequest::parse(api, body.as_bytes(), RequestHints::default())
}

#[test]
fn api_kind_follows_path_suffix() {
    assert_eq!(
        ApiKind::from_path("/v1/chat/completions"),
        ApiKind::ChatCompletions
    );
    assert_eq!(
        ApiKind::from_path("/openai/v1/chat/completions?x=1"),
        ApiKind::ChatCompletions
    );
    assert_eq!(ApiKind::from_path("/v1/completions/"), ApiKind::Completions);
    assert_eq!(ApiKind::from_path("/v1/models"), ApiKind::Other);
    assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Other);
    assert_eq!(ApiKind::from_path("/health"), ApiKind::Other);
}

#[test]
fn completions_prompt_shapes() {
    let r = parse(
        ApiKind::Completions,
        r#"{"model":"m","prompt":"hi","max_tokens":7,"stream":true,"cache_salt":"s"}"#,
    )
    .unwrap();
    assert_eq!(r.model, "m");
    assert_eq!(r.prompt, Prompt::Text("hi".into()));
    assert_eq!(r.max_tokens, Some(7));
    assert!(r.stream);
    assert_eq!(r.cache_salt.as_deref(), Some("s"));

    let r = parse(ApiKind::Completions, r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
    assert_eq!(r.prompt, Prompt::Texts(vec!["a".into(), "b".into()]));
    assert!(!r.stream);

    let r = parse(ApiKind::Completions, r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
    assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));

    let r = parse(
        ApiKind::Completions,
        r#"{"model":"m","prompt":[[1,2],[3]]}"#,
    )
    .unwrap();
    assert_eq!(r.prompt, Prompt::TokenBatches(vec![vec![1, 2], vec![3]]));
}

#[test]
fn chat_content_shapes() {
    let body = r#"{
        "model": "m",
        "max_tokens": 5,
        "max_completion_tokens": 9,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"image_url": {"url": "data:..."}, "type": "image_url"}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "x"}]},
            {"role": "assistant"}
        ],
        "tools": [{"type": "function"}]
    }"#;
    let r = parse(ApiKind::ChatCompletions, body).unwrap();
    assert_eq!(r.max_tokens, Some(9), "max_completion_tokens wins");
    let Prompt::Chat(msgs) = &r.prompt else {
        panic!("not chat: {:?}", r.prompt)
    };
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[0].content, MessageContent::Text("be brief".into()));
    assert_eq!(
        msgs[1].content,
        MessageContent::Parts(vec![
            ContentPart::Text("look".into()),
            ContentPart::Other {
                kind: "image_url".into()
            }
        ])
    );
    assert_eq!(msgs[2].content, MessageContent::Empty);
    assert_eq!(msgs[3].content, MessageContent::Empty);
}

#[test]
fn escaped_text_is_unescaped() {
    let r = parse(
        ApiKind::Completions,
        r#"{"model":"m","prompt":"a\"b\\c\u00e9\n"}"#,
    )
    .unwrap();
    assert_eq!(r.prompt, Prompt::Text("a\"b\\cé\n".into()));
}

#[test]
fn malformed_bodies_are_rejected_with_reason() {
    let cases: &[(ApiKind, &str, &str)] = &[
        (
            ApiKind::Completions,
            "",
            "error unmarshaling request bodyMap",
        ),
        (
            ApiKind::Completions,
            "{",
            "error unmarshaling request bodyMap",
        ),
        (
            ApiKind::Completions,
            "[1]",
            "error unmarshaling request bodyMap",
        ),
        (ApiKind::Completions, r#"{"prompt":"x"}"#, "model not found"),
        (
            ApiKind::Completions,
            r#"{"model":3,"prompt":"x"}"#,
            "error unmarshaling request bodyMap",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m"}"#,
            "must have prompt field",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m","prompt":[]}"#,
            "empty array",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m","prompt":[1,"a"]}"#,
            "error unmarshaling request bodyMap",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m","prompt":["a",1]}"#,
            "mixes",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m","prompt":[-1]}"#,
            "negative token id",
        ),
        (
            ApiKind::Completions,
            r#"{"model":"m","prompt":[4294967296]}"#,
            "out of range",
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"m"}"#,
            "must have valid messages field",
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"m","messages":[{"content":"x"}]}"#,
            "role",
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"u","content":[{"text":"x"}]}]}"#,
            "type",
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"u","content":[{"type":"text"}]}]}"#,
            "text",
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"u","content":5}]}"#,
            "error unmarshaling request bodyMap",
        ),
        (
            ApiKind::Other,
            r#"{"model":"m"}"#,
            "not name an inference API",
        ),
    ];
    for (api, body, want) in cases {
        let err = parse(*api, body).expect_err(body).to_string();
        assert!(err.contains(want), "{body}: got {err:?}, want {want:?}");
    }
}

proptest! {
    /// A body built from a generated request, in any field order and with unknown fields
    /// among the known ones, parses to exactly that request.
    #[test]
    fn generated_bodies_parse_to_what_was_generated(case in body()) {
        let (api, body, want) = case;
        let got = InferenceRequest::parse(api, &body, RequestHints::default());
        prop_assert_eq!(got.ok(), Some(want), "{}", String::from_utf8_lossy(&body));
    }

    /// The same bodies with bytes flipped, inserted, deleted, cut off or copied elsewhere:
    /// a request of the API's shape or an error, never a panic.
    #[test]
    fn mutated_bodies_fail_cleanly(
        case in body(),
        mutations in proptest::collection::vec(mutation(JSON_TOKENS), 1..4),
    ) {
        let (api, mut body, _) = case;
        for m in &mutations {
            m.apply(&mut body);
        }
        if let Ok(r) = InferenceRequest::parse(api, &body, RequestHints::default()) {
            prop_assert_eq!(r.api, api);
            prop_assert_eq!(matches!(r.prompt, Prompt::Chat(_)), api == ApiKind::ChatCompletions);
        }
    }

    /// What serde_json writes for a prompt, the parser reads back unchanged.
    #[test]
    fn text_prompts_round_trip(texts in proptest::collection::vec(".*", 1..4), model in "[a-z0-9/-]{1,20}") {
        let body = serde_json::json!({"model": model, "prompt": texts, "extra": {"nested": [1, 2]}});
        let r = InferenceRequest::parse(ApiKind::Completions, body.to_string().as_bytes(), RequestHints::default()).unwrap();
        prop_assert_eq!(r.model, model);
        prop_assert_eq!(r.prompt, Prompt::Texts(texts));
    }

    #[test]
    fn token_prompts_round_trip(ids in proptest::collection::vec(any::<u32>(), 1..64)) {
        let body = serde_json::json!({"model": "m", "prompt": ids});
        let r = InferenceRequest::parse(ApiKind::Completions, body.to_string().as_bytes(), RequestHints::default()).unwrap();
        prop_assert_eq!(r.prompt, Prompt::Tokens(ids));
    }
}

/// Any string, newlines, quotes, backslashes and astral characters included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z ]{0,8}",
        1 => "(?s).{0,8}",
        1 => prop::sample::select(vec!["", "\"\\/\u{8}\u{c}\n\r\t", "\u{0}", "é😀", "[DONE]"])
            .prop_map(str::to_owned),
    ]
}

/// JSON values without floats (which serde_json reads back to the nearest, not always the
/// same, double), as kept verbatim in `tools`, `tool_calls` and template arguments.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(("[a-z_]{1,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An unknown field, as clients send many: skipped whatever it holds (floats too).
fn extra_field() -> impl Strategy<Value = (String, String)> {
    let name = prop::sample::select(vec![
        "temperature",
        "top_p",
        "n",
        "user",
        "seed",
        "logprobs",
        "stream_options",
        "response_format",
        "x-vendor",
        "",
    ]);
    let value = prop_oneof![
        json().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|f| serde_json::Value::from(f).to_string()),
        Just("-0.0e-7".to_owned()),
    ];
    (name.prop_map(str::to_owned), value)
}

fn completions_prompt() -> impl Strategy<Value = Prompt> {
    prop_oneof![
        text().prop_map(Prompt::Text),
        proptest::collection::vec(text(), 1..4).prop_map(Prompt::Texts),
        proptest::collection::vec(any::<u32>(), 1..8).prop_map(Prompt::Tokens),
        proptest::collection::vec(proptest::collection::vec(any::<u32>(), 0..4), 1..4)
            .prop_map(Prompt::TokenBatches),
    ]
}

fn prompt_json(p: &Prompt) -> serde_json::Value {
    match p {
        Prompt::Text(t) => t.as_str().into(),
        Prompt::Texts(t) => t.as_slice().into(),
        Prompt::Tokens(t) => t.as_slice().into(),
        Prompt::TokenBatches(b) => b
            .iter()
            .map(|t| serde_json::Value::from(t.as_slice()))
            .collect(),
        Prompt::Chat(_) => unreachable!("completions prompts only"),
    }
}

/// A message, and its JSON with fields in a shuffled order (content absent or `null` when
/// empty, other parts with a payload the parser skips).
fn message() -> impl Strategy<Value = (ChatMessage, String)> {
    let part = prop_oneof![
        text().prop_map(ContentPart::Text),
        prop::sample::select(vec!["image_url", "input_audio", "file"])
            .prop_map(|k| ContentPart::Other { kind: k.to_owned() }),
    ];
    let content = prop_oneof![
        Just(MessageContent::Empty),
        text().prop_map(MessageContent::Text),
        proptest::collection::vec(part, 0..3).prop_map(MessageContent::Parts),
    ];
    (
        prop::sample::select(vec!["system", "user", "assistant", "tool"]),
        content,
        proptest::option::of(json()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        any::<bool>(),
    )
        .prop_flat_map(|(role, content, tool_calls, tool_call_id, name, reasoning, null_content)| {
            let m = ChatMessage {
                role: role.to_owned(),
                content,
                tool_calls: tool_calls.filter(|v| !v.is_null()),
                tool_call_id,
                name,
                reasoning_content: reasoning,
            };
            let mut fields = vec![field("role", &m.role)];
            match &m.content {
                MessageContent::Empty if null_content => fields.push(r#""content":null"#.to_owned()),
                MessageContent::Empty => {}
                MessageContent::Text(t) => fields.push(field("content", t)),
                MessageContent::Parts(parts) => {
                    let parts: Vec<String> = parts
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text(t) => format!(r#"{{"type":"text","text":{}}}"#, string(t)),
                            ContentPart::Other { kind } => {
                                format!(r#"{{"{kind}":{{"url":"data:,x","detail":[1,2.5]}},"type":"{kind}"}}"#)
                            }
                        })
                        .collect();
                    fields.push(format!(r#""content":[{}]"#, parts.join(",")));
                }
            }
            if let Some(v) = &m.tool_calls {
                fields.push(field("tool_calls", v));
            }
            for (k, v) in [("tool_call_id", &m.tool_call_id), ("name", &m.name), ("reasoning_content", &m.reasoning_content)] {
                if let Some(v) = v {
                    fields.push(field(k, v));
                }
            }
            Just(fields).prop_shuffle().prop_map(move |f| (m.clone(), format!("{{{}}}", f.join(","))))
        })
}

fn string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn field(name: &str, value: &impl serde::Serialize) -> String {
    format!("{}:{}", string(name), serde_json::to_string(value).unwrap())
}

/// A valid body of either API: its fields (known ones set or not, unknown ones mixed in)
/// in a random order, compact or spaced out, and the request it must parse to.
fn body() -> impl Strategy<Value = (ApiKind, Vec<u8>, InferenceRequest)> {
    let api = prop_oneof![Just(ApiKind::Completions), Just(ApiKind::ChatCompletions)];
    let options = (
        text(),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(text()),
        proptest::option::of(json()),
        proptest::option::of(proptest::collection::vec(("[a-z_]{1,8}", json()), 0..3)),
    );
    (
        api,
        options,
        completions_prompt(),
        proptest::collection::vec(message(), 0..4),
        proptest::collection::vec(extra_field(), 0..3),
    )
        .prop_flat_map(
            |(
                api,
                (model, stream, max_tokens, max_completion, salt, tools, kwargs),
                prompt,
                messages,
                extras,
            )| {
                let kwargs: Option<serde_json::Map<String, serde_json::Value>> =
                    kwargs.map(|kv| kv.into_iter().collect());
                let mut fields = vec![field("model", &model)];
                let prompt = if api == ApiKind::Completions {
                    fields.push(field("prompt", &prompt_json(&prompt)));
                    prompt
                } else {
                    let json: Vec<&str> = messages.iter().map(|(_, j)| j.as_str()).collect();
                    fields.push(format!(r#""messages":[{}]"#, json.join(",")));
                    Prompt::Chat(messages.into_iter().map(|(m, _)| m).collect())
                };
                if let Some(v) = stream {
                    fields.push(field("stream", &v));
                }
                if let Some(v) = max_tokens {
                    fields.push(field("max_tokens", &v));
                }
                if let Some(v) = max_completion {
                    fields.push(field("max_completion_tokens", &v));
                }
                if let Some(v) = &salt {
                    fields.push(field("cache_salt", v));
                }
                if let Some(v) = &tools {
                    fields.push(field("tools", v));
                }
                if let Some(v) = &kwargs {
                    fields.push(field("chat_template_kwargs", v));
                }
                // The other API's prompt field is read and dropped, like any unknown one.
                if api == ApiKind::ChatCompletions {
                    fields.push(r#""prompt":"ignored""#.to_owned());
                }
                fields.extend(
                    extras
                        .into_iter()
                        .map(|(k, v)| format!("{}:{v}", string(&k))),
                );
                let want = InferenceRequest {
                    api,
                    model,
                    prompt,
                    cache_salt: salt,
                    stream: stream.unwrap_or(false),
                    max_tokens: max_completion.or(max_tokens),
                    chat: ChatOptions {
                        tools: tools.filter(|t| !t.is_null()),
                        template_kwargs: kwargs,
                    },
                    hints: RequestHints::default(),
                };
                (Just(fields).prop_shuffle(), any::<bool>()).prop_map(move |(fields, spaced)| {
                    let sep = if spaced { ",\n  " } else { "," };
                    let body = if spaced {
                        format!("{{\n  {}\n}}\n", fields.join(sep))
                    } else {
                        format!("{{{}}}", fields.join(sep))
                    };
                    (api, body.into_bytes(), want.clone())
                })
            },
        )
}

/// JSON tokens a mutation may insert out of place (`test_support::mutate`).
const JSON_TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"-1",
    b"1e999",
    b"4294967296",
    b"\\ud800",
    b"\xff",
    b"\"model\":\"m\"",
    b"[[",
    b"{\"type\":",
];

#[test]
fn what_chat_templates_read_is_kept() {
    let body = serde_json::json!({
        "model": "m",
        "messages": [
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
            {"role": "assistant", "content": "ok", "reasoning_content": "thought"}
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "chat_template_kwargs": {"enable_thinking": false}
    });
    let r = InferenceRequest::parse(
        ApiKind::ChatCompletions,
        body.to_string().as_bytes(),
        RequestHints::default(),
    )
    .unwrap();
    let Prompt::Chat(messages) = &r.prompt else {
        panic!("{r:?}")
    };
    assert_eq!(messages[0].tool_calls.as_ref().unwrap()[0]["id"], "c1");
    assert_eq!(messages[1].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(messages[1].name.as_deref(), Some("f"));
    assert_eq!(messages[2].reasoning_content.as_deref(), Some("thought"));
    assert_eq!(r.chat.tools.as_ref().unwrap()[0]["type"], "function");
    assert_eq!(
        r.chat.template_kwargs.as_ref().unwrap()["enable_thinking"],
        serde_json::Value::Bool(false)
    );
    // Absent, and `null` tools, are nothing.
    let plain = InferenceRequest::parse(
        ApiKind::ChatCompletions,
        br#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":null}"#,
        RequestHints::default(),
    )
    .unwrap();
    assert_eq!(plain.chat, ChatOptions::default());
}

/// A prompt's length as the approximate index reads it: text bytes (a chat's roles and
/// text parts, not its other parts), or 4 bytes a token id.
#[test]
fn index_bytes_count_text_and_token_ids() {
    assert_eq!(Prompt::Text("abcdef".into()).index_bytes(), 6);
    assert_eq!(
        Prompt::Texts(vec!["ab".into(), "c".into()]).index_bytes(),
        3
    );
    assert_eq!(Prompt::Tokens(vec![1, 2, 3]).index_bytes(), 12);
    assert_eq!(
        Prompt::TokenBatches(vec![vec![1], vec![2, 3]]).index_bytes(),
        12
    );
    let chat = Prompt::Chat(vec![
        ChatMessage::text("system", "be brief"),
        ChatMessage {
            role: "user".into(),
            content: MessageContent::Parts(vec![
                ContentPart::Text("hi".into()),
                ContentPart::Other {
                    kind: "image_url".into(),
                },
            ]),
            ..ChatMessage::default()
        },
    ]);
    assert_eq!(chat.index_bytes(), "system".len() + 8 + "user".len() + 2);
}
