use std::path::Path;
use std::sync::Arc;

use kvroute_sim::{PromptTokens, SimRequest};
use serde::Deserialize;

/// Tokens per Mooncake `hash_ids` entry: requests with equal ids at a position share those
/// 512 tokens.
pub(crate) const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// Why a workload could not be loaded; nothing runs on a partly read trace.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The file could not be read.
    #[error("reading trace {path}: {source}")]
    Io {
        /// The trace.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not a Mooncake request.
    #[error("trace {path}, line {line}: {source}")]
    Line {
        /// The trace.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The cause.
        source: serde_json::Error,
    },
    /// The trace has no request.
    #[error("trace {0} has no request")]
    Empty(String),
}

/// One request of a Mooncake-format trace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TraceRequest {
    /// Arrival, milliseconds from the trace's start.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Tokens to generate.
    pub output_length: usize,
    /// Content ids of the prompt's 512-token blocks.
    pub hash_ids: Vec<u64>,
    /// The LoRA adapter it names (`adapter-N`), if any: not in Mooncake's format, read
    /// when present.
    #[serde(default)]
    pub adapter: Option<u32>,
    /// Which part of a mixed synthetic workload it belongs to (`Workload::Mixed`'s index),
    /// so a report can give each its own figures; never read from a trace.
    #[serde(skip)]
    pub part: Option<u8>,
}

/// Reads a Mooncake trace: one JSON object per line (`timestamp`, `input_length`,
/// `output_length`, `hash_ids`); blank lines are skipped, anything else malformed fails
/// the load with its line number.
pub fn load_mooncake(path: &Path) -> Result<Vec<TraceRequest>, BenchError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let req: TraceRequest = serde_json::from_str(line).map_err(|source| BenchError::Line {
            path: shown.clone(),
            line: i + 1,
            source,
        })?;
        out.push(req);
    }
    if out.is_empty() {
        return Err(BenchError::Empty(shown));
    }
    out.sort_by_key(|r| r.timestamp);
    Ok(out)
}

/// The model name requests for adapter `n` send (and the simulated pods serve).
pub(crate) fn adapter_name(n: u32) -> String {
    format!("adapter-{n}")
}

/// The trace as simulator arrivals: time divided by `speedup`, repeated `copies` times back
/// to back (each copy's content ids shifted, so copies share nothing), token ids derived
/// from the content ids (equal ids, equal tokens).
pub fn arrivals(
    trace: &[TraceRequest],
    speedup: f64,
    copies: usize,
) -> impl Iterator<Item = (u64, SimRequest)> + '_ {
    let span_ms = trace.last().map_or(0, |r| r.timestamp) + 1;
    let speedup = if speedup > 0.0 { speedup } else { 1.0 };
    (0..copies.max(1)).flat_map(move |c| {
        trace.iter().map(move |r| {
            let ids: Arc<[u64]> = r
                .hash_ids
                .iter()
                .map(|i| i.wrapping_add(c as u64 * 1_000_000_000))
                .collect();
            let t_us = ((r.timestamp + c as u64 * span_ms) as f64 * 1000.0 / speedup) as u64;
            (
                t_us,
                SimRequest {
                    id: 0,
                    prompt: PromptTokens::Synthetic {
                        ids,
                        unit: MOONCAKE_BLOCK_TOKENS,
                        len: r.input_length,
                    },
                    max_tokens: r.output_length.max(1),
                    lora: r.adapter.map(|a| Arc::from(adapter_name(a))),
                },
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_lines_and_reports_bad_ones_by_number() {
        let dir = std::env::temp_dir().join(format!("kvroute-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [1, 2]}\n\n{\"timestamp\": 1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [3]}\n",
        )
        .unwrap();
        let t = load_mooncake(&good).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].timestamp, 1, "sorted by arrival");
        let a: Vec<_> = arrivals(&t, 2.0, 2).collect();
        assert_eq!(a.len(), 4);
        assert_eq!(a[1].0, 2_500, "5 ms at speedup 2");
        assert_eq!(
            a[2].0, 3_500,
            "the second copy starts one span (6 ms) later: (1 + 6) / 2"
        );
        assert_ne!(a[0].1.prompt, a[2].1.prompt, "copies share no content");

        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"timestamp\": 1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [3]}\n{oops\n").unwrap();
        assert!(
            load_mooncake(&bad)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
        let empty = dir.join("empty.jsonl");
        std::fs::write(&empty, "\n").unwrap();
        assert!(matches!(load_mooncake(&empty), Err(BenchError::Empty(_))));
        assert!(matches!(
            load_mooncake(&dir.join("none")),
            Err(BenchError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
