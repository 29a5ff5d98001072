"""Full fine-tune of CSM-1B on Emilia, recipe after the published Chinese fine-tune (lr 1e-5, 500 warm-up steps,
bf16 compute over f32 weights, 8 utterances x 4 GPUs x 10 accumulation steps, 10 s audio, speaker 0).

    python -m train --config train/configs/emilia_1b.py init=ckpt/csm-1b data.source=/data/Emilia/ZH \\
        workdir=runs/zh mesh="(-1,1,1)"

Mimi codes once (recommended; a SLURM array of workers, each on its share of the shards, rerunnable):
    sbatch --array=0-63 --gres=gpu:1 --wrap "python -m train.prepare /data/Emilia/ZH /data/Emilia-mimi/ZH"
    ... then data.source=/data/Emilia-mimi/ZH

Multi-host (one process per host; `jax.distributed.initialize()` reads SLURM or the JAX_* variables):
    srun python -m train --config train/configs/emilia_1b.py --distributed ...
"""

from train.config import TrainConfig
from train.data import DataConfig
from train.trainer import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        steps=20_000, mesh=(-1, 1, 1), mimi=None, save_every=500, eval_every=500,
        data=DataConfig(languages=("ZH",), max_duration=10.0, min_dnsmos=3.0, max_frames=192, batch_size=8,
                        shuffle_window=1024),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=500, accumulation=10))
