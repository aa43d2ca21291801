//! Envoy ext_proc v3 server speaking the Gateway API Inference Extension's endpoint-picker
//! protocol.
//!
//! Owns the conversation with Envoy for each HTTP request: reading headers and body in every
//! body-processing mode, asking the scheduler once the body is complete, and answering with
//! the destination header, the `envoy.lb` metadata, the body handed back as the mode
//! requires, or a local reply (400, 413, 429, 503). Admission (shedding sheddable work while
//! the pool is saturated, or holding requests in flow-control bands) happens at the
//! request's headers, before any of this. On the response path it passes everything
//! through and reads token usage for accounting. It never touches Kubernetes and never
//! blocks: endpoints come from `kvroute-endpoints`, choices from `kvroute-scheduler`.

mod admission;
mod metrics;
pub mod protocol;
mod server;
mod stream;
mod tls;
mod upstream;
pub mod usage;
pub mod wire;

pub use admission::{
    Admission, AdmissionCollector, Admit, Admitted, Dropped, UpstreamAdmissionCollector, Waiter,
};
/// Envoy's body send modes, as [`ExtProcConfig::assumed_body_mode`] names them.
pub use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
pub use metrics::{Metrics, Outcome};
pub use server::{ExtProcServer, ExtProcService, ResponseStream, incoming};
pub use stream::{
    DEFAULT_DECISION_QUEUE, DEFAULT_INLINE_DECISION_BYTES, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_STREAMS, DEFAULT_REQUEST_TIMEOUT, DecisionJob, DecisionOutcome, ExtProcConfig,
    ExtProcError, PARSE_INLINE_BYTES, Router, StreamState, default_decision_threads,
};
pub use tls::{Tls, TlsConn, TlsError, TlsSettings, TlsVersion};
pub use upstream::{MAX_MODEL_LABELS, UpstreamMetrics};
