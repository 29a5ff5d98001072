"""python -m train --config train/configs/smoke.py [key=value ...]: fine-tune CSM (see README, "Fine-tuning")."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.core.errors import run_main
from train.config import TrainConfig, TrainConfigError, load_config, validate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--config", help="a Python config file with get_config() (train/configs/*.py)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run: the flags below, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID, torchrun's or OpenMPI's variables, else SLURM (see train/distributed.py)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int, help="processes in the run (implies --distributed)")
    p.add_argument("--process-id", type=int, help="this process's index, 0..N-1 (implies --distributed)")
    p.add_argument("overrides", nargs="*", help="config overrides such as optim.learning_rate=1e-4 steps=500")
    return p.parse_args(argv)


def held_out(cfg: TrainConfig) -> bool:
    """Eval on a hashed share of the training data itself: eval is on and no eval_source is given."""
    return bool(cfg.eval_every) and not cfg.eval_source.strip()


def eval_pipeline(cfg: TrainConfig, model_config):
    if held_out(cfg):
        return build_pipeline(cfg, model_config, cfg.data.source, repeat=False, split="eval")
    return build_pipeline(cfg, model_config, cfg.eval_source, repeat=False)


def build_pipeline(cfg: TrainConfig, model_config, source: str, repeat: bool = True, split: str | None = None):
    """The batches of `source`; `split` = "train" / "eval" keeps one side of the held-out split by example id."""
    from csm_jax.io import audio, text
    from train.data import Featurizer, dataset

    data = dataclasses.replace(cfg.data, source=source)
    mimi = (audio.random_mimi(cfg.seed, num_codebooks=model_config.num_codebooks) if cfg.mimi == "random"
            else audio.load_mimi(cfg.mimi, num_codebooks=model_config.num_codebooks))
    featurizer = Featurizer(text.load_tokenizer(cfg.tokenizer), mimi, data, model_config.num_codebooks)
    return dataset(source, data, featurizer, accumulation=cfg.optim.accumulation, repeat=repeat,
                   process_index=jax.process_index(), process_count=jax.process_count(), split=split)


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
    """Runs (or resumes) the training run `cfg` and returns its export. Mistakes in `cfg` or its data raise a
    `UserError` before anything is compiled or written: the config is validated, and the first batch (a full pass
    over the shards when nothing is usable) is read before the first compile."""
    from tqdm import tqdm

    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from train.data import SKIPPED, padding_fraction
    from train.lora import make_trainer
    from train.trainer import checkpoint_manager, checkpoint_meta, save_checkpoint

    validate(cfg)
    model_config = preset(cfg.model)
    workdir = Path(cfg.workdir)
    try:
        mesh = make_mesh(*cfg.mesh)
    except ValueError as e:
        raise TrainConfigError(f"mesh={cfg.mesh}: {e}") from None
    iterator = iter(build_pipeline(cfg, model_config, cfg.data.source, split="train" if held_out(cfg) else None))
    if cfg.eval_every:
        check_eval_data(cfg, model_config)
    trainer = make_trainer(model_config, cfg.optim, mesh, cfg.lora, steps=cfg.steps,
                           compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat)
    if cfg.lora.rank:  # the frozen base
        trainer.load_base(cfg.init, cfg.seed)
    checkpoints = workdir / "checkpoints"
    manager = checkpoint_manager(checkpoints, cfg.keep_checkpoints, cfg.save_every) if checkpoints.is_dir() else None
    if manager is not None and cfg.lora.rank:  # resumed adapters must have been trained over this base
        trainer.check_resume(checkpoint_meta(manager))
    state = resume(manager, trainer, iterator, checkpoints) if manager is not None else None
    if state is not None and int(state.step) > cfg.steps:
        raise TrainConfigError(f"{checkpoints} already holds step {int(state.step)}, past steps={cfg.steps}; set "
                               f"steps={int(state.step)} or more to continue that run, or give a new workdir")
    finished = state is not None and int(state.step) == cfg.steps
    # the first batch before any compile or write: data that gives no example stops here
    batches = iterator if finished else itertools.chain([next(iterator)], iterator)
    manager = manager or checkpoint_manager(checkpoints, cfg.keep_checkpoints, cfg.save_every)
    if state is None:
        state = (trainer.init_from_checkpoint(cfg.init, cfg.seed) if cfg.init and not cfg.lora.rank
                 else trainer.init_state(cfg.seed))
    start = int(state.step)
    log = MetricsLog(workdir)
    rows = cfg.optim.accumulation * cfg.data.batch_size * jax.process_count()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=jax.process_index() != 0)
    last = time.perf_counter()
    for step, batch in zip(bar, batches):
        state, metrics = trainer.step(state, batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            padding = padding_fraction(batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only host sync
            now = time.perf_counter()
            step_time = (now - last) / cfg.log_every
            last = now
            metrics |= {"step_time": step_time, "frames_per_s": rows * cfg.data.max_frames / step_time,
                        "data/padding_fraction": padding,
                        **{f"skipped/{k}": v for k, v in SKIPPED.items()}}
            log.write(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", c0=f"{metrics['c0_loss']:.3f}",
                            frames_s=f"{metrics['frames_per_s']:.0f}", step_s=f"{step_time:.2f}")
        save_checkpoint(manager, state, iterator, trainer.checkpoint_meta())
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            log.write(step + 1, evaluate(cfg, trainer, state, model_config))
    save_checkpoint(manager, state, iterator, trainer.checkpoint_meta())
    manager.wait_until_finished()
    if SKIPPED:
        logging.warning("skipped corrupt or filtered members: %s", dict(SKIPPED))
    return trainer.export(state, workdir / "export", {"config": cfg.model})


def resume(manager, trainer, iterator, checkpoints: Path):
    """The latest checkpoint's train state (and `iterator` rewound to its data position), or None when there is none;
    a TrainConfigError when it was written by a run with another model or data layout."""
    from train.trainer import restore_checkpoint

    try:
        return restore_checkpoint(manager, trainer, iterator)
    except (ValueError, KeyError, IndexError) as e:
        reason = str(e).split(". ")[0].strip()
        raise TrainConfigError(f"the checkpoints in {checkpoints} were written by a run with another model, data "
                               f"layout or csm-jax version ({type(e).__name__}: {reason}); resume with that run's "
                               f"config, or give a new workdir") from None


def check_eval_data(cfg: TrainConfig, model_config) -> None:
    """The held-out data gives at least one batch (a DataError when it gives no example at all)."""
    from train.data import DataError

    if next(iter(eval_pipeline(cfg, model_config)), None) is None:
        what = (f"the held-out data.eval_fraction={cfg.data.eval_fraction} of data.source" if held_out(cfg)
                else f"eval_source={cfg.eval_source}")
        raise DataError(f"{what} gives fewer usable examples than one batch (data.batch_size x optim.accumulation); "
                        f"raise data.eval_fraction, give eval_source=DIR, or set eval_every=0")


def evaluate(cfg: TrainConfig, trainer, state, model_config) -> dict[str, float]:
    iterator = iter(eval_pipeline(cfg, model_config))
    losses = [jax.device_get(trainer.eval_loss(state, batch)) for _, batch in zip(range(cfg.eval_batches), iterator)]
    return {f"eval/{k}": float(np.mean([m[k] for m in losses])) for k in losses[0]} if losses else {}


def main(argv=None) -> int:
    """The command line: exit 0, 2 with one `error: ...` line for a mistake in the config or data, 1 for a bug."""
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        from train.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)  # before anything else uses JAX
    cfg = load_config(args.config, args.overrides)
    export = train(cfg)
    if jax.process_index() == 0:
        print(f"trained weights exported to {export} (generate with: python -m csm_jax.generate --checkpoint {export})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
