#!/usr/bin/env bash
# Active-active cost: kvroute's two default profiles with one router replica and with two,
# on several workloads, profiles and seeds (docs/benchmarks.md, "Active-active replicas").
# Every replica reads the pods' load every 50 simulated ms; "2, own counts" reads none.
# Usage: benches/replicas.sh [path/to/kvroute]   (default: target/release/kvroute)
set -euo pipefail
bin=${1:-target/release/kvroute}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # name args...
  local name=$1; shift
  for seed in 1 2 3; do
    for dep in "1o:" "1:--scrape-ms 50" "2o:--replicas 2" "2:--replicas 2 --scrape-ms 50"; do
      # shellcheck disable=SC2086
      "$bin" bench "$@" --seed "$seed" --policies kvroute-approx,kvroute ${dep#*:} \
        --json "$out/$name.$seed.${dep%%:*}.json" >/dev/null
    done
  done
}
run multi-turn-8b --workload multi-turn --pods 8 --rate 32
run multi-turn-70b --workload multi-turn --pods 8 --rate 12 --profile mi300x-llama3.1-70b-tp4
run shared-prompts-4 --workload shared-prompts --pods 4 --rate 48
run doc-qa-4 --workload doc-qa --pods 4 --rate 24
run mooncake-16 --trace benches/traces/mooncake_synthetic_trace.jsonl --pods 16 --users 128
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    name, seed, dep, _ = f.rsplit("/", 1)[1].rsplit(".", 3)
    for p in json.load(open(f))["policies"]:
        rows[(name, p["policy"], dep)].append(p)
def cell(v, fmt):
    return f"{fmt.format(st.mean(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"
print("| workload | profile | replicas | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | hit rate % | agreement % |")
print("|---|---|---|---|---|---|---|---|")
label = {"1o": "1, own counts", "1": "1", "2o": "2, own counts", "2": "2"}
order = {"1o": 0, "1": 1, "2o": 2, "2": 3}
for (name, pol, dep) in sorted(rows, key=lambda k: (k[0], k[1], order[k[2]])):
    r = rows[(name, pol, dep)]
    agree = [p["agreement"] * 100 for p in r if p.get("agreement") is not None]
    print(f"| {name} | {pol} | {label[dep]} | "
          + " | ".join(cell([p[k] for p in r], "{:.0f}") for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"))
          + f" | {cell([100 * p['hit_rate'] for p in r], '{:.1f}')} | "
          + (cell(agree, "{:.1f}") if agree else "—") + " |")
PY
