//! Faithful re-implementations of the peers' routing rules, as named baselines. Each follows
//! its project's public code and defaults (sources in `docs/benchmarks.md`, "Baselines");
//! where the bench has to translate (text into token ids), the module says how.

mod dynamo;
mod sglang;

pub use dynamo::DynamoCost;
pub use sglang::{SglangCacheAware, SglangConfig};
