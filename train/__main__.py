"""python -m train --config train/configs/smoke.py [key=value ...]: fine-tune CSM (see docs/guides/fine-tuning.md)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csm_jax.core.errors import UserError, run_main
from csm_jax.core.host_memory import keep_freed_memory
from csm_jax.core.logs import configure_logging
from train.config import DEFAULT_MODEL, TrainConfig, TrainConfigError, load_config, resolve_model, validate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--config", help="a Python config file with get_config() (train/configs/*.py)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run: the flags below, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID, torchrun's or OpenMPI's variables, else SLURM (see train/distributed.py)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int, help="processes in the run (implies --distributed)")
    p.add_argument("--process-id", type=int, help="this process's index, 0..N-1 (implies --distributed)")
    p.add_argument("overrides", nargs="*", help="config overrides such as optim.learning_rate=1e-4 steps=500")
    return p


def held_out(cfg: TrainConfig) -> bool:
    """Eval on a hashed share of the training data itself: eval is on and no eval_source is given."""
    return bool(cfg.eval_every) and not cfg.eval_source.strip()


def eval_pipeline(cfg: TrainConfig, model_config):
    if held_out(cfg):
        return build_pipeline(cfg, model_config, cfg.data.source, repeat=False, split="eval")
    return build_pipeline(cfg, model_config, cfg.eval_source, repeat=False)


def build_pipeline(cfg: TrainConfig, model_config, source: str, repeat: bool = True, split: str | None = None):
    """The batches of `source`; `split` = "train" / "eval" keeps one side of the held-out split by example id."""
    from csm_jax.io import text
    from train.data import Featurizer, dataset

    data = dataclasses.replace(cfg.data, source=source)
    featurizer = Featurizer(text.load_tokenizer(cfg.tokenizer), load_mimi(cfg, model_config), data,
                            model_config.num_codebooks)
    return dataset(source, data, featurizer, accumulation=cfg.optim.accumulation, repeat=repeat,
                   process_index=jax.process_index(), process_count=jax.process_count(), split=split)


def load_mimi(cfg: TrainConfig, model_config):
    """The run's Mimi, loaded once and shared by the data pipelines and the samples."""
    return _mimi(cfg.mimi, cfg.seed, model_config.num_codebooks)


@functools.cache
def _mimi(weights: str | None, seed: int, num_codebooks: int):
    from csm_jax.io import audio

    if weights == "random":
        return audio.random_mimi(seed, num_codebooks=num_codebooks)
    return audio.load_mimi(weights, num_codebooks=num_codebooks)


