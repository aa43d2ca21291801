//! The index of KV-cache blocks: which endpoint holds which prefix, and in which tier.
//!
//! Owns [`PrefixIndex`] (exact: fed by KV events or anything that knows what an endpoint
//! holds), [`ApproxIndex`] (a guess built from routing decisions, bounded per endpoint by
//! LRU and TTL) and [`Shared`], the lock that lets request handlers read while writers
//! apply. Keys are chained [`BlockHash`]es, so a hash names a whole prefix and the set of
//! stored hashes is a tree of prefixes (see `docs/index.md`). It does no I/O and knows no
//! async runtime; time is passed in by the caller.

mod approx;
mod hasher;
mod holders;
mod index;
mod shared;
mod table;

pub use approx::{ApproxIndex, DEFAULT_LRU_CAPACITY};
pub use hasher::{KeyHasher, KeyState, Map as HashMap64, Set as HashSet64};
pub use index::{EndpointMatch, MatchScratch, PrefixIndex, Tier};
pub use kvroute_core::BlockHash;
pub use shared::{Shared, WRITE_BATCH_BLOCKS};
