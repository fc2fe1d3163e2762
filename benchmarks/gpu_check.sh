#!/usr/bin/env bash
# Issue 15 on a GPU machine, in one short run: the CUDA tests, then benchmarks/gpu_bench.py.
#   bash benchmarks/gpu_check.sh            (writes under $OUT, or benchmarks/results/gpu-<date>/)
# The machine has torch, triton and transformers but no internet: splitfuse installs without its
# dependencies (they are there, or carried), and the model is made on the GPU with random weights.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || echo "install failed: see $out/install.log"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee "$out/versions.txt"
# The CUDA tests: the Triton kernels at real sizes, parity with transformers, graphs equal to eager.
timeout 240 python -m pytest -q -x tests/gpu tests/unit/test_triton_attention.py tests/unit/test_triton_ops.py \
  tests/unit/test_cuda_graphs.py 2>&1 | tail -30 | tee "$out/tests.txt"
timeout 420 python benchmarks/gpu_bench.py --out "$out/gpu_bench.json" "$@" 2>&1 | tail -80 | tee "$out/bench.txt"
