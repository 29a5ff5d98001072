#!/usr/bin/env bash
# Correctness and speed of csm-jax on a GPU, in one run (under 8 minutes on an H100):
#   bash benchmarks/gpu_check.sh OUT_DIR [--smoke]
# Writes OUT_DIR/gpu_check.json (everything), OUT_DIR/gpu_check.md (the table, also printed last) and
# OUT_DIR/gpu_check.log (each step's output). --smoke runs every step on the CPU with tiny sizes, in seconds
# (tests/test_gpu_check.py). The steps and their time budgets are in benchmarks/gpu_check.py.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke]}
smoke=${2:-}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p "$out"

# Packages the GPU machine's image lacks travel as wheels in .whl/ (bash benchmarks/gpu_wheels.sh .whl); nothing
# is downloaded there. The project runs from this source tree.
if [[ -d .whl && $smoke != --smoke ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    || echo "warning: installing the carried wheels failed; steps that need them will say so" >&2
fi
export PYTHONPATH=$PWD:$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
# JAX and PyTorch (transformers, Mimi) share the card: JAX allocates on demand instead of taking 75% of the memory
# at start-up. Each step runs in its own process, so one step's memory is free again for the next.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
if [[ $smoke == --smoke ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi
exec "$python" benchmarks/gpu_check.py "$out" $smoke
