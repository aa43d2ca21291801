#!/usr/bin/env bash
# Routing quality on workloads that do not flatter (docs/benchmarks.md, "Workloads that do
# not flatter"): every workload on 8B/H100 and 70B/MI300X pods, three seeds each, the
# baselines, kvroute's two default profiles and a greedy oracle; then goodput (the highest
# open-loop rate with TTFT p90 within 2 s) on the 8B pods.
# Usage: benches/quality.sh [path/to/kvroute]   (default: target/release/kvroute)
# SEEDS="1" runs fewer seeds; BLOCK_SIZE=16 simulates vLLM's 16-token blocks in every setting
# (docs/benchmarks.md, "At vLLM's 16-token blocks"; about 3x slower).
# SWEEP=0.5,0.75,1.25,1.5 instead runs every open-loop setting at those factors on its load
# (`--sweep`, first seed only) and lists where kvroute's two profiles lose a percentile to a
# baseline or their p90 is more than 5 % above the oracle's (docs/benchmarks.md, "Against
# load, every workload").
# EXTRA="--context-cost" adds arguments to every run (docs/benchmarks.md, "When attention
# costs per token of context").
set -euo pipefail
bin=${1:-target/release/kvroute}
block_size=${BLOCK_SIZE:-}
read -r -a extra <<<"${EXTRA:-}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
policies=round-robin,sglang-cache-aware,dynamo-kv,kvroute-approx,kvroute,oracle
trace=benches/traces/mooncake_synthetic_trace.jsonl
# name profile args...
settings=(
  "multi-turn h100-llama3.1-8b --workload multi-turn --pods 8 --rate 32"
  "shared-prompts h100-llama3.1-8b --workload shared-prompts --pods 4 --rate 48"
  "doc-qa h100-llama3.1-8b --workload doc-qa --pods 4 --rate 24"
  "long-revisits h100-llama3.1-8b --workload long-revisits --pods 8 --rate 6"
  "sibling-bursts h100-llama3.1-8b --workload sibling-bursts --pods 8 --rate 24"
  "mooncake-closed h100-llama3.1-8b --trace $trace --pods 16 --users 128"
  "many-tenants-closed h100-llama3.1-8b --workload many-tenants --pods 4 --users 128 --requests 4000"
  "long-chats h100-llama3.1-8b --workload long-chats --pods 4 --rate 6"
  "mixed h100-llama3.1-8b --workload mixed --pods 8 --rate 30 --block-size 16"
  "multi-turn mi300x-llama3.1-70b-tp4 --workload multi-turn --pods 8 --rate 12"
  "shared-prompts mi300x-llama3.1-70b-tp4 --workload shared-prompts --pods 4 --rate 16"
  "doc-qa mi300x-llama3.1-70b-tp4 --workload doc-qa --pods 4 --rate 8"
  "long-revisits mi300x-llama3.1-70b-tp4 --workload long-revisits --pods 8 --rate 2"
  "sibling-bursts mi300x-llama3.1-70b-tp4 --workload sibling-bursts --pods 8 --rate 8"
  "mooncake-closed mi300x-llama3.1-70b-tp4 --trace $trace --pods 16 --users 64"
  "many-tenants-closed mi300x-llama3.1-70b-tp4 --workload many-tenants --pods 4 --users 128 --requests 4000"
  "long-chats mi300x-llama3.1-70b-tp4 --workload long-chats --pods 4 --rate 4"
  "mixed mi300x-llama3.1-70b-tp4 --workload mixed --pods 8 --rate 10 --block-size 16"
)
if [[ -n $block_size ]]; then
  for i in "${!settings[@]}"; do
    settings[i]="${settings[i]/ --block-size 16/} --block-size $block_size"
  done
fi
if [[ -n ${SWEEP:-} ]]; then
  seed=${SEEDS:-1}
  for s in "${settings[@]}"; do
    read -r name profile args <<<"$s"
    [[ $args == *--users* ]] && continue # closed loops have no offered load to scale
    echo "== $name $profile"
    # shellcheck disable=SC2086
    "$bin" bench $args "${extra[@]}" --profile "$profile" --seed "${seed%% *}" --policies "$policies" \
      --sweep "$SWEEP" --json "$out/sweep@$name@$profile.json"
    echo "$name $profile" >>"$out/sweeps"
  done
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
baselines = ["round-robin", "sglang-cache-aware", "dynamo-kv"]
print("\n| setting | offered/s | kvroute-approx | kvroute |")
print("|---|---|---|---|")
for setting in open(out + "/sweeps").read().splitlines():
    name, profile = setting.split()
    rows = {}
    for p in json.load(open(f"{out}/sweep@{name}@{profile}.json"))["policies"]:
        # As the table printed them: whole milliseconds.
        rows.setdefault(f"{p['offered_requests_per_s']:.2f}", {})[p["policy"]] = [
            round(p[k]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms")]
    for rate, r in rows.items():
        cells = []
        for me in ("kvroute-approx", "kvroute"):
            lost = []
            for i, pct in enumerate(("p50", "p90", "p99")):
                best = min(baselines, key=lambda b: r[b][i])
                if r[me][i] > r[best][i]:
                    lost.append(f"{pct} {r[me][i]} vs {best} {r[best][i]}")
            if r[me][1] > 1.05 * r["oracle"][1]:
                lost.append(f"p90 {r[me][1]} vs oracle {r['oracle'][1]}")
            cells.append("; ".join(lost) or "leads")
        print(f"| {setting} | {rate} | " + " | ".join(cells) + " |")
PY
  exit 0
fi
for s in "${settings[@]}"; do
  read -r name profile args <<<"$s"
  seeds=${SEEDS:-1 2 3}
  [[ $args == --trace* ]] && seeds=1 # the trace has no seed
  for seed in $seeds; do
    # shellcheck disable=SC2086
    "$bin" bench $args "${extra[@]}" --profile "$profile" --seed "$seed" --policies "$policies" \
      --json "$out/$name@$profile@$seed.json" >/dev/null
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, statistics as st, collections
rows = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    name, profile, _ = f.rsplit("/", 1)[1][:-5].split("@")
    for p in json.load(open(f))["policies"]:
        rows[(name, profile, p["policy"])].append(p)
def cell(v, fmt="{:.0f}"):
    if len(v) == 1 or min(v) == max(v):
        return fmt.format(st.mean(v))
    return f"{fmt.format(st.mean(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"
print("| workload | pods | policy | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | output tok/s | hit rate % |")
print("|---|---|---|---|---|---|---|---|")
order = "round-robin sglang-cache-aware dynamo-kv kvroute-approx kvroute oracle".split()
for key in sorted(rows, key=lambda k: (k[1], k[0], order.index(k[2]))):
    r = rows[key]
    name, profile, policy = key
    print(f"| {name} | {profile.split('-')[0]} | {policy} | "
          + " | ".join(cell([p[k] for p in r]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "output_tokens_per_s"))
          + f" | {cell([100 * p['hit_rate'] for p in r], '{:.1f}')} |")
PY
echo
for s in "${settings[@]}"; do
  read -r name profile args <<<"$s"
  # Goodput is an open-loop figure, taken on the 8B pods.
  [[ $profile == h100* && $args != *--users* ]] || continue
  echo "### $name, $profile"
  # shellcheck disable=SC2086
  "$bin" bench $args "${extra[@]}" --profile "$profile" --requests 2000 --policies "$policies" \
    --goodput-slo-ms 2000 | tail -n +3
done
