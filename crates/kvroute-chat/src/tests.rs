use super::*;

fn msg(role: &str, text: &str) -> ChatMessage {
    ChatMessage::text(role, text)
}

#[test]
fn dates_format_like_strftime() {
    // 2024-07-26 00:00:00 UTC.
    assert_eq!(strftime("%d %b %Y", 1_721_952_000), "26 Jul 2024");
    assert_eq!(strftime("%B %m/%y %%", 1_721_952_000), "July 07/24 %");
    // 2000-02-29 13:05:09 UTC.
    assert_eq!(
        strftime("%Y-%m-%d %H:%M:%S", 951_829_509),
        "2000-02-29 13:05:09"
    );
}

#[test]
fn tojson_writes_what_pythons_json_dumps_writes() {
    let config = serde_json::json!({
        "chat_template": "{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1, 2.5, none, true], 'é': 'x\"\\n'} | tojson }}|{{ {'b': {'c': []}, 'a': {}} | tojson(indent=2) }}",
    });
    let t = ChatTemplate::from_config(&config).unwrap().unwrap();
    let text = t
        .render(&[msg("user", "<a & 'b'>")], &ChatOptions::default(), false)
        .unwrap();
    assert_eq!(
        text,
        "\"<a & 'b'>\"|{\"b\": 1, \"a\": [1, 2.5, null, true], \"é\": \"x\\\"\\n\"}|{\n  \"b\": {\n    \"c\": []\n  },\n  \"a\": {}\n}"
    );
}

#[test]
fn configs_without_a_template_have_none_and_broken_ones_say_why() {
    assert!(
        ChatTemplate::from_config(&serde_json::json!({}))
            .unwrap()
            .is_none()
    );
    let named = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages | length }}"}
    ]});
    let t = ChatTemplate::from_config(&named).unwrap().unwrap();
    assert_eq!(
        t.render(&[msg("user", "x")], &ChatOptions::default(), true)
            .unwrap(),
        "1"
    );
    let err =
        ChatTemplate::from_config(&serde_json::json!({"chat_template": "{% if %}"})).unwrap_err();
    assert!(err.to_string().starts_with("chat template:"), "{err}");
}
