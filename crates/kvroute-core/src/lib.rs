//! kvroute's shared vocabulary.
//!
//! Owns the types every other crate speaks in: who an endpoint is ([`Endpoint`]) and what a
//! request asks for ([`InferenceRequest`], parsed from an OpenAI-style body). It does no I/O,
//! knows no async runtime, and holds no state: crates that route, index or serve build on it.

mod endpoint;
mod request;

pub use endpoint::{Endpoint, EndpointId};

/// A KV-cache block's identity: a chained hash covering the block's tokens (or text), every
/// block before it, and the keys that keep caches apart (model, LoRA, `cache_salt`). Equal
/// hashes name equal prefixes, so a set of hashes is a tree of prefixes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct BlockHash(pub u64);
pub use request::{
    ApiKind, BYTES_PER_TOKEN, ChatMessage, ChatOptions, ContentPart, InferenceRequest,
    MessageContent, ParseError, Prompt, RequestHints,
};

/// Where a request's priority comes from: its `InferenceObjective`, by name (the cluster's
/// objectives, kept by discovery). Upstream reads an unknown or unset objective as 0.
pub trait Priorities: Send + Sync + std::fmt::Debug {
    /// The priority of the objective named `objective`, if one applies.
    fn priority(&self, objective: &str) -> Option<i32>;
}
