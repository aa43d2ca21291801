//! The built-in plugins. Type names and parameters are upstream's wherever the concept is
//! the same; kvroute's own (`load-scorer`, `ttft-scorer`) have their own names.

pub(crate) mod filters;
pub(crate) mod handler;
pub(crate) mod load;
pub(crate) mod pickers;
pub(crate) mod precise;
pub(crate) mod prefix;
pub(crate) mod replicate;
pub(crate) mod ttft;

use crate::Plugin;

/// A plugin of upstream's that plays no part in a scheduling cycle: the data layer's
/// (`metrics-data-source`, `core-metrics-extractor`; kvroute reads the pods' metrics itself,
/// its scraper configured by flags) and the saturation detector (`utilization-detector`,
/// read by admission: `EndpointPickerConfig::admission`).
#[derive(Debug)]
pub(crate) struct DataSource(pub(crate) &'static str);

impl Plugin for DataSource {
    fn type_name(&self) -> &'static str {
        self.0
    }
}
pub(crate) mod active;
pub(crate) mod pod_load;
pub(crate) mod session;
