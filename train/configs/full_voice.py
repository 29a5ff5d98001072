"""Full fine-tune of CSM-1B on one speaker's own recordings: a folder of clip.wav + clip.txt (or a manifest).

    python -m train --config train/configs/full_voice.py init=ckpt/csm-1b data.source=my_voice/ workdir=runs/me

The numbers: lr 2e-5 (twice the Emilia recipe: hours of one voice, not thousands of many), 30 warm-up steps, cosine
decay over 300 steps; 4 rows of 512 frames (41 s) per step, several clips packed per row (`data.packing`), so a
step sees about 160 s of speech and 300 steps about 13 h: 6-7 passes over 2 h of recordings. Scale `steps` with
your data (about 22 steps per hour per pass). Clips up to 20 s (longer ones are skipped and counted, never cut),
every clip speaker 0. Eval every 50 steps on 5% of the clips, held out by a hash of their id
(`data.eval_fraction`): stop where `eval/loss` turns up, and listen to WORKDIR/samples/step_XXXXXX.wav, written
every 50 steps (and at step 0) from the current weights (`sample_text`, optional `sample_context` clip of the
voice with its `sample_context_text`). Mimi codes once first for speed:
    python -m train.prepare my_voice/ my_voice-mimi/   ... then data.source=my_voice-mimi/

A first try on a handful of clips runs as it is: where the held-out clips cannot fill one eval batch (4 packed rows
of 512 frames, about 3 min of speech, so about an hour of recordings at 5%), the run trains on every clip without
eval and says so (`eval_optional`; give eval_source=DIR for an eval), and the warm-up is at most a tenth of
`steps` (`finalize`, after the command line's overrides).
"""

import dataclasses
import logging

from train.config import TrainConfig
from train.data import DataConfig
from train.trainer import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        steps=300, mesh=(-1, 1, 1), mimi=None, save_every=50, eval_every=50, eval_batches=4,
        eval_optional=True, sample_every=50,
        data=DataConfig(max_duration=20.0, max_frames=512, batch_size=4, packing=True, shuffle_window=256,
                        eval_fraction=0.05, speaker=0),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=30, schedule="cosine"))


def finalize(cfg: TrainConfig) -> TrainConfig:
    """The warm-up capped at a tenth of `steps` (so steps=20 warms up over 2), after the command line's overrides."""
    warmup = min(cfg.optim.warmup_steps, cfg.steps // 10)
    if warmup < cfg.optim.warmup_steps:
        logging.getLogger("train").info("optim.warmup_steps=%d lowered to %d: this recipe warms up over at most a "
                                        "tenth of steps=%d", cfg.optim.warmup_steps, warmup, cfg.steps)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=warmup))
