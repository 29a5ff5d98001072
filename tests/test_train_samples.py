"""Samples while fine-tuning (`sample_every`): a LoRA run of `python -m train` on a folder of espeak-ng clips, on a
two-device mesh, speaks its sample prompt at the sample steps with one compiled generation, survives a sample that
cannot be written, lowers the held-out loss and exports an adapter that `python -m csm_jax.generate` uses."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import HANG_SECONDS, espeak_wav

ROOT = Path(__file__).resolve().parents[1]
# short, so that encoding them with the random Mimi stays cheap; clip03 and clip07 fall in the held-out 25%
SENTENCES = ["Hello there.", "Thank you.", "It is raining.", "Good night.", "I like tea.", "See you soon.",
             "The train is late.", "Where is it?"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("voice")
    for i, text in enumerate(SENTENCES):
        espeak_wav(d / f"clip{i:02d}.wav", text)
        (d / f"clip{i:02d}.txt").write_text(text)
    return d


def test_lora_run_speaks_samples_survives_a_failed_one_and_its_adapter_generates(clips, tmp_path):
    from flax import nnx

    from csm_jax.core.config import preset
    from csm_jax.core.model import Csm
    from csm_jax.io.adapters import load_adapter
    from csm_jax.io.checkpoint import save_model

    config = preset("tiny_full_vocab")
    base = save_model(Csm(config, rngs=nnx.Rngs(0)), tmp_path / "base")
    work = tmp_path / "run"
    (work / "samples" / "step_000003.wav").mkdir(parents=True)  # a directory where that sample goes: it fails
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_LOG_COMPILES": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "train", "--config", "train/configs/smoke.py", f"data.source={clips}", f"init={base}",
         f"workdir={work}", "mesh=(1,2,1)", "steps=6", "log_every=3", "save_every=100", "lora.rank=4",
         "lora.alpha=8", "lora.targets=q,v,down", "eval_every=6", "data.eval_fraction=0.25", "sample_every=3",
         "sample_max_frames=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert out.returncode == 0, out.stderr[-3000:]

    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval/loss"] for m in metrics if "eval/loss" in m}
    assert sorted(evals) == [0, 6] and evals[6] < evals[0], evals  # measured: 15.33 -> 15.18

    assert "the sample of step 3 failed; training goes on" in out.stderr
    written = sorted(p.name for p in (work / "samples").iterdir() if p.is_file())
    assert written == ["step_000000.wav", "step_000006.wav"]
    waves = []
    for name in written:
        wave, rate = sf.read(work / "samples" / name, dtype="float32")
        assert rate == 24000 and 0 < len(wave) <= 4 * 1920 and len(wave) % 1920 == 0
        waves.append(wave)
    assert not np.array_equal(waves[0], waves[1])  # the same seed and prompt: the trained weights changed it
    seconds = {m["step"]: m["sample/seconds"] for m in metrics if "sample/seconds" in m}
    assert sorted(seconds) == [0, 6] and seconds[6] == len(waves[1]) / 24000
    assert any(b"audio/wav" in p.read_bytes() for p in (work / "tensorboard").iterdir())
    # three generations (steps 0, 3, 6) with new weights each time, one compile (jax's compile log)
    assert len(re.findall(r"Compiling (jit\()?_sample_codes\b", out.stderr)) == 1, out.stderr[-3000:]

    adapter = load_adapter(work / "adapter", config)
    assert adapter.metadata["step"] == 6
    wav = tmp_path / "out.wav"
    out = subprocess.run([sys.executable, "-m", "csm_jax.generate", "--checkpoint", str(base), "--adapter",
                          str(work / "adapter"), "--mimi", "random", "--text", "Hello there.",
                          "--max-audio-length-ms", "160", "--no-watermark", "--out", str(wav)],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert out.returncode == 0, out.stderr[-3000:]
    wave, rate = sf.read(wav)
    assert rate == 24000 and len(wave) > 0


@pytest.mark.parametrize("overrides, message", [
    (["sample_text= "], "sample_text is empty"),
    (["sample_context=missing.wav", "sample_context_text=Hi."], "sample_context=missing.wav is not a file"),
    (["sample_context={clip}"], "needs sample_context_text"),
    (["sample_context_text=Hi."], "sample_context_text is set without sample_context"),
    (["sample_max_frames=0"], "sample_max_frames=0 must be positive"),
    (["sample_seed=4294967296"], "sample_seed=4294967296 is not below 2**32"),
])
def test_sample_settings_are_checked_before_anything_is_built(clips, tmp_path, overrides, message):
    from train.config import TrainConfigError, load_config, validate

    overrides = [o.format(clip=clips / "clip00.wav") for o in overrides]
    cfg = load_config(ROOT / "train/configs/smoke.py", [f"data.source={clips}", f"workdir={tmp_path / 'run'}",
                                                        "sample_every=2", *overrides])
    with pytest.raises(TrainConfigError, match=message.replace("*", r"\*")):
        validate(cfg)


def test_a_sample_prompt_that_does_not_fit_the_model_stops_before_training(clips, tmp_path):
    from csm_jax.core.config import preset
    from train.__main__ import VoiceSampler
    from train.config import TrainConfigError, load_config

    cfg = load_config(ROOT / "train/configs/smoke.py", [f"data.source={clips}", f"workdir={tmp_path / 'run'}",
                                                        "sample_every=2", "sample_max_frames=100000"])
    with pytest.raises(TrainConfigError, match="leaves room for .* lower sample_max_frames"):
        VoiceSampler(cfg, preset(cfg.model), mimi=None)
    assert not (tmp_path / "run").exists()
