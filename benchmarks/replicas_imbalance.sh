#!/usr/bin/env bash
# Imbalanced load on replicas: `splitfuse serve --replicas 2 --threads-per-replica 1` under each routing
# policy, replaying two traces of the same requests at the same Poisson arrival times (RATE req/s):
#
#   balanced    long (LONG_LEN-token prompts) and short (SHORT_LEN) requests in a random order
#   imbalanced  long, short, long, short, ...: every long prompt comes right after a short one, so a
#               policy that takes turns sends every long prompt to the same replica
#
# Both traces hold NUM_REQUESTS requests, half long, all with OUTPUT_LEN output tokens. Prints p50 / p99
# TTFT per policy and trace, and the imbalanced / balanced p99 TTFT ratio (the issue's bar: <= 1.5 for
# least-load and cache-aware).
#
#   bash benchmarks/replicas_imbalance.sh            # results in benchmarks/results/imbalance-<time>/
#   POLICIES="round-robin least-load" RATE=2 bash benchmarks/replicas_imbalance.sh
#   MODEL=demo-random SERVE_ARGS="--dtype float32" RATE=0.7 LONG_LEN=512 OUTPUT_LEN=8 NUM_REQUESTS=60 bash ...
set -euo pipefail

cd "$(dirname "$0")/.."
source benchmarks/common.sh
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8328}
RATE=${RATE:-2}
NUM_REQUESTS=${NUM_REQUESTS:-120}
LONG_LEN=${LONG_LEN:-1024}
SHORT_LEN=${SHORT_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-16}
SEED=${SEED:-0}
POLICIES=${POLICIES:-round-robin least-load cache-aware}
SERVE_ARGS=${SERVE_ARGS:-}  # more `splitfuse serve` flags, e.g. "--dtype float32"
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/imbalance-$(date +%Y%m%d-%H%M%S)}
BASE_URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT_DIR"

$PYTHON - "$OUT_DIR" "$RATE" "$NUM_REQUESTS" "$LONG_LEN" "$SHORT_LEN" "$OUTPUT_LEN" "$SEED" <<'PY'
import json, random, sys
out_dir, rate, n, long_len, short_len, output_len, seed = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:])
rng = random.Random(seed)
times, t = [], 0.0
for _ in range(n):
    times.append(round(t, 6))
    t += rng.expovariate(rate)
imbalanced = [short_len if i % 2 == 0 else long_len for i in range(n)]
balanced = imbalanced[:]
rng.shuffle(balanced)
for name, lengths in (("balanced", balanced), ("imbalanced", imbalanced)):
    with open(f"{out_dir}/{name}.jsonl", "w") as handle:
        for time_s, prompt_len in zip(times, lengths):
            handle.write(json.dumps({"timestamp": time_s, "prompt_tokens": prompt_len,
                                     "output_tokens": output_len}) + "\n")
PY

for policy in $POLICIES; do
  $PYTHON -m splitfuse serve --model "$MODEL" --port "$PORT" --replicas 2 --threads-per-replica 1 \
    --routing "$policy" $SERVE_ARGS > "$OUT_DIR/$policy-server.log" 2>&1 &
  pid=$!
  wait_healthy "$BASE_URL"
  for trace in balanced imbalanced; do
    $PYTHON -m splitfuse bench serve --base-url "$BASE_URL" --no-progress --output-dir "$OUT_DIR" \
      --label "$policy-$trace" --seed "$SEED" --arrival trace --trace "$OUT_DIR/$trace.jsonl" \
      --duration-s 600 --request-timeout-s 300 > "$OUT_DIR/$policy-$trace-bench.log"
  done
  kill "$pid"
  wait "$pid" || true
done
$PYTHON - "$OUT_DIR" $POLICIES <<'PY'
import glob, json, sys
out_dir, policies = sys.argv[1], sys.argv[2:]
print(f"{'policy':<13}{'balanced p50 / p99':>22}{'imbalanced p50 / p99':>24}{'p99 ratio':>11}  (TTFT, ms)")
for policy in policies:
    ttft = {}
    for trace in ("balanced", "imbalanced"):
        (path,) = glob.glob(f"{out_dir}/{policy}-{trace}-*-*.json")
        m = json.load(open(path))["points"][0]["metrics"]
        assert m["num_succeeded"] == m["num_requests"], (policy, trace, m["num_succeeded"], m["num_requests"])
        ttft[trace] = (m["ttft_s"]["p50"] * 1e3, m["ttft_s"]["p99"] * 1e3)
    (b50, b99), (i50, i99) = ttft["balanced"], ttft["imbalanced"]
    print(f"{policy:<13}{f'{b50:.0f} / {b99:.0f}':>22}{f'{i50:.0f} / {i99:.0f}':>24}{i99 / b99:>11.2f}")
PY
