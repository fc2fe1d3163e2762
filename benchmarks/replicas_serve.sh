#!/usr/bin/env bash
# Replicas on this machine: `splitfuse serve` as one engine, then as 2 replicas of 1 core each under every
# routing policy, each driven by the same shared-prefix workload (NUM_PREFIXES documents of PREFIX_LEN
# tokens, QUESTIONS questions each, CONCURRENCY closed-loop clients). Prints one line per run: throughput,
# TTFT and TBT p50/p99, and the prefix-cache hit rate the server's /metrics reports over the run.
# Each replica has KV_MIB of KV cache, the single engine twice that (the same memory in all), small
# enough that not every document fits: where a document's blocks live then matters.
#
#   bash benchmarks/replicas_serve.sh               # results in benchmarks/results/replicas-<time>/
#   CONFIGS="one cache-aware" bash benchmarks/replicas_serve.sh
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8324}
NUM_PREFIXES=${NUM_PREFIXES:-16}
QUESTIONS=${QUESTIONS:-12}
PREFIX_LEN=${PREFIX_LEN:-512}
PROMPT_LEN=${PROMPT_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-32}
CONCURRENCY=${CONCURRENCY:-8}
KV_MIB=${KV_MIB:-64}
CONFIGS=${CONFIGS:-one round-robin least-load cache-aware}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/replicas-$(date +%Y%m%d-%H%M%S)}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

hit_rate() {  # the server's prefix-cache counters: "queries hits"
  curl -sf "$BASE_URL/metrics" | awk '/^splitfuse:prefix_cache_queries_total /{q=$2} /^splitfuse:prefix_cache_hits_total /{h=$2} END{print q, h}'
}

run() {  # run LABEL [serve flags...]
  local label=$1 pid before after
  shift
  $PYTHON -m splitfuse serve --model "$MODEL" --port "$PORT" "$@" > "$OUT_DIR/$label-server.log" 2>&1 &
  pid=$!
  wait_healthy "$BASE_URL"
  before=$(hit_rate)
  $PYTHON -m splitfuse bench serve --base-url "$BASE_URL" --no-progress --output-dir "$OUT_DIR" --label "$label" \
    --workload shared-prefix --num-prefixes "$NUM_PREFIXES" --prefix-len "$PREFIX_LEN" \
    --num-requests $((NUM_PREFIXES * QUESTIONS)) --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" \
    --arrival closed --sweep "$CONCURRENCY" --duration-s 600 --request-timeout-s 300 > "$OUT_DIR/$label-bench.log"
  after=$(hit_rate)
  echo "$label $before $after" >> "$OUT_DIR/hit-rates.txt"
  kill "$pid"
  wait "$pid" || true
}

for config in $CONFIGS; do
  case $config in
    one) run one --kv-cache-memory "$((2 * KV_MIB))MiB" ;;
    *) run "$config" --replicas 2 --threads-per-replica 1 --routing "$config" --kv-cache-memory "${KV_MIB}MiB" ;;
  esac
done
$PYTHON - "$OUT_DIR" <<'PY'
import glob, json, sys
out_dir = sys.argv[1]
rates = {}
for line in open(f"{out_dir}/hit-rates.txt"):
    label, q0, h0, q1, h1 = line.split()
    rates[label] = (float(h1) - float(h0)) / max(float(q1) - float(q0), 1.0)
print(f"{'run':<13}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'TBT p50':>9}{'TBT p99':>9}{'hit rate':>10}  (ms)")
for label in rates:
    (path,) = glob.glob(f"{out_dir}/{label}-sweep-*.json")
    m = json.load(open(path))["points"][0]["metrics"]
    print(f"{label:<13}{m['output_tokens_per_s']:>10.1f}{m['ttft_s']['p50'] * 1e3:>10.0f}{m['ttft_s']['p99'] * 1e3:>10.0f}"
          f"{m['tbt_s']['p50'] * 1e3:>9.1f}{m['tbt_s']['p99'] * 1e3:>9.1f}{rates[label]:>10.3f}")
PY
