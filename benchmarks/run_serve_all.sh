#!/usr/bin/env bash
# Serving benchmark: splitfuse's server and vLLM's CPU server on the same checkpoint, one at a time,
# each driven by `splitfuse bench serve` over loopback, which asks the server for its model's name.
# Writes JSON + PNG per run and overlay plots.
#
#   bash benchmarks/run_serve_all.sh              # results in benchmarks/results/serve-<time>/
#   SKIP_VLLM=1 bash benchmarks/run_serve_all.sh
#   SERVERS="splitfuse vllm llama" LLAMA_SERVER=/path/llama-server LLAMA_GGUF=model-bf16.gguf bash ...
#   SERVERS=llama LLAMA_LABEL=llama-q4_1 LLAMA_GGUF=model.Q4_1.gguf bash ...   # another file, another label
#   RUNS="fixed mixed" DURATION_S=25 bash benchmarks/run_serve_all.sh   # a subset, shorter points
#
# Runs (per server):
#   fixed   : closed loop, 128 prompt + 128 output tokens, concurrency 1, 8, 32
#   mixed   : closed loop, prompts uniform 16-512, outputs uniform 16-256, concurrency 1, 4, 16, 64
#   poisson : open loop Poisson on the mixed workload, rates 0.5, 1, 2, 4 req/s
# Each sweep point is bounded by --duration-s; effective throughput is reported for r = 2, 4, 6 tok/s.
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
SERVERS=${SERVERS:-splitfuse vllm}
[[ "${SKIP_VLLM:-0}" == 1 ]] && SERVERS=${SERVERS//vllm/}
LLAMA_LABEL=${LLAMA_LABEL:-llama}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/serve-$(date +%Y%m%d-%H%M%S)}
PORT=${PORT:-8321}
DURATION_S=${DURATION_S:-45}
RUNS=${RUNS:-fixed mixed poisson}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

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

start_splitfuse() {
  $PYTHON -m splitfuse serve "$MODEL" --port "$PORT" --max-num-seqs 64 \
    --max-num-batched-tokens 2048 --log-level warning > "$OUT_DIR/splitfuse-server.log" 2>&1 &
  SERVER_PID=$!
}

start_vllm() {
  local iomp
  iomp=$(find "$VLLM_VENV" -name 'libiomp5.so' -print -quit)
  VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_NUM_OF_RESERVED_CPU=0 LD_PRELOAD="$iomp" VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 VLLM_HOST_IP=127.0.0.1 HF_HUB_OFFLINE=1 \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --port "$PORT" --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --max-num-batched-tokens 2048 \
    > "$OUT_DIR/vllm-server.log" 2>&1 &
  SERVER_PID=$!
}

start_llama() {  # llama.cpp's server on a GGUF file: 64 slots of 2,048 tokens, both cores
  "${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}" -m "${LLAMA_GGUF:?set LLAMA_GGUF}" \
    --host 127.0.0.1 --port "$PORT" -t "$(nproc)" -np 64 -c $((64 * 2048)) -b 2048 --log-disable \
    > "$OUT_DIR/$LLAMA_LABEL-server.log" 2>&1 &
  SERVER_PID=$!
}

trap stop_server EXIT
for server in $SERVERS; do
  label=$server
  [[ $server == llama ]] && label=$LLAMA_LABEL
  echo "== $label" >&2
  "start_$server"
  wait_healthy "$BASE_URL"
  run_all "$label"
  stop_server
done
trap - EXIT

for run in $RUNS; do
  files=()
  for server in $SERVERS; do
    label=$server
    [[ $server == llama ]] && label=$LLAMA_LABEL
    files+=("$OUT_DIR/$label-$run"-*.json)
  done
  $PYTHON -m splitfuse bench plot "${files[@]}" -o "$OUT_DIR/compare-$run.png" || true
done
echo "results in $OUT_DIR" >&2
