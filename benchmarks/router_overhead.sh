#!/usr/bin/env bash
# The router's own cost: one `splitfuse serve`, measured directly and through `splitfuse router` in front
# of it, alternated ROUNDS times, with the same open-loop load (Poisson RATE req/s of short requests). The
# difference in TTFT is what the extra hop adds. BACKEND=instant puts benchmarks/instant_openai_server.py
# (answers at once, no model) behind the router instead, so the router's share is not lost in the model's.
#
#   bash benchmarks/router_overhead.sh             # results in benchmarks/results/router-<time>/
#   BACKEND=instant RATE=100 NUM_REQUESTS=2000 bash benchmarks/router_overhead.sh
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
SERVE_PORT=${SERVE_PORT:-8326}
ROUTER_PORT=${ROUTER_PORT:-8327}
RATE=${RATE:-10}
NUM_REQUESTS=${NUM_REQUESTS:-200}
ROUNDS=${ROUNDS:-2}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/router-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

if [[ ${BACKEND:-splitfuse} == instant ]]; then
  $PYTHON benchmarks/instant_openai_server.py "$SERVE_PORT" > "$OUT_DIR/server.log" 2>&1 &
else
  $PYTHON -m splitfuse serve --model "$MODEL" --port "$SERVE_PORT" > "$OUT_DIR/server.log" 2>&1 &
fi
serve_pid=$!
$PYTHON -m splitfuse router --backend "http://127.0.0.1:$SERVE_PORT" --port "$ROUTER_PORT" --routing round-robin \
  > "$OUT_DIR/router.log" 2>&1 &
router_pid=$!
trap 'kill $serve_pid $router_pid 2>/dev/null || true' EXIT
wait_healthy "http://127.0.0.1:$SERVE_PORT"
wait_healthy "http://127.0.0.1:$ROUTER_PORT"

for round in $(seq 1 "$ROUNDS"); do
  for side in direct router; do
    port=$([[ $side == direct ]] && echo "$SERVE_PORT" || echo "$ROUTER_PORT")
    $PYTHON -m splitfuse bench serve --base-url "http://127.0.0.1:$port" --no-progress --output-dir "$OUT_DIR" \
      --label "$side-$round" ${BENCH_MODEL:+--model "$BENCH_MODEL"} --num-requests "$NUM_REQUESTS" --prompt-len 32 --output-len 4 --arrival poisson \
      --sweep "$RATE" --duration-s 600 --request-timeout-s 120 > "$OUT_DIR/$side-$round-bench.log"
  done
done
$PYTHON - "$OUT_DIR" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*-sweep-*.json")):
    m = json.load(open(path))["points"][0]["metrics"]
    label = path.rsplit("/", 1)[1].split("-sweep-")[0]
    print(f"{label:<10} ok {m['num_succeeded']}/{m['num_requests']} TTFT p50 {m['ttft_s']['p50'] * 1e3:.1f} ms "
          f"p99 {m['ttft_s']['p99'] * 1e3:.1f} ms  E2E p50 {m['e2e_s']['p50'] * 1e3:.1f} ms")
PY
