//! The live endpoint registry, and what kvroute knows of each endpoint's load and health.
//!
//! Owns who the routable endpoints are right now and how loaded and healthy each is: the
//! requests kvroute routed there (in flight, prefill backlog), what the pod's own `/metrics`
//! last said ([`PodLoad`], read by the [`Scraper`]) and passive health ([`Health`]: failed
//! requests degrade, then eject, an endpoint). Readers on the request path take a
//! lock-free snapshot ([`Registry::snapshot`]) and read atomics and `ArcSwap`s; writers (a
//! static list today, Kubernetes discovery later) replace the whole list, and the state of
//! endpoints that stay carries over; [`EndpointsListener`]s hear who left. The only I/O is
//! the scraper's HTTP (on the caller's tokio runtime) and reading a static endpoint file.

mod exposition;
mod health;
mod load;
mod metrics;
mod pool_metrics;
mod registry;
mod scrape;
mod speed;
mod static_source;

pub use exposition::SyntaxError;
pub use health::{Health, HealthConfig};
pub use load::{FreshLoad, LoadError, PodLoad, PromptTotals, Scraped, parse_load};
pub use metrics::{InFlightCollector, LoadCollector};
pub use pool_metrics::PoolCollector;
pub use registry::{EndpointState, EndpointsListener, InFlightGuard, Registry};
pub use scrape::{ScrapeConfig, ScrapeConfigError, ScrapeError, ScrapeMetrics, Scraper};
pub use static_source::{StaticSourceError, load_file, parse_list};
