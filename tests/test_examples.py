"""Every file of examples/ runs as the documentation shows it (the docs include these files), on tiny random models:
a `tiny_full_vocab` checkpoint, random Mimi weights saved as a file, espeak-ng speech for clips."""

import os
import runpy
import subprocess
import sys
import wave

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import KEY, ROOT, espeak_wav, random_mimi_file, tiny_checkpoint

EXAMPLES = ROOT / "examples"
SHORT = ["--max-audio-length-ms", "1200"]  # 15 frames: random weights never end an utterance


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def mimi_file(tmp_path_factory):
    return random_mimi_file(tmp_path_factory.mktemp("mimi") / "mimi.safetensors")


def run_example(name: str, *args: str, monkeypatch, capsys) -> str:
    """Runs examples/NAME in this process with the command line `args`; returns what it printed."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def seconds(path) -> float:
    info = sf.info(str(path))
    assert info.samplerate == 24_000 and info.channels == 1
    return info.frames / info.samplerate


def test_voice_from_clip(checkpoint, mimi_file, tmp_path, monkeypatch, capsys):
    clip = espeak_wav(tmp_path / "clip.wav", "this is how I sound", rate=16000)
    out = tmp_path / "out.wav"
    printed = run_example("voice_from_clip.py", *SHORT, clip, "this is how I sound", str(out), "--text", "Hi.",
                          "--checkpoint", checkpoint, "--mimi", mimi_file, monkeypatch=monkeypatch, capsys=capsys)
    assert 0 < seconds(out) <= 1.2 and f"wrote {out}" in printed


def test_dialogue(checkpoint, mimi_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "talk.wav"
    printed = run_example("dialogue.py", *SHORT, str(out), "--checkpoint", checkpoint, "--mimi", mimi_file,
                          monkeypatch=monkeypatch, capsys=capsys)
    turns = [seconds(tmp_path / f"talk_{i:03d}.wav") for i in (1, 2, 3)]
    assert all(t > 0 for t in turns) and seconds(out) == pytest.approx(sum(turns))
    # each turn follows the ones before it, as many as the tiny model's 256-frame window holds beside it
    assert [line.split("prompt: ")[1] for line in printed.splitlines() if line.startswith("turn ")] == ["0", "1", "2"]


def test_batch_job(checkpoint, mimi_file, tmp_path, monkeypatch, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line.\nThird line.\n")
    printed = run_example("batch_job.py", *SHORT, str(lines), str(tmp_path / "out"), "--batch-size", "2",
                          "--checkpoint", checkpoint, "--mimi", mimi_file, monkeypatch=monkeypatch, capsys=capsys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["001.wav", "002.wav", "003.wav"]
    assert "lines 3-3 of 3 done" in printed


def test_sampler_experiment(checkpoint, mimi_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "best.wav"
    printed = run_example("sampler_experiment.py", *SHORT, str(out), "-n", "3", "--text", "Hi.", "--checkpoint",
                          checkpoint, "--mimi", mimi_file, monkeypatch=monkeypatch, capsys=capsys)
    names = ["built-in, t=0.9 top-k 50", "no-repeat, t=0.8"]
    rows = {line[:26].strip(): line[26:].split() for line in printed.splitlines() if line[:26].strip() in names}
    assert sorted(rows) == names
    assert all(float(mean) < 0 for mean, _, _ in rows.values())  # mean log-probabilities
    assert "best of 3: take" in printed and seconds(out) > 0


def test_openai_app(server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hello.wav"
    printed = run_example("openai_app.py", "--base-url", f"{server.url}/v1", "--api-key", KEY, "--voice", "narrator",
                          "--out", str(out), monkeypatch=monkeypatch, capsys=capsys)
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24_000 and w.getnframes() > 0
    streamed = float(printed.split("streamed ")[1].split(" s")[0])
    assert streamed > 0


def test_lora_on_folder(checkpoint, tmp_path):
    folder = tmp_path / "my_voice"
    folder.mkdir()
    for i, text in enumerate(["hello there", "the weather is fine", "see you tomorrow", "thank you"]):
        espeak_wav(folder / f"clip{i}.wav", text)
        (folder / f"clip{i}.txt").write_text(text)
    work = tmp_path / "run"
    # the recipe on four clips and a few steps (no samples); init= gives the model, the recipe's finalize() its
    # warm-up, and four clips hold out too few for an eval batch
    tiny = ["mimi=random", "compute_dtype=float32", "steps=3", "save_every=3", "log_every=1", "sample_every=0",
            "data.max_frames=128", "data.batch_size=2", "data.shuffle_window=4", "lora.rank=4"]
    done = subprocess.run(["bash", str(EXAMPLES / "lora_on_folder.sh"), str(folder), checkpoint, str(work), *tiny],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "MIMI": "random"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no eval in this run" in done.stderr
    assert (work / "adapter" / "adapter_model.safetensors").is_file() and seconds(work / "after.wav") > 0
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite([float(line.split('"loss": ')[1].split(",")[0])
                        for line in (work / "metrics.jsonl").read_text().splitlines()]).all()
