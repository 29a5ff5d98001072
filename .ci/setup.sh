#!/usr/bin/env bash
# Installs everything csm-jax and its tests need on a fresh Debian/Ubuntu machine with Python >= 3.10.
#   bash .ci/setup.sh          # the package (generation, conversion, training)
#   bash .ci/setup.sh --dev    # plus the test and reference dependencies (transformers, torchtune, espeak-ng, sox)
#   CSM_CUDA=1 bash .ci/setup.sh   # JAX with CUDA 12 wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dev=0; [ "${1:-}" = "--dev" ] && dev=1

if [ "$dev" = 1 ] && ! { command -v espeak-ng && command -v sox; } >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q espeak-ng sox libsox-fmt-mp3
fi

# PyTorch first, so that the resolver below finds it satisfied: any torch >= 2.4 works (CPU or CUDA build).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q "torch>=2.4"

extras=""
[ "$dev" = 1 ] && extras="dev"
[ "${CSM_CUDA:-0}" = 1 ] && extras="${extras:+$extras,}cuda12"
$PY -m pip install -q -e ".${extras:+[$extras]}"

# moshi (Mimi) pins torch<2.10, numpy<2.3, huggingface-hub<1.0 and safetensors<0.8 in every release, yet runs with
# newer versions; with a current torch pip cannot resolve it, so it is installed without its pins. Its runtime
# needs (sphn, einops, sentencepiece, safetensors, huggingface_hub) are our own dependencies in pyproject.toml.
$PY -m pip install -q --no-deps "moshi>=0.2.6,<0.3"
