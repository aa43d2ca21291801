#!/usr/bin/env bash
# Pools of unlike pods (docs/benchmarks.md, "Learning each pod's speed"): 8 pods of which 4
# run 3x slower (an older GPU beside newer ones), kvroute's profile without events as
# shipped (`ttft-scorer` learns each pod's speed) and with `learnSpeed: false`, round-robin
# and SGLang's policy, three seeds; then the same two on a pool of like pods (the Mooncake
# closed loop).
# Usage: benches/heterogeneous.sh [path/to/kvroute]   (default: target/release/kvroute)
set -euo pipefail
bin=${1:-target/release/kvroute}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
blind=$out/blind.yaml
sed 's/    producers: \[approx-prefix-cache-producer\]/    producers: [approx-prefix-cache-producer]\n    learnSpeed: false/' \
  deploy/config/kvroute.yaml >"$blind"
grep -q 'learnSpeed: false' "$blind"
settings=(
  "long-revisits --workload long-revisits --rate 4 --pods 8 --slow-pods 4 --slowdown 3 --requests 3000"
  "multi-turn --workload multi-turn --rate 24 --pods 8 --slow-pods 4 --slowdown 3 --requests 3000"
  "doc-qa --workload doc-qa --rate 16 --pods 8 --slow-pods 4 --slowdown 3 --requests 3000"
)
for s in "${settings[@]}"; do
  read -r name args <<<"$s"
  for seed in 1 2 3; do
    # shellcheck disable=SC2086
    "$bin" bench $args --seed "$seed" --policies round-robin,sglang-cache-aware,kvroute-approx \
      --json "$out/$name@shipped@$seed.json" >/dev/null
    # shellcheck disable=SC2086
    "$bin" bench $args --seed "$seed" --policies kvroute-approx --config "$blind" \
      --json "$out/$name@blind@$seed.json" >/dev/null
  done
done
trace=benches/traces/mooncake_synthetic_trace.jsonl
"$bin" bench --trace "$trace" --pods 16 --users 128 --policies kvroute-approx \
  --json "$out/like-pods-mooncake@shipped@1.json" >/dev/null
"$bin" bench --trace "$trace" --pods 16 --users 128 --policies kvroute-approx --config "$blind" \
  --json "$out/like-pods-mooncake@blind@1.json" >/dev/null
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    name, mode, _ = f.rsplit("/", 1)[1][:-5].split("@")
    for p in json.load(open(f))["policies"]:
        label = p["policy"] + (", learnSpeed: false" if mode == "blind" else "")
        rows[(name, label)].append(p)
def cell(v, fmt="{:.0f}"):
    if min(v) == max(v):
        return fmt.format(st.mean(v))
    return f"{fmt.format(st.mean(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"
order = ["long-revisits", "multi-turn", "doc-qa", "like-pods-mooncake"]
pol = ["round-robin", "sglang-cache-aware", "kvroute-approx, learnSpeed: false", "kvroute-approx"]
print("| workload | policy | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | output tok/s | hit rate % |")
print("|---|---|---|---|---|---|---|")
for key in sorted(rows, key=lambda k: (order.index(k[0]), pol.index(k[1]))):
    r = rows[key]
    print(f"| {key[0]} | {key[1]} | " + " | ".join(cell([p[k] for p in r]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "output_tokens_per_s"))
          + f" | {cell([100 * p['hit_rate'] for p in r], '{:.1f}')} |")
PY