class MetricsLog:
    """metrics.jsonl on process 0 (and TensorBoard when tensorboardX is installed). A run that starts at step
    `start` (resumed from that checkpoint) first drops the lines after it: they were written by a run that was
    stopped before its next checkpoint, and this run writes those steps again."""

    def __init__(self, workdir: Path, start: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        _drop_metrics_after(workdir / "metrics.jsonl", start)
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

    def audio(self, tag: str, wave: np.ndarray, step: int, sample_rate: int) -> None:
        """Audio (samples,) in [-1, 1] to TensorBoard, when tensorboardX is installed."""
        if self.enabled and self.tb is not None and len(wave):
            self.tb.add_audio(tag, np.clip(wave, -1.0, 1.0), step, sample_rate=sample_rate)
            self.tb.flush()


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrites the JSON lines of `path` without those of steps after `step` (through a temporary sibling)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def after(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            return False

    kept = [line for line in lines if not after(line)]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


SampleHook = Callable[[int, dict, MetricsLog], None]


class VoiceSampler:
    """What the model says now: `sample_text` (after the optional context clip), generated from the current weights
    with a fixed seed and the reference's sampling (temperature 0.9, top-k 50), Mimi-decoded into
    WORKDIR/samples/step_XXXXXX.wav and logged to TensorBoard.

    The generation (prefill and on-device frame loop, `csm_jax.inference.loop`) is one function of the weights,
    compiled at the first sample; later samples pass new weights to the same executable. The prompt, context audio
    included, is built once here, so a prompt that does not fit is reported before training starts."""

    def __init__(self, cfg: TrainConfig, model_config, mimi):
        from csm_jax.inference.prompt import RequestError, prompt_frames
        from csm_jax.io.audio import read_audio
        from csm_jax.io.checkpoint import abstract_model
        from csm_jax.io.frames import Segment
        from csm_jax.io.text import load_tokenizer

        context = ([Segment(cfg.sample_speaker, cfg.sample_context_text, read_audio(cfg.sample_context.strip()))]
                   if cfg.sample_context.strip() else [])
        try:
            self.prompt = prompt_frames(load_tokenizer(cfg.tokenizer), mimi, cfg.sample_text, cfg.sample_speaker,
                                        context, model_config.num_codebooks)
        except RequestError as e:
            raise TrainConfigError(f"the sample prompt (sample_text, sample_context): {e}") from None
        room = model_config.backbone.max_seq_len - 1 - len(self.prompt)  # frames that fit after the prompt
        if cfg.sample_max_frames > room:
            raise TrainConfigError(
                f"the sample prompt is {len(self.prompt)} frames (sample_context and sample_text) and leaves room for "
                f"{max(room, 0)} of the sample_max_frames={cfg.sample_max_frames} frames in the model's "
                f"{model_config.backbone.max_seq_len}; lower sample_max_frames, or shorten sample_context")
        self.mimi, self.directory = mimi, Path(cfg.workdir) / "samples"
        self.max_frames, self.seed = cfg.sample_max_frames, cfg.sample_seed
        self.dtype = jnp.dtype(cfg.compute_dtype)  # the samples compute (and hold the weights) in this dtype
        self.graphdef = nnx.graphdef(abstract_model(model_config, dtype=self.dtype, param_dtype=self.dtype))
        self.sample_codes = jax.jit(self._sample_codes)

    def _sample_codes(self, params: dict) -> tuple[jax.Array, jax.Array]:
        """(frames (F, n), frames kept) of the prompt's continuation under `params`."""
        from csm_jax.inference.loop import FrameGenerator
        from csm_jax.inference.sampling import FrameSampling

        frames = FrameGenerator(nnx.merge(self.graphdef, params))
        state = frames.run(frames.start([self.prompt], self.max_frames, [self.seed]), self.max_frames,
                           FrameSampling())
        return state.frames[0], state.num_frames[0]

    def __call__(self, step: int, params: dict, log: MetricsLog) -> Path:
        """Generates from `params` (the model's pure parameter dict), writes and logs the sample of `step`."""
        from csm_jax.core.codec import SAMPLE_RATE
        from csm_jax.io import audio

        weights = jax.tree.map(lambda x: np.asarray(x, self.dtype), params)  # cast on the host: nothing to compile
        frames, count = jax.device_get(self.sample_codes(weights))
        wave = audio.decode(self.mimi, frames[:count].T[None])[0] if count else np.zeros(0, np.float32)
        path = audio.write_audio(self.directory / f"step_{step:06d}.wav", wave)
        log.write(step, {"sample/seconds": len(wave) / SAMPLE_RATE})
        log.audio("sample", wave, step, SAMPLE_RATE)
        logging.info("step %d: sample written to %s", step, path)
        return path


def take_sample(trainer, state, step: int, hook: SampleHook | None, log: MetricsLog) -> None:
    """Gathers the current weights (every process takes part; `hook` is None except on process 0) and passes them to
    `hook`. A failure is a warning: the train state is not touched, and training goes on."""
    try:
        params = trainer.host_params(state)
        if hook is not None:
            hook(step, params, log)
    except Exception as e:  # noqa: BLE001 - a sample is never worth the run
        mistake = isinstance(e, UserError)  # e.g. a full disk: the message says it all
        logging.warning("the sample of step %d failed; training goes on: %s", step, e if mistake else
                        type(e).__name__, exc_info=not mistake)


def train(cfg: TrainConfig, sample_hook: SampleHook | None = None) -> Path:
    """Runs (or resumes) the training run `cfg` and returns its export. Mistakes in `cfg` or its data raise a
    `UserError` before anything is compiled or written: the config is validated, and the first batch (a full pass
    over the shards when nothing is usable) is read before the first compile.

    With `cfg.sample_every`, `sample_hook(step, params, log)` runs on process 0 at step 0 of a fresh run and every
    `sample_every` steps, with the model's current parameters (default: a `VoiceSampler`); a fresh run with eval
    also logs the eval loss of step 0."""
    from csm_jax.io.locks import exclusive_making_parents

    validate(cfg)
    workdir = Path(cfg.workdir)
    lock = Path(os.path.abspath(workdir))
    # Every process of a run holds a lock file of its own (process 0's names the workdir alone), so a second run into
    # the workdir is refused on each of its processes, and every process opens the same files before its first step:
    # with JAX's CPU collectives (gloo), one more open file on process 0 than on the others hung the first step's
    # collective (tests/test_train.py; opening one on each process did not).
    index = jax.process_index()
    with exclusive_making_parents(lock.parent / f".{lock.name}.lock{f'.{index}' if index else ''}",
                                  f"the workdir {workdir}", "give another workdir"):
        return _train(cfg, workdir, sample_hook)


def _train(cfg: TrainConfig, workdir: Path, sample_hook: SampleHook | None) -> Path:
    from tqdm import tqdm

    from csm_jax.core.sharding import make_mesh
    from train.data import SKIPPED_ONCE, padding_fraction
    from train.lora import make_trainer
    from train.trainer import checkpoint_manager, checkpoint_meta, save_checkpoint

    model_config = resolve_model(cfg)
    try:
        mesh = make_mesh(*cfg.mesh)
    except ValueError as e:
        raise TrainConfigError(f"mesh={cfg.mesh}: {e}") from None
    held_out_batches = read_eval_batches(cfg, model_config) if cfg.eval_every else []
    if cfg.eval_every and not held_out_batches:  # eval_optional, and too little held-out data
        cfg = dataclasses.replace(cfg, eval_every=0)
    iterator = iter(build_pipeline(cfg, model_config, cfg.data.source, split="train" if held_out(cfg) else None))
    if jax.process_index() != 0:
        sample_hook = None  # the other processes only take part in gathering the weights
    elif cfg.sample_every and sample_hook is None:
        sample_hook = VoiceSampler(cfg, model_config, load_mimi(cfg, model_config))
    trainer = make_trainer(model_config, cfg.optim, mesh, cfg.lora, steps=cfg.steps,
                           compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat)
    if cfg.lora.rank:  # the frozen base
        trainer.load_base(cfg.init, cfg.seed)
    checkpoints = workdir / "checkpoints"
    manager = checkpoint_manager(checkpoints, cfg.keep_checkpoints, cfg.save_every) if checkpoints.is_dir() else None
    if manager is not None:  # resumed for the same model (and adapters over the same base)
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
    log = MetricsLog(workdir, start)
    rows = cfg.optim.accumulation * cfg.data.batch_size * jax.process_count()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=jax.process_index() != 0)
    if start == 0 and cfg.eval_every:
        log.write(0, evaluate(trainer, state, held_out_batches))
    if start == 0 and cfg.sample_every:
        take_sample(trainer, state, 0, sample_hook, log)
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
                        **{f"skipped/{k}": v for k, v in SKIPPED_ONCE.items()}}  # each item once, whatever the passes
            log.write(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", c0=f"{metrics['c0_loss']:.3f}",
                            frames_s=f"{metrics['frames_per_s']:.0f}", step_s=f"{step_time:.2f}")
        save_checkpoint(manager, state, iterator, trainer.checkpoint_meta())
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            log.write(step + 1, evaluate(trainer, state, held_out_batches))
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            take_sample(trainer, state, step + 1, sample_hook, log)
    save_checkpoint(manager, state, iterator, trainer.checkpoint_meta())
    manager.wait_until_finished()
    if SKIPPED_ONCE:
        logging.warning("skipped corrupt or filtered items (each counted once): %s", dict(SKIPPED_ONCE))
    started = {"init": str(Path(cfg.init).absolute())} if cfg.init else {"preset": cfg.model or DEFAULT_MODEL}
    return trainer.export(state, workdir / "export", started, base=cfg.init)


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


