//! vLLM KV events → the prefix index.
//!
//! Owns the decoded shape of vLLM's `KVEventBatch` ([`KvEvent`]) and the [`Applier`], which
//! turns each endpoint's events into kvroute's own chained block hashes (computed from the
//! events' token ids, so routing never depends on the engine's hash algorithm or seed) and
//! applies them to a shared [`kvroute_index::PrefixIndex`]. It keeps, per endpoint, the map
//! from engine hash to kvroute hash that `BlockRemoved` (engine hashes only) needs.

mod apply;
mod decode;
mod event;
mod follow;
mod guard;
mod msgpack;
mod subscribe;

pub use apply::{Applied, Applier};
pub use decode::{DEFAULT_MAX_BATCH_ENTRIES, DecodeError, EventBatch, decode_batch, sequence};
pub use event::{BlockStored, FirstExtra, KvEvent, Medium};
pub use follow::{CatchUp, Follower, Order};
pub use guard::{DEFAULT_MAX_FRAME_BYTES, FrameTooLarge};
pub use msgpack::MsgpackError;
pub use subscribe::{
    DEFAULT_MAX_REPLAY_BYTES, EventMetrics, IndexCollector, SubscriberConfig, Subscriptions, follow,
};
