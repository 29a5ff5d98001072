"""python -m train.prepare: Mimi codes once into ArrayRecord, split across workers, rerunnable; training reads
the prepared shards into the same batches as the tar shards."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import HANG_SECONDS, ENGLISH, MANDARIN
from train.data import DataConfig, Featurizer, dataset

ROOT = Path(__file__).resolve().parents[1]


def test_batched_mimi_codes_equal_one_utterance_at_a_time():
    from csm_jax.io import audio
    from csm_jax.io.audio import encode_batch

    mimi = audio.random_mimi(0)
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (24000, 13000, 40001)]
    for clip, codes in zip(clips, encode_batch(mimi, clips)):
        np.testing.assert_array_equal(codes, audio.encode(mimi, clip))  # exact: Mimi is causal


def prepare(shards, out, worker, workers):
    result = subprocess.run([sys.executable, "-m", "train.prepare", str(shards), str(out), "--mimi", "random",
                             "--worker", str(worker), "--workers", str(workers), "--batch-size", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_workers_split_shards_skip_done_ones_and_training_reads_the_same_batches(shards, tmp_path):
    out = tmp_path / "prepared"
    reports = prepare(shards, out, 0, 2) + prepare(shards, out, 1, 2)
    assert sorted(Path(r["output"]).relative_to(out).as_posix() for r in reports) == [
        "EN/EN-B000000.array_record", "ZH/ZH-B000000.array_record"]
    by_shard = {Path(r["source"]).stem: r for r in reports}
    assert by_shard["EN-B000000"]["records"] == len(ENGLISH)
    assert by_shard["EN-B000000"]["skipped"] == {"missing json": 1, "empty text": 1, "non-finite audio": 1,
                                                 "bad audio": 1}
    assert by_shard["ZH-B000000"] == {**by_shard["ZH-B000000"], "records": len(MANDARIN), "skipped": {}}
    assert prepare(shards, out, 0, 2) == [] and not list(out.rglob(".*partial*"))  # done shards are skipped

    from csm_jax.io import audio, text
    cfg = DataConfig(max_frames=128, batch_size=1, shuffle_window=1, interleave=1)
    featurizer = Featurizer(text.load_tokenizer(), audio.random_mimi(0), cfg)
    from_tar = list(dataset(str(shards), cfg, featurizer, repeat=False))
    from_prepared = list(dataset(str(out), cfg, featurizer, repeat=False))
    assert len(from_tar) == len(from_prepared) == len(ENGLISH) + len(MANDARIN)
    for a, b in zip(from_tar, from_prepared):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
