//! Builders and fakes for kvroute's tests and benches, so a test reads like the scenario it
//! checks: Envoy's ext_proc messages as Envoy sends them, and readers of the answers.
//! Used only by tests and benches; never by shipped code.

pub mod envoy;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use kvroute_core::{ApiKind, Endpoint, InferenceRequest, Prompt, RequestHints};
use kvroute_endpoints::Registry;

/// A completions request for `prompt` under model `m`, as the body parser would give it.
pub fn completion(prompt: Prompt) -> InferenceRequest {
    InferenceRequest {
        api: ApiKind::Completions,
        model: "m".into(),
        prompt,
        cache_salt: None,
        stream: false,
        max_tokens: None,
        chat: Default::default(),
        hints: RequestHints::default(),
    }
}

/// A registry holding endpoints on 127.0.0.1 at `ports`.
pub fn registry(ports: &[u16]) -> Arc<Registry> {
    let reg = Arc::new(Registry::new());
    reg.replace(
        ports
            .iter()
            .map(|&p| Endpoint::from_address(SocketAddr::from(([127, 0, 0, 1], p))))
            .collect(),
    );
    reg
}

/// An OpenAI chat body of about `bytes` bytes: a system prompt and a user message.
pub fn chat_body(bytes: usize) -> Vec<u8> {
    let filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit. ";
    let text: String = filler
        .chars()
        .cycle()
        .take(bytes.saturating_sub(160))
        .collect();
    format!(
        r#"{{"model":"llama","stream":true,"max_tokens":64,"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{text}"}}]}}"#
    )
    .into_bytes()
}

/// `body` cut into `n` chunks of near-equal size (at least one, possibly empty).
pub fn split(body: &[u8], n: usize) -> Vec<Vec<u8>> {
    let n = n.max(1);
    let size = body.len().div_ceil(n).max(1);
    let mut out: Vec<Vec<u8>> = body.chunks(size).map(<[u8]>::to_vec).collect();
    if out.is_empty() {
        out.push(Vec::new());
    }
    out
}
