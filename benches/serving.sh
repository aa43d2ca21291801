#!/usr/bin/env bash
# LoRA affinity and KV offloading tiers (docs/benchmarks.md, "LoRA affinity" and "KV
# offloading tiers"): each setting over seeds 1-3, ranges min-max over the seeds.
# Usage: benches/serving.sh [path/to/kvroute]   (default: target/release/kvroute)
set -euo pipefail
bin=${1:-target/release/kvroute}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# name args...
settings=(
  "lora@32 --workload lora --max-loras 4 --pods 8 --rate 32 --requests 4000 --scrape-ms 50 --policies round-robin,kvroute-approx,kvroute-lora"
  "lora@48 --workload lora --max-loras 4 --pods 8 --rate 48 --requests 4000 --scrape-ms 50 --policies round-robin,kvroute-approx,kvroute-lora"
  "gpu-only --workload long-revisits --pods 8 --rate 6 --requests 2000 --policies round-robin,kvroute-approx,kvroute"
  "cpu-tier --workload long-revisits --pods 8 --rate 6 --requests 2000 --cpu-offload-tokens 1000000 --policies round-robin,kvroute-approx,kvroute"
)
for s in "${settings[@]}"; do
  read -r name args <<<"$s"
  for seed in 1 2 3; do
    # shellcheck disable=SC2086
    "$bin" bench $args --seed "$seed" --json "$out/$name@$seed.json" >/dev/null
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, collections
rows = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    name = f.rsplit("/", 1)[1][:-5].rsplit("@", 1)[0]
    for p in json.load(open(f))["policies"]:
        rows[(name, p["policy"])].append(p)
def rng(v, fmt="{:,.0f}"):
    lo, hi = fmt.format(min(v)), fmt.format(max(v))
    return lo if lo == hi else f"{lo}–{hi}"
order = ["lora@32", "lora@48", "gpu-only", "cpu-tier"]
pol = ["round-robin", "kvroute-approx", "kvroute-lora", "kvroute"]
print("| setting | policy | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT ms | output tok/s | hit rate % |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted(rows, key=lambda k: (order.index(k[0]), pol.index(k[1]))):
    r = rows[key]
    print(f"| {key[0]} | {key[1]} | " + " | ".join(rng([p[k] for p in r]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"))
          + f" | {rng([p['tpot_mean_ms'] for p in r], '{:.1f}')} | {rng([p['output_tokens_per_s'] for p in r])} | {rng([100 * p['hit_rate'] for p in r], '{:.1f}')} |")
PY
