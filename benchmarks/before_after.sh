#!/usr/bin/env bash
# No speed lost? Two checkouts of splitfuse measured alternately on the same machine: offline b32 and
# mixed (benchmarks/offline_throughput.py) and served, 32 closed-loop clients of 128 + 128 tokens
# (`splitfuse bench serve`, this checkout's client for both). Each checkout runs its own code
# (PYTHONPATH) and its own copy of the offline script.
#
#   git worktree add /tmp/before <old commit>
#   BEFORE=/tmp/before ROUNDS=2 bash benchmarks/before_after.sh   # results in benchmarks/results/before-after-<time>/
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
AFTER=$(pwd)
BEFORE=${BEFORE:?set BEFORE to a checkout of the commit to compare with}
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
DURATION_S=${DURATION_S:-30}
PORT=${PORT:-8322}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/before-after-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

serve_and_bench() {  # serve_and_bench TREE LABEL
  local tree=$1 label=$2 pid
  PYTHONPATH=$tree $PYTHON -m splitfuse serve --model "$MODEL" --port "$PORT" > "$OUT_DIR/$label-server.log" 2>&1 &
  pid=$!
  wait_healthy "http://127.0.0.1:$PORT"
  PYTHONPATH=$AFTER $PYTHON -m splitfuse bench serve --base-url "http://127.0.0.1:$PORT" --no-progress \
    --output-dir "$OUT_DIR" --duration-s "$DURATION_S" --request-timeout-s 120 --arrival closed --sweep 32 \
    --num-requests 64 --prompt-len 128 --output-len 128 --label "$label-serve32"
  kill "$pid"
  wait "$pid" || true
}

for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    tree=$([[ $side == before ]] && echo "$BEFORE" || echo "$AFTER")
    for workload in b32 mixed; do
      PYTHONPATH=$tree $PYTHON "$tree/benchmarks/offline_throughput.py" --engine splitfuse --model "$MODEL" \
        --workload "$workload" --out "$OUT_DIR/$side-$round-offline-$workload.json"
    done
    serve_and_bench "$tree" "$side-$round"
  done
done
echo "results in $OUT_DIR"
