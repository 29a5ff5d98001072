"""The command line answers every mistake with exit 2 and one `error:` line that names the fix, before it touches
any file; it replaces --out only with a complete file; SIGINT and SIGTERM while streaming keep what was written as
a valid OUT.partial.wav and leave --out as it was."""

import dataclasses
import json
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
from tests.helpers import WatchedProcess, truncated_adapter

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
    (["--max-audio-length-ms", "inf"], "argument --max-audio-length-ms: 'inf' is not a finite number"),
    (["--max-audio-length-ms", "nan"], "argument --max-audio-length-ms: 'nan' is not a finite number"),
    (["--stop-after-silence-ms", "nan"], "argument --stop-after-silence-ms: 'nan' is not a finite number; give a "
                                         "number such as 1.5"),
    (["--end-bias", "nan"], "argument --end-bias: 'nan' is not a finite number"),
    (["--silence-db=-inf"], "argument --silence-db: '-inf' is not a finite number"),
    (["--depth-min-p", "nan"], "argument --depth-min-p: 'nan' is not a finite number"),
    (["--crossfade-ms", "-10"], "--crossfade-ms must be >= 0 (0 = butt joins), got -10"),
    (["--max-audio-length-ms", "-5"], "max_audio_length_ms=-5.0 is shorter than one 80 ms frame"),
    (["--max-audio-length-ms", "10"], "shorter than one 80 ms frame"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "inf"], "argument --temperature: 'inf' is not a finite number"),
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
    truncated = truncated_adapter(tmp_path / "adapter")
    cases = [
        (["--adapter", truncated], f"cannot read {truncated}/adapter_model.safetensors"),
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


# ---- the output set of --script and --batch-file, checked before the model loads -----------------------------------


def user_files(folder, names):
    """The user's own files `names` in `folder`."""
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(EXISTING + name.encode())


def snapshot(folder):
    """Every path under `folder`, with the bytes of the files."""
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def assert_untouched(code, err, message, folder, before):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert snapshot(folder) == before


def test_batch_and_script_outputs_never_replace_a_users_file(checkpoint, tmp_path, capsys):
    (tmp_path / "lines.txt").write_text("First line.\n\nThird line.\n")
    (tmp_path / "talk.jsonl").write_text('{"speaker": 0, "text": "Hi."}\n{"speaker": 1, "text": "Hello."}\n')
    (tmp_path / "afile").write_bytes(EXISTING)
    user_files(tmp_path / "lines", ["003.wav", "notes.txt"])
    user_files(tmp_path / "talk", ["talk_002.wav"])
    user_files(tmp_path / "turns", ["001.wav", "002.wav"])
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "outside.wav").write_bytes(EXISTING)
    for name, turn in [("abc", {"speaker": "abc", "text": "Hi."}), ("minus", {"speaker": -1, "text": "Hi."}),
                       ("outside", {"speaker": 0, "text": "Hi.", "audio": "../outside.wav"}),
                       ("absolute", {"speaker": 0, "text": "Hi.", "audio": str(tmp_path / "outside.wav")})]:
        (tmp_path / "scripts" / f"{name}.jsonl").write_text(json.dumps(turn) + "\n")
    batch = ["--batch-file", tmp_path / "lines.txt", "--checkpoint", checkpoint, "--mimi", "random", "--no-watermark"]
    script = ["--script", tmp_path / "talk.jsonl", *batch[2:]]
    out = ["--out", tmp_path / "new.wav"]
    cases = [
        ([*batch, "--out-dir", tmp_path / "lines"],
         f"--out-dir {tmp_path / 'lines'} already holds 003.wav, which this run would replace; nothing was written. "
         f"Pass --overwrite"),
        ([*script, "--out", tmp_path / "talk" / "talk.wav"],
         "already holds talk_002.wav, which this run would replace"),
        ([*script, "--out", tmp_path / "talk.wav", "--out-dir", tmp_path / "turns"], "already holds 001.wav, 002.wav"),
        ([*script, "--out", tmp_path / "turns" / "001.wav", "--out-dir", tmp_path / "turns", "--overwrite"],
         "is also the name of a per-turn wav; give --out another name"),
        ([*batch, "--out-dir", tmp_path / "afile"], f"--out-dir {tmp_path / 'afile'} is a file; give a folder"),
        ([*batch, "--out-dir", "/proc/csm_lines"], "no permission to create files in /proc"),
        ([*script, *out, "--script", tmp_path / "scripts" / "abc.jsonl"],
         "abc.jsonl line 1: speaker 'abc' is not a speaker id; speaker ids are integers >= 0"),
        ([*script, *out, "--script", tmp_path / "scripts" / "minus.jsonl"], "minus.jsonl line 1: speaker -1 is not"),
        ([*script, *out, "--script", tmp_path / "scripts" / "outside.jsonl"],
         "audio '../outside.wav' is outside the script's folder"),
        ([*script, *out, "--script", tmp_path / "scripts" / "absolute.jsonl"], "put the recording in that folder"),
        ([*script, *out, "--script", tmp_path / "binary.txt"], "is not UTF-8 text (byte 0x89 at offset 0); give a "
                                                               "plain text file"),
        ([*script[2:], *out, "--text-file", tmp_path / "binary.txt"], f"--text-file {tmp_path / 'binary.txt'} is "
                                                                      f"not UTF-8 text"),
        ([*batch, "--out-dir", tmp_path / "new", "--batch-file", tmp_path / "binary.txt"], "is not UTF-8 text"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o555)
        cases.append(([*batch, "--out-dir", tmp_path / "locked"], "no permission to create files in"))
    before = snapshot(tmp_path)
    for argv, message in cases:
        code, err = run(argv, capsys)
        assert_untouched(code, err, message, tmp_path, before)


def test_overwrite_replaces_only_the_runs_own_outputs_and_errors_end_the_progress_line(checkpoint, tmp_path,
                                                                                      shared_mimi, capsys):
    (tmp_path / "lines.txt").write_text("First line.\n\nThird line.\n")
    user_files(tmp_path / "lines", ["003.wav", "notes.txt"])
    notes = (tmp_path / "lines" / "notes.txt").read_bytes()
    argv = ["--batch-file", tmp_path / "lines.txt", "--out-dir", tmp_path / "lines", "--overwrite", "--checkpoint",
            checkpoint, "--mimi", "random", "--no-watermark", "--max-audio-length-ms", "160"]

    def disk_full(path, *args):
        raise audio.AudioError(f"cannot write {path}: [Errno 28] No space left on device; free some space")

    with pytest.MonkeyPatch.context() as patch:  # a mistake while the progress bar is drawn
        patch.setattr(audio, "write_audio", disk_full)
        code, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.rstrip("\n").split("\n")[-1].startswith("error: cannot write"), err  # not after the bar's \r
    code, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "lines").iterdir()) == ["001.wav", "003.wav", "notes.txt"]
    assert (tmp_path / "lines" / "notes.txt").read_bytes() == notes
    assert sf.info(str(tmp_path / "lines" / "003.wav")).samplerate == 24000
