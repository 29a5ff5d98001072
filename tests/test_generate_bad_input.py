"""The command line answers every mistake with exit 2 and one `error:` line that names the fix, before it touches
any file; it replaces --out only with a complete file; SIGINT and SIGTERM while streaming keep what was written as
a valid OUT.partial.wav and leave --out as it was."""

import dataclasses
import os
import pickle
import signal
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.generate import main
from csm_jax.io import audio
from csm_jax.io.checkpoint import save_model
from tests.helpers import WatchedProcess

EXISTING = b"RIFF: the user's own file, which no failed or interrupted run may change"


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):  # noqa: F811
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture
def shared_mimi(generator, monkeypatch):  # noqa: F811
    """`--mimi random` in-process takes the module's random Mimi instead of building another."""
    monkeypatch.setattr(audio, "random_mimi", lambda *args, **kwargs: generator.mimi)


@pytest.fixture
def out(tmp_path):
    (tmp_path / "o").mkdir()
    path = tmp_path / "o" / "out.wav"
    path.write_bytes(EXISTING)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code, err, message, out):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert out.read_bytes() == EXISTING
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.wav"]  # no temporary or partial file


def base(out, checkpoint, *extra):
    return ["--text", "Hello there.", "--out", out, "--checkpoint", checkpoint, "--mimi", "random", "--no-watermark",
            *extra]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not weights")
    (d / "text.safetensors").write_text("not weights either")
    from safetensors.torch import save_file
    import torch

    save_file({"lm.head": torch.zeros(2)}, d / "other.safetensors")

    class RunsCode:
        def __reduce__(self):
            return (open, (str(d / "pwned"), "w"))

    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    (d / "tokenizer.model").write_text("not a tokenizer\n")
    sf.write(d / "nan.wav", np.array([0.1, np.nan] * 2000, np.float32), 24000, subtype="FLOAT")
    (d / "adir").mkdir()
    return d


