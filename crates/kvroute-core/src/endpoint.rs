use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// Stable name of one routable endpoint (a pod's target port, or a static entry), so state
/// such as in-flight counts survives the endpoint list being replaced.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct EndpointId(Arc<str>);

impl EndpointId {
    /// Wraps any name; names are compared byte for byte.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `other` is a clone of this very id (one shared name), which says it is equal
    /// without comparing names; an equal name allocated apart is not.
    pub fn is(&self, other: &EndpointId) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The address of the shared name: a key every clone of this id shares, for a lookup
    /// on the hot path that must not compare names byte by byte.
    pub fn addr(&self) -> usize {
        Arc::as_ptr(&self.0).cast::<u8>() as usize
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One model-server endpoint as the data plane reaches it: Envoy is told `address` verbatim.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Endpoint {
    /// Identity that outlives address changes of the list it came from.
    pub id: EndpointId,
    /// `ip:port` that Envoy's original-destination cluster connects to.
    pub address: SocketAddr,
    /// Labels of the pod (or static entry), for filters that select by label.
    pub labels: BTreeMap<String, String>,
    /// Data-parallel rank within its pod (the index of its target port; 0 for a pod that
    /// serves on one port): vLLM publishes rank r's KV events on the events port + r.
    pub rank: u16,
}

impl Endpoint {
    /// An endpoint named after its address, with no labels: what a static list gives.
    pub fn from_address(address: SocketAddr) -> Self {
        Self {
            id: EndpointId::new(address.to_string()),
            address,
            labels: BTreeMap::new(),
            rank: 0,
        }
    }
}
