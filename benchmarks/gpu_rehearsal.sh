#!/usr/bin/env bash
# Rehearses benchmarks/gpu_check.sh on the CPU with the GPU machine's package versions, offline, before a GPU run:
#   bash benchmarks/gpu_rehearsal.sh [REQUIREMENTS] [OUT_DIR]     # every step at smoke sizes; exit 1 if one fails
#   bash benchmarks/gpu_rehearsal.sh --env-only [REQUIREMENTS]    # only build the environment and fetch the wheels
# REQUIREMENTS: the image's versions, pip-style (default ../shared/gpu/image-requirements.txt beside the repo, or
# beside its main checkout when this is a git worktree).
# Builds once a Python 3.12 environment from REQUIREMENTS under .cache/gpu_rehearsal/ (CPU jax of the same version;
# torch from PyPI, several GB), keeps it for later rehearsals (a changed REQUIREMENTS builds a new one), downloads the
# wheels the GPU run carries (benchmarks/gpu_wheels.sh .whl) if .whl/ is missing, then runs gpu_check.sh --smoke
# with those wheels installed exactly as on the GPU machine, without network (unshare -n with loopback up, else the
# hub switched off and every proxy pointed at a closed port) and with nothing of another virtual environment on the
# path.
# Writes OUT_DIR (a new or empty folder; default .cache/gpu_rehearsal/out, emptied first): what gpu_check.sh writes.
set -euo pipefail
env_only=0
if [[ ${1:-} == --env-only ]]; then env_only=1; shift; fi
req=${1:+$(realpath -m "$1")}  # paths given are relative to where the script is called from
out=${2:+$(realpath -m "$2")}
cd "$(dirname "$0")/.."
own_out=0
if [[ -z $out ]]; then
  out=.cache/gpu_rehearsal/out own_out=1
elif [[ -e $out && -n $(ls -A "$out") ]]; then
  echo "error: OUT_DIR '$out' is not empty; give a new folder (a rehearsal starts without the compile caches of an" \
       "earlier run, as a GPU machine does)" >&2
  exit 2
fi
if [[ -z $req ]]; then
  req=../shared/gpu/image-requirements.txt
  if [[ ! -f $req ]] && common=$(git rev-parse --git-common-dir 2>/dev/null); then
    req=$(dirname "$(cd "$common" && pwd)")/../shared/gpu/image-requirements.txt  # beside the main checkout
  fi
fi
if [[ ! -f $req ]]; then
  echo "error: no requirements file at '$req'; pass the GPU image's pip requirements as the first argument" >&2
  exit 2
fi

pick_python() {  # a Python 3.12, as on the GPU machine
  local c
  for c in "${PYTHON:-}" python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3 \
                                       2>/dev/null | sort -V) python3; do
    [[ -n $c ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 \
      && { echo "$c"; return; }
  done
  echo "error: no Python 3.12 found (the GPU machine's); name one with PYTHON=/path/to/python3.12" >&2
  exit 2
}

base=.cache/gpu_rehearsal
env_dir=$base/env-$(sha256sum "$req" | cut -c1-12)
if [[ ! -x $env_dir/bin/python ]]; then
  py=$(pick_python)
  echo "building the rehearsal environment in $env_dir from $req with $("$py" --version) (once; several GB)"
  rm -rf "$env_dir.tmp"
  "$py" -m venv "$env_dir.tmp"
  # the requirements' comments and versions as they are; torch from PyPI brings its CUDA libraries (unused here)
  nice "$env_dir.tmp/bin/python" -m pip install -q --no-cache-dir -r "$req"
  mv "$env_dir.tmp" "$env_dir"  # a half-built environment is never taken for a finished one
fi
[[ -d .whl ]] || bash benchmarks/gpu_wheels.sh .whl
du -sh "$env_dir" .whl
[[ $env_only == 1 ]] && exit 0

# the environment gpu_check.sh meets on the GPU machine: the image's python3 first on PATH, no other venv, nothing
# on PYTHONPATH, the carried wheels installed into a site folder of this rehearsal's own (not the repo's .site)
path=$PWD/$env_dir/bin
IFS=: read -ra parts <<<"$PATH"
for p in "${parts[@]}"; do
  [[ $p == *.venv* || $p == "${VIRTUAL_ENV:-/nonexistent}"* || $p == *pyenv* ]] || path+=:$p
done
rm -rf "$base/site"
# this script's own output folder is emptied: a GPU machine starts bare, without compile caches of an earlier run
[[ $own_out == 0 ]] || rm -rf "$out"
mkdir -p "$base/hf-empty"
vars=(HOME="$HOME" PATH="$path" LANG=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}" HF_HOME="$PWD/$base/hf-empty" HF_HUB_OFFLINE=1
      TRANSFORMERS_OFFLINE=1 GPU_CHECK_WHEELS=.whl GPU_CHECK_SITE="$base/site")
# a network namespace of its own with only loopback, which the serving step's load test uses
offline=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh)
how="a network namespace with loopback only (unshare -n)"
if ! unshare -n ip link set lo up 2>/dev/null; then  # no such namespace here: all but loopback goes to a closed port
  closed=http://127.0.0.1:9
  vars+=(http_proxy=$closed https_proxy=$closed HTTP_PROXY=$closed HTTPS_PROXY=$closed all_proxy=$closed
         no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost)
  offline=()
  how="the hub switched off and every proxy pointed at a closed port (unshare -n is not available here)"
fi
echo "offline: $how"
nice "${offline[@]}" env -i "${vars[@]}" bash benchmarks/gpu_check.sh "$out" --smoke
