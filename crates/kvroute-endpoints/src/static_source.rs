use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use kvroute_core::{Endpoint, EndpointId};
use serde::Deserialize;

/// Why a static endpoint list could not be used; nothing is applied when any entry is bad.
#[derive(Debug, thiserror::Error)]
pub enum StaticSourceError {
    /// An entry is not `ip:port` (or `name=ip:port`).
    #[error("endpoint {entry:?} is not ip:port or name=ip:port: {reason}")]
    BadEntry {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two entries share a name or an address.
    #[error("endpoint {0:?} is listed twice")]
    Duplicate(String),
    /// The list names no endpoint.
    #[error("the endpoint list is empty")]
    Empty,
    /// The file could not be read.
    #[error("reading endpoint file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not the documented YAML shape.
    #[error("parsing endpoint file {path}: {source}")]
    Yaml {
        /// The file.
        path: String,
        /// The cause.
        source: serde_yaml_ng::Error,
    },
}

/// Parses `--endpoints`: comma-separated `ip:port` or `name=ip:port` entries.
pub fn parse_list(list: &str) -> Result<Vec<Endpoint>, StaticSourceError> {
    let entries = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (name, addr) = match entry.split_once('=') {
                Some((name, addr)) => (Some(name.trim()), addr.trim()),
                None => (None, entry),
            };
            let address = parse_addr(entry, addr)?;
            Ok(FileEndpoint {
                name: name.map(str::to_owned),
                address,
                labels: BTreeMap::new(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    build(entries)
}

/// Loads a YAML endpoint file:
///
/// ```yaml
/// endpoints:
///   - address: 127.0.0.1:8001   # required, ip:port
///     name: pod-a               # optional, defaults to the address
///     labels: {zone: a}         # optional
/// ```
pub fn load_file(path: &Path) -> Result<Vec<Endpoint>, StaticSourceError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| StaticSourceError::Io {
        path: shown.clone(),
        source,
    })?;
    let file: EndpointFile =
        serde_yaml_ng::from_str(&text).map_err(|source| StaticSourceError::Yaml {
            path: shown,
            source,
        })?;
    let entries = file
        .endpoints
        .into_iter()
        .map(|e| {
            let address = parse_addr(&e.address, &e.address)?;
            Ok(FileEndpoint {
                name: e.name,
                address,
                labels: e.labels,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    build(entries)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

struct FileEndpoint {
    name: Option<String>,
    address: SocketAddr,
    labels: BTreeMap<String, String>,
}

fn parse_addr(entry: &str, addr: &str) -> Result<SocketAddr, StaticSourceError> {
    addr.parse()
        .map_err(|e: std::net::AddrParseError| StaticSourceError::BadEntry {
            entry: entry.to_owned(),
            reason: e.to_string(),
        })
}

fn build(entries: Vec<FileEndpoint>) -> Result<Vec<Endpoint>, StaticSourceError> {
    if entries.is_empty() {
        return Err(StaticSourceError::Empty);
    }
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    entries
        .into_iter()
        .map(|e| {
            let name = e.name.unwrap_or_else(|| e.address.to_string());
            if name.is_empty() {
                return Err(StaticSourceError::BadEntry {
                    entry: e.address.to_string(),
                    reason: "empty name".into(),
                });
            }
            if !names.insert(name.clone()) {
                return Err(StaticSourceError::Duplicate(name));
            }
            if !addrs.insert(e.address) {
                return Err(StaticSourceError::Duplicate(e.address.to_string()));
            }
            Ok(Endpoint {
                id: EndpointId::new(name),
                address: e.address,
                labels: e.labels,
                rank: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_accepts_addresses_and_names() {
        let eps = parse_list(" 127.0.0.1:8001, pod-b=127.0.0.1:8002 ,[::1]:9000,").unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].id.as_str(), "127.0.0.1:8001");
        assert_eq!(eps[1].id.as_str(), "pod-b");
        assert_eq!(eps[2].address.port(), 9000);
    }

    #[test]
    fn list_rejects_bad_entries() {
        for (list, want) in [
            ("", "empty"),
            (" , ", "empty"),
            ("localhost:80", "not ip:port"),
            ("127.0.0.1", "not ip:port"),
            ("127.0.0.1:1,127.0.0.1:1", "listed twice"),
            ("a=127.0.0.1:1,a=127.0.0.1:2", "listed twice"),
            ("=127.0.0.1:1", "empty name"),
        ] {
            let err = parse_list(list).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }

    #[test]
    fn file_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("kvroute-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "endpoints:\n  - address: 127.0.0.1:8001\n    name: a\n    labels: {zone: z1}\n  - address: 127.0.0.1:8002\n",
        )
        .unwrap();
        let eps = load_file(&good).unwrap();
        assert_eq!(eps[0].labels.get("zone").map(String::as_str), Some("z1"));
        assert_eq!(eps[1].id.as_str(), "127.0.0.1:8002");

        let typo = dir.join("typo.yaml");
        std::fs::write(&typo, "endpoints:\n  - adress: 127.0.0.1:8001\n").unwrap();
        assert!(load_file(&typo).unwrap_err().to_string().contains("adress"));

        let missing = dir.join("missing.yaml");
        assert!(matches!(
            load_file(&missing),
            Err(StaticSourceError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
