#!/usr/bin/env bash
# Sets up csm-jax in a project virtual environment, .venv/ in the repository, on a fresh Debian/Ubuntu machine
# with Python >= 3.11 and apt (a system Python that refuses pip installs, PEP 668, is fine: nothing is installed
# into it). Afterwards run everything with .venv/bin/python.
#   bash .ci/setup.sh            # the package (generation, conversion, training)
#   bash .ci/setup.sh --dev      # plus the test and reference dependencies (transformers, torchtune, espeak-ng, sox,
#                                # chromium for the playground test)
#   CSM_CUDA=1 bash .ci/setup.sh # JAX with CUDA wheels
#   PYTHON=python3.12 bash .ci/setup.sh   # build the environment from another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

apt_install() {
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q "$@"
}

# The venv module is a separate Debian package (python3-venv) on stock Debian/Ubuntu.
PY=${PYTHON:-python3}
if ! $PY -c "import ensurepip, venv" >/dev/null 2>&1; then
  apt_install python3-venv
fi
if [ "$dev" = 1 ] && ! { command -v espeak-ng && command -v sox; } >/dev/null 2>&1; then
  apt_install espeak-ng sox libsox-fmt-mp3
fi
# the speech server's playground is tested in a real headless browser (selenium drives Debian's chromium)
if [ "$dev" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  apt_install chromium chromium-driver
fi
if ! command -v g++ >/dev/null 2>&1; then  # the CPU decode kernels are compiled on first use
  apt_install g++ || echo "note: no g++; CPU decoding falls back to XLA's slower path" >&2
fi

[ -x .venv/bin/python ] || $PY -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip

# PyTorch first, so that the resolver below finds it satisfied: any torch >= 2.4 works (CPU or CUDA build).
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q "torch==2.13.0" || $VPY -m pip install -q "torch>=2.4"

extras=""
[ "$dev" = 1 ] && extras="dev"
[ "${CSM_CUDA:-0}" = 1 ] && extras="${extras:+$extras,}cuda"
$VPY -m pip install -q -e ".${extras:+[$extras]}"

# moshi (Mimi) pins torch<2.10, numpy<2.3, huggingface-hub<1.0 and safetensors<0.8 in every release, yet runs with
# newer versions; with a current torch pip cannot resolve it, so it is installed without its pins. Its runtime
# needs (sphn, einops, sentencepiece, safetensors, huggingface_hub) are our own dependencies in pyproject.toml.
$VPY -m pip install -q --no-deps "moshi>=0.2.6,<0.3"
echo "csm-jax is installed in .venv (run it with .venv/bin/python, or: source .venv/bin/activate)"
