//! Builders and fakes for kvroute's tests and benches, so a test reads like the scenario it
//! checks: Envoy's ext_proc messages as Envoy sends them, and readers of the answers.
//! Used only by tests and benches; never by shipped code.

pub mod apiserver;
pub mod envoy;
pub mod http;
pub mod mutate;

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

/// `n` endpoints on 127.0.0.1, ports 1 to `n`.
pub fn endpoints(n: u16) -> Arc<Registry> {
    registry(&(1..=n).collect::<Vec<_>>())
}

/// `n` token ids below a 150k vocabulary, the same for the same `seed`, distinct across
/// seeds: prompts of a known shape without a tokenizer.
pub fn token_ids(seed: u64, n: usize) -> impl Iterator<Item = u32> {
    (0..n as u64).map(move |i| (splitmix64(seed.wrapping_mul(1_000_003) ^ i) % 150_000) as u32)
}

/// A 64-bit mix (SplitMix64's finaliser), for seeded test data.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
