//! Chat templates, rendered as vLLM renders them: transformers' `apply_chat_template`
//! semantics (the `tokenizer_config.json` template, `messages`, `add_generation_prompt`,
//! special tokens, `tools`, `chat_template_kwargs`, `raise_exception`, `strftime_now`,
//! Python's `json.dumps` for `tojson`, Python string methods) with minijinja.
//!
//! Shared by the router (`kvroute-tokens`, to hash what the pod will compute) and the
//! simulator (to compute it as vLLM does): a model's template is the model's, not either
//! side's reading of vLLM's wire format. Pure: it reads no files.

use std::collections::HashMap;

use kvroute_core::{ChatMessage, ChatOptions, ContentPart, MessageContent};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::Value as Json;

/// Why a template did not compile or render (including its own `raise_exception`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

/// A model's chat template and the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    context: HashMap<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of a parsed `tokenizer_config.json` (its `chat_template`, or the one
    /// named "default" of a list), with its `bos_token`, `eos_token`, `unk_token` and
    /// `pad_token`; `None` when it has no template.
    pub fn from_config(config: &Json) -> Result<Option<Self>, TemplateError> {
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
        let source = match &config["chat_template"] {
            Json::String(t) => Some(t.clone()),
            Json::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => None,
        };
        source
            .map(|s| {
                Ok(Self {
                    env: environment(s)?,
                    context,
                })
            })
            .transpose()
    }

    /// The template applied to `messages`, as transformers' `apply_chat_template`
    /// renders it: messages with `role`, string `content` (text parts of array content
    /// joined by newlines, as vLLM does for string-content templates) and, when sent,
    /// `tool_calls`, `tool_call_id`, `name`, `reasoning_content`; `tools` and the request's
    /// `chat_template_kwargs` as template variables.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        chat: &ChatOptions,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let env = &self.env;
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
            .map_err(|e| TemplateError(format!("{e:#}")))
    }
}

/// A minijinja environment for one chat template, with what transformers provides:
/// `raise_exception`, `strftime_now`, `tojson`, Python string methods.
fn environment(source: String) -> Result<Environment<'static>, TemplateError> {
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
        .map_err(|e| TemplateError(format!("{e:#}")))?;
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
