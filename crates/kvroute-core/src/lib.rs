//! kvroute's shared vocabulary.
//!
//! Owns the types every other crate speaks in: who an endpoint is ([`Endpoint`]) and what a
//! request asks for ([`InferenceRequest`], parsed from an OpenAI-style body). It does no I/O,
//! knows no async runtime, and holds no state: crates that route, index or serve build on it.

mod endpoint;
mod request;

pub use endpoint::{Endpoint, EndpointId};
pub use request::{
    ApiKind, ChatMessage, ContentPart, InferenceRequest, MessageContent, ParseError, Prompt,
    RequestHints,
};
