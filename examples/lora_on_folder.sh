#!/usr/bin/env bash
# LoRA on a folder of your own clips (clip.wav beside clip.txt), then speech with the adapter and the loss curves.
#   bash examples/lora_on_folder.sh my_voice/ ckpt/csm-1b runs/me [key=value ...]
# FOLDER: the clips; BASE: a converted checkpoint (python -m convert sesame/csm-1b ckpt/csm-1b); WORKDIR: the run.
# Further key=value arguments override the recipe (train/configs/lora_voice.py), e.g. steps=100 lora.rank=16.
# Run it from the repository root; PYTHON names the interpreter (default python), MIMI a local Mimi weights file.
set -euo pipefail
folder=$1 base=$2 work=$3
shift 3
python=${PYTHON:-python}

"$python" -m train --config train/configs/lora_voice.py init="$base" data.source="$folder" workdir="$work" "$@"
"$python" -m csm_jax.generate --checkpoint "$base" --adapter "$work/adapter" ${MIMI:+--mimi "$MIMI"} \
    --text "This is my voice after fine-tuning." --max-audio-length-ms 5000 --out "$work/after.wav"
"$python" -m train.plot "$work"                           # the losses, drawn into $work/loss.png
