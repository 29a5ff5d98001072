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


def test_long_clips_are_encoded_in_chunks_equal_to_one_streaming_pass():
    import torch

    from csm_jax.io import audio

    mimi = audio.random_mimi(0)
    clip = 0.1 * np.random.default_rng(1).standard_normal(3 * 1920 * 5 + 700).astype(np.float32)  # 16 frames
    padded = np.pad(clip, (0, 16 * 1920 - len(clip)))[None, None]
    with torch.no_grad():
        whole = mimi._encode_to_unquantized_latent(torch.from_numpy(padded))
        with mimi.streaming(1):
            streamed = mimi._encode_to_unquantized_latent(torch.from_numpy(padded))
        with mimi.streaming(1):
            one_pass = mimi.encode(torch.from_numpy(padded)).numpy()[0]
    # Mimi's streaming state carries the context across calls: float32 round-off only, relative to the latents' scale
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()
    original = audio.ENCODE_CHUNK_FRAMES
    try:
        audio.ENCODE_CHUNK_FRAMES = 5  # 4 chunks, the last one short
        chunked = audio.encode_batch(mimi, [clip[:1920 * 5], clip])
    finally:
        audio.ENCODE_CHUNK_FRAMES = original
    np.testing.assert_array_equal(chunked[1], one_pass)
    np.testing.assert_array_equal(chunked[0], audio.encode(mimi, clip[:1920 * 5]))  # not chunked: one call


PEAK_MEMORY = """
import resource, sys
import numpy as np, soundfile as sf
from pathlib import Path
from csm_jax.io import audio
from train.prepare import main

audio.ENCODE_CHUNK_FRAMES = 13  # 1 s chunks instead of 20 s, so that short clips show the bound
root, seconds = Path(sys.argv[1]), int(sys.argv[2])
(root / "src").mkdir(parents=True)
noise = 0.1 * np.random.default_rng(0).standard_normal(16000 * seconds)
sf.write(root / "src" / "clip.wav", noise.astype(np.float32), 16000)
(root / "src" / "clip.txt").write_text("a long clip")
assert main([str(root / "src"), str(root / "out"), "--mimi", "random"]) == 0
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_prepare_memory_does_not_grow_with_a_clips_length(tmp_path):
    runs = [subprocess.Popen([sys.executable, "-c", PEAK_MEMORY, str(tmp_path / str(seconds)), str(seconds)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seconds in (2, 8)]
    peaks = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        peaks.append(int(out.split("peak")[1]))
    # Encoding the 8 s clip whole would add about 6 s x 24 MB/s (Mimi's activations on the CPU) = 140 MB to the
    # peak of the 2 s clip; in 1 s chunks only its samples and codes grow (well under 1 MB per second)
    assert peaks[1] - peaks[0] < 50 * 1024, peaks  # ru_maxrss is in kB
