#!/usr/bin/env bash
# Sets up csm-jax in a project virtual environment, .venv/ in the repository, on a fresh Debian/Ubuntu machine
# with apt (a system Python that refuses pip installs, PEP 668, is fine: nothing is installed into it). Afterwards
# run everything with .venv/bin/python.
#   bash .ci/setup.sh            # the package (generation, conversion, training)
#   bash .ci/setup.sh --dev      # plus the test and reference dependencies (transformers, torchtune, espeak-ng, sox,
#                                # chromium for the playground test, ffmpeg)
#   CSM_CUDA=1 bash .ci/setup.sh # JAX with CUDA wheels
#   PYTHON=python3.11 bash .ci/setup.sh   # build the environment from this interpreter (3.11: jax 0.10)
#   PYTHON=$(pyenv root)/versions/3.12.1/bin/python3 bash .ci/setup.sh --dev   # e.g. a pyenv-installed 3.12
# Without PYTHON the environment is built from the first Python >= 3.12 among python3, python3.12 and pyenv's 3.12
# (CI tests this one: jax 0.11/0.12), else from python3 (3.11 is supported too: jax 0.10). An existing .venv is kept
# whatever it was built from: delete it to rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

missing=()
apt_install() {
  [ "$#" -gt 0 ] || return 0
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@"
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local c pyenv_312=""
  # pyenv's shims run only the versions it has selected, so a pyenv-installed 3.12 is looked up by its path
  command -v pyenv >/dev/null 2>&1 && pyenv_312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3 2>/dev/null | sort -V | tail -n 1)
  for c in python3 python3.12 $pyenv_312; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo python3
}

if [ ! -x .venv/bin/python ]; then
  PY=$(pick_python)
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' >/dev/null 2>&1; then
    echo "error: csm-jax needs Python >= 3.11 and '$PY' is missing or older; install python3.12 (or python3.11) and" \
         "run again, or name the interpreter with PYTHON=/path/to/python3 bash .ci/setup.sh" >&2
    exit 2
  fi
  # The venv module is a separate Debian package (python3.X-venv) for the system Python of Debian/Ubuntu.
  ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  "$PY" -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=("python$ver-venv")
fi
if [ "$dev" = 1 ] && ! { command -v espeak-ng && command -v sox; } >/dev/null 2>&1; then
  missing+=(espeak-ng sox libsox-fmt-mp3)
fi
# the speech server's playground is tested in a real headless browser (selenium drives Debian's chromium)
if [ "$dev" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  missing+=(chromium chromium-driver)
fi
# the streamed flac/mp3/opus responses are also checked with ffmpeg's decoders
if [ "$dev" = 1 ] && ! command -v ffmpeg >/dev/null 2>&1; then
  missing+=(ffmpeg)
fi
command -v g++ >/dev/null 2>&1 || missing+=(g++)  # the CPU decode kernels are compiled on first use
if ! apt_install "${missing[@]}"; then
  [ "${missing[*]}" = g++ ] || exit 1
  echo "note: no g++; CPU decoding falls back to XLA's slower path" >&2
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
echo "building the environment in .venv with $($VPY -c 'import sys; print("Python", sys.version.split()[0])')"
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
