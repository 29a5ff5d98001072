#!/usr/bin/env bash
# Correctness and speed of csm-jax on a GPU, in one run (about 8 minutes on an H100):
#   bash benchmarks/gpu_check.sh OUT_DIR [--smoke]
# Writes into OUT_DIR as it goes: figures.jsonl (every figure the moment it is measured), gpu_check.log (each step's
# output), gpu_check.json (everything, after each step) and at the end gpu_check.md (the table, also printed last,
# with each step's status). Exits 1 when a step failed. --smoke runs every step on the CPU at tiny sizes. The steps
# and their time budgets: benchmarks/gpu_check/plan.py.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke]}
out=$(realpath -m "$out")  # given relative to where the script is called from
smoke=${2:-}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p "$out"

# Packages the GPU machine's image lacks travel as wheels (bash benchmarks/gpu_wheels.sh .whl; GPU_CHECK_WHEELS names
# another folder); nothing is downloaded there. The project runs from this source tree.
wheels=${GPU_CHECK_WHEELS:-$([[ $smoke == --smoke ]] || echo .whl)}
site=${GPU_CHECK_SITE:-.site}
if [[ -n $wheels && -d $wheels ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || echo "warning: installing the carried wheels failed; steps that need them will say so" >&2
  export PYTHONPATH=$PWD:$PWD/$site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# JAX and PyTorch (transformers, Mimi) share the card: JAX allocates on demand instead of taking 75% of the memory
# at start-up. Each step runs in its own process, so one step's memory is free again for the next.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# moshi torch.compiles parts of Mimi on CUDA, which needs a C compiler and Python's headers at run time
if ! command -v cc >/dev/null || ! "$python" -c 'import os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
  export NO_TORCH_COMPILE=1
fi
if [[ $smoke == --smoke ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi
exec "$python" -m benchmarks.gpu_check "$out" $smoke
