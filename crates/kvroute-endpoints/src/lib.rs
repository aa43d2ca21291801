//! The live endpoint registry.
//!
//! Owns who the routable endpoints are right now and how many requests each is serving.
//! Readers on the request path take a lock-free snapshot ([`Registry::snapshot`]); writers
//! (a static list today, Kubernetes discovery later) replace the whole list, and the state of
//! endpoints that stay (their in-flight counts) carries over. It does no I/O of its own
//! beyond reading a static endpoint file when asked, and knows no async runtime.

mod metrics;
mod registry;
mod static_source;

pub use metrics::InFlightCollector;
pub use registry::{EndpointState, InFlightGuard, Registry};
pub use static_source::{StaticSourceError, load_file, parse_list};