def read_eval_batches(cfg: TrainConfig, model_config) -> list[dict[str, np.ndarray]]:
    """The `eval_batches` held-out batches every eval scores, read once per run (unprepared audio is Mimi-encoded
    once, not at every eval); a DataError when the held-out data gives not even one batch, or with `eval_optional`
    and a share of data.source, a notice and no batches."""
    from train.data import DataError

    try:
        batches, why = list(itertools.islice(eval_pipeline(cfg, model_config), cfg.eval_batches)), ""
    except DataError as e:  # a full pass over the held-out data found no usable example
        batches, why = [], f" ({e})"
    if not batches:
        what = (f"the held-out data.eval_fraction={cfg.data.eval_fraction} of data.source" if held_out(cfg)
                else f"eval_source={cfg.eval_source}")
        problem = f"{what} gives fewer usable examples than one batch (data.batch_size x optim.accumulation){why}"
        if cfg.eval_optional and held_out(cfg):
            logging.warning("no eval in this run: %s; training on all of data.source (give eval_source=DIR for an "
                            "eval)", problem)
            return []
        raise DataError(f"{problem}; raise data.eval_fraction, give eval_source=DIR, or set eval_every=0")
    return batches


def evaluate(trainer, state, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    losses = [jax.device_get(trainer.eval_loss(state, batch)) for batch in batches]
    return {f"eval/{k}": float(np.mean([m[k] for m in losses])) for k in losses[0]}


def main(argv=None) -> int:
    """The command line: exit 0, 2 with one `error: ...` line for a mistake in the config or data, 1 for a bug."""
    return run_main(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO, "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("train").info("host malloc: %s", keep_freed_memory())  # before JAX starts its backend
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
