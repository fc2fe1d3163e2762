#!/usr/bin/env bash
# Failover under load: `splitfuse serve --replicas 2 --threads-per-replica 1`, a closed-loop run, and (second
# run) one replica's process killed KILL_AFTER_S seconds in. Prints requests ok / failed and E2E p50/p99
# of both runs, so every request is accounted for and the latency cost is visible.
#
#   bash benchmarks/replica_failover.sh            # results in benchmarks/results/failover-<time>/
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8325}
NUM_REQUESTS=${NUM_REQUESTS:-64}
CONCURRENCY=${CONCURRENCY:-8}
KILL_AFTER_S=${KILL_AFTER_S:-6}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/failover-$(date +%Y%m%d-%H%M%S)}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

run() {  # run LABEL KILL(0|1)
  local label=$1 kill_one=$2 pid bench victim
  $PYTHON -m splitfuse serve --model "$MODEL" --port "$PORT" --replicas 2 --threads-per-replica 1 \
    --routing least-load > "$OUT_DIR/$label-server.log" 2>&1 &
  pid=$!
  wait_healthy "$BASE_URL"
  $PYTHON -m splitfuse bench serve --base-url "$BASE_URL" --no-progress --output-dir "$OUT_DIR" --label "$label" \
    --num-requests "$NUM_REQUESTS" --prompt-len 128 --output-len 128 --arrival closed --sweep "$CONCURRENCY" \
    --duration-s 600 --request-timeout-s 300 > "$OUT_DIR/$label-bench.log" &
  bench=$!
  if [[ $kill_one == 1 ]]; then
    sleep "$KILL_AFTER_S"
    # The replicas are the server's spawned children (not its multiprocessing resource tracker).
    victim=$(ps --ppid "$pid" -o pid=,args= | grep "spawn_main" | grep -v resource_tracker | head -1 | awk '{print $1}')
    echo "killing replica process $victim" | tee -a "$OUT_DIR/$label-bench.log"
    kill -9 "$victim"
  fi
  wait "$bench"
  curl -sf "$BASE_URL/health" >> "$OUT_DIR/$label-bench.log" || true
  kill "$pid"
  wait "$pid" || true
}

run no-failure 0
run one-killed 1
$PYTHON - "$OUT_DIR" <<'PY'
import glob, json, sys
for label in ("no-failure", "one-killed"):
    (path,) = glob.glob(f"{sys.argv[1]}/{label}-sweep-*.json")
    m = json.load(open(path))["points"][0]["metrics"]
    print(f"{label:<12} ok {m['num_succeeded']}/{m['num_requests']} errors {m['num_errors']} timeouts {m['num_timeouts']} "
          f"out tok/s {m['output_tokens_per_s']:.1f} E2E p50 {m['e2e_s']['p50']:.2f} s p99 {m['e2e_s']['p99']:.2f} s")
PY
