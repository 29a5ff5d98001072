"""python -m train --config train/configs/smoke.py [key=value ...]: fine-tune CSM (see README, "Fine-tuning")."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train.config import TrainConfig, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--config", help="a Python config file with get_config() (train/configs/*.py)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; reads SLURM / JAX_* variables)")
    p.add_argument("overrides", nargs="*", help="config overrides such as optim.learning_rate=1e-4 steps=500")
    return p.parse_args(argv)


def build_pipeline(cfg: TrainConfig, model_config, source: str, repeat: bool = True):
    from csm_jax.io import audio, text
    from train.data import Featurizer, dataset

    data = dataclasses.replace(cfg.data, source=source)
    mimi = (audio.random_mimi(cfg.seed, num_codebooks=model_config.num_codebooks) if cfg.mimi == "random"
            else audio.load_mimi(cfg.mimi, num_codebooks=model_config.num_codebooks))
    featurizer = Featurizer(text.load_tokenizer(cfg.tokenizer), mimi, data, model_config.num_codebooks)
    return dataset(source, data, featurizer, accumulation=cfg.optim.accumulation, repeat=repeat,
                   process_index=jax.process_index(), process_count=jax.process_count())


class MetricsLog:
    """metrics.jsonl on process 0 (and TensorBoard when tensorboardX is installed)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)


def train(cfg: TrainConfig) -> Path:
    from tqdm import tqdm

    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from train.data import SKIPPED
    from train.trainer import Trainer, checkpoint_manager, restore_checkpoint, save_checkpoint

    if not cfg.data.source:
        raise SystemExit("no training data: set data.source=DIR (a directory of Emilia .tar shards) or a hub id")
    model_config = preset(cfg.model)
    workdir = Path(cfg.workdir)
    trainer = Trainer(model_config, cfg.optim, make_mesh(*cfg.mesh), compute_dtype=jnp.dtype(cfg.compute_dtype),
                      remat=cfg.remat)
    iterator = iter(build_pipeline(cfg, model_config, cfg.data.source))
    manager = checkpoint_manager(workdir / "checkpoints", cfg.keep_checkpoints, cfg.save_every)
    state = restore_checkpoint(manager, trainer, iterator)
    if state is None:
        state = trainer.init_from_checkpoint(cfg.init, cfg.seed) if cfg.init else trainer.init_state(cfg.seed)
    start = int(state.step)
    log = MetricsLog(workdir)
    rows = cfg.optim.accumulation * cfg.data.batch_size * jax.process_count()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=jax.process_index() != 0)
    last = time.perf_counter()
    for step in bar:
        state, metrics = trainer.step(state, next(iterator))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only host sync
            now = time.perf_counter()
            step_time = (now - last) / cfg.log_every
            last = now
            metrics |= {"step_time": step_time, "frames_per_s": rows * cfg.data.max_frames / step_time,
                        **{f"skipped/{k}": v for k, v in SKIPPED.items()}}
            log.write(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", c0=f"{metrics['c0_loss']:.3f}",
                            frames_s=f"{metrics['frames_per_s']:.0f}", step_s=f"{step_time:.2f}")
        save_checkpoint(manager, state, iterator)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            log.write(step + 1, evaluate(cfg, trainer, state, model_config))
    save_checkpoint(manager, state, iterator)
    manager.wait_until_finished()
    if SKIPPED:
        logging.warning("skipped corrupt or filtered members: %s", dict(SKIPPED))
    return trainer.export(state, workdir / "export", {"config": cfg.model})


def evaluate(cfg: TrainConfig, trainer, state, model_config) -> dict[str, float]:
    iterator = iter(build_pipeline(cfg, model_config, cfg.eval_source, repeat=False))
    losses = [jax.device_get(trainer.eval_loss(state, batch)) for _, batch in zip(range(cfg.eval_batches), iterator)]
    return {f"eval/{k}": float(np.mean([m[k] for m in losses])) for k in losses[0]} if losses else {}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.distributed:
        jax.distributed.initialize()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export = train(cfg)
    if jax.process_index() == 0:
        print(f"trained weights exported to {export} (generate with: python -m csm_jax.generate --checkpoint {export})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
