#!/usr/bin/env bash
# Downloads, on a machine with the package registry, the wheels benchmarks/gpu_check.sh needs on a GPU machine
# without network whose Python 3.12 environment (x86-64) already holds jax[cuda], torch, transformers, peft, flax,
# optax and orbax: they go to DEST (default .whl; keep it out of git) and gpu_check.sh installs them from there.
#   bash benchmarks/gpu_wheels.sh [DEST]
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pkgs=(grain==0.2.18 array-record moshi==0.2.13 sphn llama-models soundfile cffi pycparser tensorboardX portpicker
      pydantic pydantic-core annotated-types typing-inspection termcolor
      starlette uvicorn prometheus-client python-multipart httpx httpcore h11 anyio sniffio click)  # serving
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pkgs[@]}"
du -sh "$dest"
