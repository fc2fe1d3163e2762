#!/usr/bin/env bash
# In-thread vs separate-process engine core, served: `splitfuse serve` on the default model, once without
# and once with --core-process, alternated ROUNDS times, each driven by `splitfuse bench serve` with
# CONCURRENCY closed-loop clients of PROMPT_LEN + OUTPUT_LEN tokens. Prints one line per run
# (throughput, TTFT and TBT p50/p99); the JSON of each run stays in OUT_DIR.
#
#   bash benchmarks/core_process_serve.sh          # results in benchmarks/results/core-process-<time>/
#   ROUNDS=1 NUM_REQUESTS=32 bash benchmarks/core_process_serve.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-8323}
NUM_REQUESTS=${NUM_REQUESTS:-64}
CONCURRENCY=${CONCURRENCY:-32}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
DURATION_S=${DURATION_S:-300}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/core-process-$(date +%Y%m%d-%H%M%S)}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

serve_and_bench() {  # serve_and_bench LABEL [serve flags...]
  local label=$1 pid
  shift
  $PYTHON -m splitfuse serve --model "$MODEL" --port "$PORT" "$@" > "$OUT_DIR/$label-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf "$BASE_URL/health" > /dev/null && break
    kill -0 "$pid" 2> /dev/null || { echo "the $label server exited: see $OUT_DIR/$label-server.log" >&2; return 1; }
    sleep 1
  done
  $PYTHON -m splitfuse bench serve --base-url "$BASE_URL" --no-progress --no-plot --output-dir "$OUT_DIR/$label" \
    --duration-s "$DURATION_S" --request-timeout-s 300 --arrival closed --concurrency "$CONCURRENCY" \
    --num-requests "$NUM_REQUESTS" --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --label "$label" \
    > "$OUT_DIR/$label-bench.log" 2>&1
  kill -INT "$pid"
  wait "$pid" || true
}

for round in $(seq 1 "$ROUNDS"); do
  serve_and_bench "in-thread-$round"
  serve_and_bench "core-process-$round" --core-process
done

$PYTHON - "$OUT_DIR" <<'EOF'
import json, pathlib, sys

print(f"{'run':<16} {'ok':>5} {'out tok/s':>9} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TBT p50':>8} {'TBT p99':>8}  (ms)")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/*.json"), key=lambda p: (p.parent.name[-1], p.parent.name)):
    m = json.loads(path.read_text())["points"][0]["metrics"]
    ms = lambda stats, key: f"{stats[key] * 1e3:.1f}" if stats else "-"
    print(f"{path.parent.name:<16} {m['num_succeeded']:>2}/{m['num_requests']:<2} {m['output_tokens_per_s']:>9.1f} "
          f"{m['requests_per_s']:>6.2f} {ms(m['ttft_s'], 'p50'):>9} {ms(m['ttft_s'], 'p99'):>9} "
          f"{ms(m['tbt_s'], 'p50'):>8} {ms(m['tbt_s'], 'p99'):>8}")
EOF
