"""Training throughput on real utterances, packed (`data.packing=true`) against padded (one utterance per row):
the same espeak-ng sentences of varied length, Mimi-encoded once, batched by the training pipeline's own padding
and packing (`train.data.batches`), trained with the same model, batch shape and weights, passes of both
alternating in one run.

    python -m benchmarks.bench_pack --config small --batch 4

Prints per mode the rows per pass, the padding fraction and the frames/s of real (non-padding) frames, and the
ratio packed / padded. Random Mimi weights (no download): the codes' lengths, which set the padding, are Mimi's
frame rate whatever the weights.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.core.config import preset
from csm_jax.core.sharding import make_mesh
from csm_jax.io import audio, text
from tests.helpers import ENGLISH, espeak_wav
from train.data import DataConfig, Featurizer, batches, check_metadata
from train.sources import examples
from train.trainer import OptimConfig, Trainer

SENTENCES = ENGLISH + [
    "Yes.", "Thank you very much.", "Where is the library?", "It is raining again.", "Good night, everyone.",
    "My brother plays the piano every evening after dinner.", "The train to the coast leaves at nine.",
    "Could you tell me how to get to the station from here, please?",
    "Some days are long and quiet, and others pass before you notice that they have begun.",
    "I would like a cup of green tea.", "See you soon.",
    "The museum opens at ten, closes at six, and is free on the first Sunday of every month.",
]


def utterance_frames(featurizer: Featurizer, folder: Path) -> list[dict[str, np.ndarray]]:
    """Every clip of `folder` as the frames of one training utterance (Mimi-encoded once)."""
    source = examples(str(folder), "folder", featurizer.cfg)
    frames = [featurizer.frames(featurizer.encode(check_metadata(source[i]))) for i in range(len(source))]
    assert all(f is not None for f in frames), "an utterance was skipped: raise --frames"
    return frames


def mode_batches(frames: list[dict[str, np.ndarray]], cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """One pass of the utterances through the training pipeline's batching (full batches only, as in training)."""
    return list(batches(grain.MapDataset.source(frames).to_iter_dataset(), cfg, accumulation=1))


def pass_time(trainer: Trainer, state, placed: list[dict]) -> tuple[object, float]:
    start = time.perf_counter()
    for batch in placed:
        state, metrics = trainer._step(state, batch, trainer.frozen)
    jax.block_until_ready(metrics)
    return state, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--frames", type=int, default=0, help="row length (default: the longest utterance, rounded up "
                                                          "to 32: the shortest a padded run could use)")
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--passes", type=int, default=3, help="timed passes per mode (after one warm-up pass each)")
    args = p.parse_args()

    config = preset(args.config)
    featurizer = Featurizer(text.load_tokenizer(), audio.random_mimi(0, num_codebooks=config.num_codebooks),
                            DataConfig(max_frames=2048, max_duration=60.0), config.num_codebooks)
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(SENTENCES):
            espeak_wav(Path(tmp) / f"u{i:02d}.wav", sentence)
            (Path(tmp) / f"u{i:02d}.txt").write_text(sentence)
        frames = utterance_frames(featurizer, Path(tmp))
    lengths = [len(f["tokens"]) for f in frames]
    max_frames = args.frames or -(-max(lengths) // 32) * 32
    modes = {name: mode_batches(frames, DataConfig(max_frames=max_frames, batch_size=args.batch, packing=packing))
             for name, packing in (("padded", False), ("packed", True))}

    trainer = Trainer(config, OptimConfig(learning_rate=1e-5, warmup_steps=0), make_mesh(-1, 1, 1),
                      compute_dtype=jnp.dtype(args.dtype))
    state = trainer.init_state(0)
    placed = {name: [trainer.put_batch(b) for b in bs] for name, bs in modes.items()}
    times = {name: [] for name in modes}
    for i in range(args.passes + 1):  # alternate the modes; the first pass of each compiles and warms up
        for name in modes:
            state, seconds = pass_time(trainer, state, placed[name])
            if i:
                times[name].append(seconds)

    print(f"{len(frames)} utterances of {min(lengths)}-{max(lengths)} frames (text + audio + end frame), "
          f"{sum(lengths)} frames in all; {args.config}, {args.dtype}, rows of {max_frames} frames, "
          f"{args.batch} rows per step, {jax.devices()[0].platform}")
    rate = {}
    for name, bs in modes.items():
        seg = np.concatenate([b["segment_ids"].reshape(-1, max_frames) for b in bs])
        real = int((seg > 0).sum())
        seconds = statistics.median(times[name])
        rate[name] = real / seconds
        print(f"{name}: {len(bs)} steps ({len(seg)} rows) per pass, {real} real frames, padding fraction "
              f"{float(np.mean(seg == 0)):.3f}, {seconds:.2f} s per pass (median of {args.passes}), "
              f"{rate[name]:.0f} real frames/s")
    print(f"ratio packed / padded (real frames/s): {rate['packed'] / rate['padded']:.2f}")


if __name__ == "__main__":
    main()
