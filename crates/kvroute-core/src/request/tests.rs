use proptest::prelude::*;

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
    /// Any bytes either parse or give an error; never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = InferenceRequest::parse(ApiKind::Completions, &bytes, RequestHints::default());
        let _ = InferenceRequest::parse(ApiKind::ChatCompletions, &bytes, RequestHints::default());
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
