#!/usr/bin/env bash
# Disaggregated prefill and decode against aggregated serving (docs/benchmarks.md,
# "Disaggregated prefill and decode"): 8 pods serving every request whole, or split 2+6 and
# 4+4 into prefill and decode pods, routed by kvroute's shipped P/D profile
# (deploy/config/kvroute-pd.yaml, kvroute's ttft-pd-decider) and by the same profile with
# upstream's prefix-based-pd-decider; long prompts (long revisits) and short ones
# (multi-turn), 512 output tokens, three seeds, the mean with its min–max.
# Usage: benches/pd.sh [path/to/kvroute]   (default: target/release/kvroute)
set -euo pipefail
bin=${1:-target/release/kvroute}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
upstream=$out/upstream-decider.yaml
sed -e 's/- type: ttft-pd-decider/- type: prefix-based-pd-decider/' -e '/maxTtftRatio/d' \
  -e 's/prefill: ttft-pd-decider/prefill: prefix-based-pd-decider/' \
  deploy/config/kvroute-pd.yaml >"$upstream"
# name profile args...
settings=(
  "long-revisits h100-llama3.1-8b --workload long-revisits --rate 3"
  "long-revisits mi300x-llama3.1-70b-tp4 --workload long-revisits --rate 1"
  "multi-turn h100-llama3.1-8b --workload multi-turn --rate 16"
)
# label args...
modes=(
  "aggregated --prefill-pods 0"
  "pd-2+6 --prefill-pods 2"
  "pd-4+4 --prefill-pods 4"
  "pd-2+6-upstream-decider --prefill-pods 2 --config $upstream"
)
for s in "${settings[@]}"; do
  read -r name profile args <<<"$s"
  for m in "${modes[@]}"; do
    read -r label margs <<<"$m"
    for seed in 1 2 3; do
      # shellcheck disable=SC2086
      "$bin" bench $args $margs --profile "$profile" --pods 8 --output-tokens 512 \
        --requests 2000 --seed "$seed" --policies kvroute-approx \
        --json "$out/$name@$profile@$label@$seed.json" >/dev/null
    done
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    name, profile, label, _ = f.rsplit("/", 1)[1][:-5].split("@")
    rows[(name, profile, label)].extend(json.load(open(f))["policies"])
def cell(v, fmt="{:.0f}"):
    if min(v) == max(v):
        return fmt.format(st.mean(v))
    return f"{fmt.format(st.mean(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"
order = ["aggregated", "pd-2+6", "pd-4+4", "pd-2+6-upstream-decider"]
print("| workload | pods | serving | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT p90 ms | output tok/s |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted(rows, key=lambda k: (k[1], k[0], order.index(k[2]))):
    r = rows[key]
    name, profile, label = key
    print(f"| {name} | {profile.split('-')[0]} | {label} | "
          + " | ".join(cell([p[k] for p in r]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"))
          + f" | {cell([p['tpot_p90_ms'] for p in r], '{:.1f}')} | {cell([p['output_tokens_per_s'] for p in r])} |")
PY
