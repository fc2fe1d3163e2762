#!/usr/bin/env bash
# Serving benchmark: splitfuse's server and vLLM's CPU server on the same checkpoint, one at a time,
# each driven by `splitfuse bench serve` over loopback, which asks the server for its model's name.
# Writes JSON + PNG per run and overlay plots.
#
#   bash benchmarks/run_serve_all.sh              # results in benchmarks/results/serve-<time>/
#   SKIP_VLLM=1 bash benchmarks/run_serve_all.sh
#   RUNS="fixed mixed" DURATION_S=25 bash benchmarks/run_serve_all.sh   # a subset, shorter points
#
# Runs (per server):
#   fixed   : closed loop, 128 prompt + 128 output tokens, concurrency 1, 8, 32
#   mixed   : closed loop, prompts uniform 16-512, outputs uniform 16-256, concurrency 1, 4, 16, 64
#   poisson : open loop Poisson on the mixed workload, rates 0.5, 1, 2, 4 req/s
# Each sweep point is bounded by --duration-s; effective throughput is reported for r = 2, 4, 6 tok/s.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/serve-$(date +%Y%m%d-%H%M%S)}
PORT=${PORT:-8321}
DURATION_S=${DURATION_S:-45}
RUNS=${RUNS:-fixed mixed poisson}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

wait_healthy() {
  for _ in $(seq 1 300); do
    if curl -sf "$BASE_URL/health" > /dev/null; then return 0; fi
    sleep 1
  done
  echo "server did not become healthy" >&2
  return 1
}

bench() {  # bench LABEL [flags...]
  local label=$1
  shift
  $PYTHON -m splitfuse bench serve --base-url "$BASE_URL" --no-progress \
    --output-dir "$OUT_DIR" --duration-s "$DURATION_S" --request-timeout-s 120 "$@" --label "$label"
}

run_all() {  # run_all SERVER_NAME
  local name=$1 run
  for run in $RUNS; do
    case $run in
      fixed) bench "$name-fixed" --arrival closed --sweep 1,8,32 --num-requests 64 --prompt-len 128 --output-len 128 ;;
      mixed) bench "$name-mixed" --arrival closed --sweep 1,4,16,64 --num-requests 96 \
               --prompt-len uniform:16:512 --output-len uniform:16:256 ;;
      poisson) bench "$name-poisson" --arrival poisson --sweep 0.5,1,2,4 --num-requests 64 \
                 --prompt-len uniform:16:512 --output-len uniform:16:256 ;;
      *) echo "unknown run $run (fixed, mixed, poisson)" >&2; exit 2 ;;
    esac
  done
}

stop_server() {
  kill -INT "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
}

echo "== splitfuse" >&2
$PYTHON -m splitfuse serve "$MODEL" --port "$PORT" --max-num-seqs 64 \
  --max-num-batched-tokens 2048 --log-level warning > "$OUT_DIR/splitfuse-server.log" 2>&1 &
SERVER_PID=$!
trap stop_server EXIT
wait_healthy
run_all splitfuse
stop_server

if [[ "${SKIP_VLLM:-0}" != 1 ]]; then
  echo "== vllm" >&2
  IOMP=$(find "$VLLM_VENV" -name 'libiomp5.so' -print -quit)
  VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_NUM_OF_RESERVED_CPU=0 LD_PRELOAD="$IOMP" \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --port "$PORT" --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --max-num-batched-tokens 2048 \
    > "$OUT_DIR/vllm-server.log" 2>&1 &
  SERVER_PID=$!
  wait_healthy
  run_all vllm
  stop_server
fi
trap - EXIT

for run in $RUNS; do
  files=("$OUT_DIR"/splitfuse-"$run"-*.json)
  if [[ "${SKIP_VLLM:-0}" != 1 ]]; then files+=("$OUT_DIR"/vllm-"$run"-*.json); fi
  $PYTHON -m splitfuse bench plot "${files[@]}" -o "$OUT_DIR/compare-$run.png" || true
done
echo "results in $OUT_DIR" >&2
