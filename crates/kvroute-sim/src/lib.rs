//! A vLLM-compatible model-server simulator.
//!
//! Owns an engine that behaves like one vLLM pod ([`Engine`]: continuous batching with a
//! chunked-prefill token budget, a KV cache of fixed-size blocks with prefix caching and
//! LRU eviction of freed blocks, preemption, and the KV events vLLM publishes), the
//! hardware profiles that time it ([`Profile`]), and a virtual-time cluster of engines
//! ([`Cluster`]) that replays a workload deterministically with no sockets and no sleeping,
//! and the same engine as a real server ([`server`]: vLLM's OpenAI API, `/metrics` and KV
//! events on ZMQ in vLLM's wire format, [`wire`]).
//! It never imports the router: it must behave like vLLM, not like what kvroute expects.
//! Where it departs from vLLM is written down in `docs/simulator.md`.

mod cluster;
mod engine;
mod lora;
mod offload;
mod pool;
mod profile;
mod prompt;
pub mod server;
mod table;
pub mod wire;

pub use cluster::{Cluster, PREFILL_ID_BIT, PodView, RequestResult, RouteFn};
pub use engine::{Engine, Finished, KvEvent, Medium, RequestId, SimRequest, StepReport};
pub use profile::Profile;
pub use prompt::PromptTokens;