# Refused before the model is loaded: (arguments, what the error line must say). B is the bad-files directory.
EARLY = [
    (["--speaker", "bob"], "--speaker 'bob' is not a speaker id; speaker ids are integers >= 0"),
    (["--speaker", "-1"], "--speaker '-1' is not a speaker id"),
    (["--speaker", "1.5"], "--speaker '1.5' is not a speaker id"),
    (["--seed", "-1"], "seed -1 is not an integer in [0, 2**32)"),
    (["--seed", str(2 ** 32)], "seed 4294967296 is not an integer in [0, 2**32)"),
    (["--max-audio-length-ms", "inf"], "max_audio_length_ms=inf is not a finite number"),
    (["--max-audio-length-ms", "nan"], "max_audio_length_ms=nan is not a finite number"),
    (["--max-audio-length-ms", "-5"], "max_audio_length_ms=-5.0 is shorter than one 80 ms frame"),
    (["--max-audio-length-ms", "10"], "shorter than one 80 ms frame"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--depth-top-p", "2"], "top_p must be in"),
    (["--text", "  "], "--text is empty; give the words to say"),
    (["--context", "B/missing.wav", "words"], "audio file B/missing.wav does not exist"),
    (["--context", "B/adir", "words"], "audio file B/adir is a directory"),
    (["--context", "B/nan.wav", "words"], "B/nan.wav has 2000 NaN or infinite samples"),
    (["--context", "B/notes.txt", "words"], "cannot read audio file B/notes.txt"),
    (["--context", "CTX", "words", "S1"], "--context CTX's speaker 'S1' is not a speaker id"),
    (["--context", "CTX"], "--context takes WAV TRANSCRIPT [SPEAKER]"),
    (["--out", "B/adir"], "output B/adir is a directory"),
    (["--out", "B/noext"], "output B/noext has no extension; end it with .wav, .flac, .ogg"),
    (["--out", "B/x.mp3"], "has the extension '.mp3'"),
    (["--out", "B/notes.txt/x.wav"], "B/notes.txt is a file, not a directory"),
    (["--out", "/proc/csm_out.wav"], "no permission to create files in /proc"),
    (["--weights-dtype", "float16"], "argument --weights-dtype: invalid choice"),
]


def test_mistakes_are_reported_before_loading_anything(checkpoint, context_wav, bad_files, out, capsys):  # noqa: F811
    for extra, message in EARLY:
        extra = [a.replace("B/", f"{bad_files}/").replace("CTX", context_wav) for a in extra]
        message = message.replace("B/", f"{bad_files}/").replace("CTX", context_wav)
        code, err = run(base(out, checkpoint, *extra), capsys)  # a later --out/--text wins over base's
        assert_refused(code, err, message, out)
    code, err = run(["--out", out], capsys)
    assert_refused(code, err, "give exactly one of --text, --text-file, --script, --batch-file", out)


def test_bad_model_files_are_reported_by_name(checkpoint, bad_files, out, tmp_path, shared_mimi, capsys):
    import shutil

    no_params = tmp_path / "no_params"
    shutil.copytree(checkpoint, no_params)
    shutil.rmtree(no_params / "params")
    bad_json = tmp_path / "bad_json"
    shutil.copytree(checkpoint, bad_json)
    (bad_json / "config.json").write_text("{oops")
    garbage = tmp_path / "garbage"
    shutil.copytree(checkpoint, garbage)
    for f in (garbage / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    cases = [
        (["--mimi", bad_files / "adir"], "is a directory"),
        (["--mimi", bad_files / "notes.txt"], "neither .safetensors nor a PyTorch .pt file"),
        (["--mimi", bad_files / "text.safetensors"], "cannot read Mimi weights"),
        (["--mimi", bad_files / "other.safetensors"], "does not hold Mimi's weights: 318 of Mimi's 318 tensors"),
        (["--mimi", bad_files / "evil.pt"], "refusing to load"),
        (["--tokenizer", bad_files / "missing"], "does not exist"),
        (["--tokenizer", bad_files / "tokenizer.model"], "is not a tiktoken tokenizer.model"),
        (["--checkpoint", no_params], "lacks params/"),
        (["--checkpoint", bad_json], f"cannot read {bad_json}/config.json"),
        (["--checkpoint", garbage], f"cannot restore the parameters in {garbage}/params"),
        (["--checkpoint", tmp_path / "nope"], "does not exist"),
    ]
    for extra, message in cases:
        code, err = run(base(out, checkpoint, *extra), capsys)
        assert_refused(code, err, message, out)
    assert not (bad_files / "pwned").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_budget_never_touches_the_output(checkpoint, context_wav, out, shared_mimi, stream,  # noqa: F811
                                                       capsys):
    code, err = run(base(out, checkpoint, "--max-audio-length-ms", "1e9", *(["--stream"] if stream else [])), capsys)
    assert_refused(code, err, "lower max_audio_length_ms to", out)
    code, err = run(base(out, checkpoint, "--text", "word " * 300, *(["--stream"] if stream else [])), capsys)
    assert_refused(code, err, "drop or shorten context segments, or shorten the text", out)


# ---- real interruptions of a real streaming process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """The test model with room for 2000 frames (160 s), so that a stream is still running when it is signalled."""
    config = preset("tiny_full_vocab")
    config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, max_seq_len=2048))
    return save_model(Csm(config, rngs=nnx.Rngs(1)), tmp_path_factory.mktemp("long") / "ckpt")


def start_streaming(out, checkpoint) -> WatchedProcess:
    """`python -m csm_jax.generate --stream` in a subprocess."""
    return WatchedProcess([sys.executable, "-m", "csm_jax.generate",
                           *base(out, checkpoint, "--max-audio-length-ms", "150000", "--stream")])


def test_sigint_and_sigterm_keep_a_valid_partial_file_and_the_users_file(long_checkpoint, tmp_path):
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # both at once: they share the machine while compiling
        (tmp_path / sig.name).mkdir()
        out = tmp_path / sig.name / "out.wav"
        out.write_bytes(EXISTING)
        runs[sig] = out, start_streaming(out, long_checkpoint)
    for sig, (out, streaming) in runs.items():
        streaming.wait_for("time to first audio")
        time.sleep(1.0)  # a few more chunks
        streaming.process.send_signal(sig)
    for sig, (out, streaming) in runs.items():
        code, err = streaming.finish()
        assert code == 128 + sig, err
        assert "Traceback" not in err and "interrupted" in err
        assert out.read_bytes() == EXISTING
        partial = out.with_name("out.partial.wav")
        assert "kept the" in err and str(partial) in err
        assert sorted(p.name for p in out.parent.iterdir()) == ["out.partial.wav", "out.wav"]
        info = sf.info(str(partial))  # the header counts exactly the frames the file holds
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert 0 < info.frames < 2000 * 1920 and info.frames % 1920 == 0
        assert os.path.getsize(partial) == 44 + 2 * info.frames
        assert len(sf.read(str(partial))[0]) == info.frames
