#!/usr/bin/env bash
# The router's own cost, two builds side by side: the stand-in that answers at once
# (benchmarks/instant_openai_server.py), measured directly, through this checkout's `splitfuse router`
# and through the router of another checkout (OLD_TREE, e.g. a git worktree of an earlier commit),
# alternated ROUNDS times with the same open-loop load (Poisson RATE req/s, 32-token prompts, 4-token
# streamed answers, NUM_REQUESTS a run). Both routers run on this venv's packages.
#
#   git worktree add /tmp/old-router bf536fa && OLD_TREE=/tmp/old-router bash benchmarks/router_overhead_ab.sh
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
OLD_TREE=${OLD_TREE:?give OLD_TREE, a checkout of the router to compare with}
RATE=${RATE:-100}
NUM_REQUESTS=${NUM_REQUESTS:-2000}
ROUNDS=${ROUNDS:-2}
OUT_DIR=${OUT_DIR:-benchmarks/results/router-ab-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

$PYTHON benchmarks/instant_openai_server.py 8431 > "$OUT_DIR/instant.log" 2>&1 &
pids=($!)
$PYTHON -m splitfuse router --backend http://127.0.0.1:8431 --port 8432 --routing round-robin > "$OUT_DIR/new.log" 2>&1 &
pids+=($!)
(cd "$OLD_TREE" && PYTHONPATH=$PWD exec $PYTHON -m splitfuse router --backend http://127.0.0.1:8431 --port 8433 \
  --routing round-robin) > "$OUT_DIR/old.log" 2>&1 &
pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for port in 8431 8432 8433; do wait_healthy "http://127.0.0.1:$port"; done

for round in $(seq 1 "$ROUNDS"); do
  for side in direct:8431 new:8432 old:8433; do
    $PYTHON -m splitfuse bench serve --base-url "http://127.0.0.1:${side#*:}" --no-progress --output-dir "$OUT_DIR" \
      --label "${side%%:*}-$round" --num-requests "$NUM_REQUESTS" --prompt-len 32 --output-len 4 \
      --arrival poisson --sweep "$RATE" --duration-s 600 --request-timeout-s 120 > "$OUT_DIR/${side%%:*}-$round-bench.log"
  done
done
$PYTHON - "$OUT_DIR" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*-sweep-*.json")):
    m = json.load(open(path))["points"][0]["metrics"]
    label = path.rsplit("/", 1)[1].split("-sweep-")[0]
    print(f"{label:<10} ok {m['num_succeeded']}/{m['num_requests']} TTFT p50 {m['ttft_s']['p50'] * 1e3:.2f} ms "
          f"p99 {m['ttft_s']['p99'] * 1e3:.2f} ms")
PY
