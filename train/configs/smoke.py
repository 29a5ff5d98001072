"""Local smoke run on a laptop CPU: the tiny model, random Mimi, a few steps, no downloads.

    python -m train --config train/configs/smoke.py data.source=path/to/shards workdir=runs/smoke
"""

from train.config import TrainConfig
from train.data import DataConfig
from train.trainer import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="tiny_full_vocab", steps=20, mesh=(-1, 1, 1), compute_dtype="float32", mimi="random", log_every=5,
        save_every=10, data=DataConfig(max_frames=128, batch_size=2, shuffle_window=4, interleave=2),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0))
