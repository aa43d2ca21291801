//! The routing benchmark: workloads replayed through a simulated cluster, in virtual time,
//! under each routing policy, with the numbers users choose a router by (TTFT, throughput,
//! prefix-cache hit rate, balance) and the router's own decision time.
//!
//! Policies route through the same scheduler code `kvroute serve` uses; the cluster is
//! `kvroute-sim`'s, which never sees the router's internals.

mod admission;
mod baselines;
mod chart;
mod policy;
mod replicas;
mod report;
mod synthetic;
mod trace;

pub use admission::{AdmissionReport, ClassReport, run_admission, sheddable};
pub use baselines::{DynamoCost, SglangCacheAware, SglangConfig};
pub use chart::{ChartError, render_svg};
pub use policy::{Policy, PolicyRouter, TextPrompts};
pub use replicas::{Deployment, Replicas};
pub use report::{BenchReport, Load, PartReport, PolicyReport, run, run_deployed};
pub use synthetic::Workload;
pub use trace::{BenchError, TraceRequest, arrivals, load_mooncake};
