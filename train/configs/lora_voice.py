"""LoRA on CSM-1B for one speaker's own recordings, on one GPU: the recipe people use with CSM.

    python -m train --config train/configs/lora_voice.py init=ckpt/csm-1b data.source=my_voice/ workdir=runs/me
    python -m csm_jax.generate --checkpoint ckpt/csm-1b --adapter runs/me/adapter --text "..." --out me.wav

The numbers: rank 32, alpha 32, dropout 0, on q, k, v, o, gate, up and down of both the backbone and the depth
decoder (about 1% of the parameters train; the base stays frozen and out of the optimizer); lr 2e-4 with 10
warm-up steps (at most a tenth of `steps`) then cosine over 200 steps (the widely used recipe runs 60-500); 4 rows
of 512 frames per step with several clips packed per row. `lora.base_dtype=int8` holds the frozen base in int8
(QLoRA) and `lora.base_dtype=bfloat16` in bfloat16 for less memory. Clips up to 20 s (longer ones are skipped and counted),
every clip speaker 0; eval every 25 steps on 5% of the clips held out by a hash of their id: stop where
`eval/loss` turns up (a handful of clips, too few to fill one eval batch, trains on every clip without eval, with
a notice; eval_source=DIR gives an eval). Every 50 steps (and at step 0) the current weights say `sample_text` into
WORKDIR/samples/step_XXXXXX.wav (and TensorBoard); give sample_context=CLIP sample_context_text="..." to say it in
your voice. The adapter goes to WORKDIR/adapter (PEFT's format), the merged weights to WORKDIR/export.
"""

import dataclasses

from train.config import TrainConfig
from train.configs import full_voice
from train.lora import LoraConfig
from train.trainer import OptimConfig


finalize = full_voice.finalize  # the warm-up capped by steps, after the command line's overrides


def get_config() -> TrainConfig:
    """The full_voice recipe with adapters: its data, eval, samples and `finalize`; fewer steps at 10x the learning
    rate."""
    return dataclasses.replace(
        full_voice.get_config(), steps=200, save_every=25, eval_every=25,
        optim=OptimConfig(learning_rate=2e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0),
        lora=LoraConfig(rank=32, alpha=32.0))
