"""The Python API refuses every malformed request with one `UserError` that names the fix, before any compute,
through every entry point; context audio is normalised (int PCM scaled, channels averaged); bad Mimi weights,
tokenizers and checkpoints are reported by file; the conversion cache is keyed by the resolved source and its
files' size and modification time."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from csm_jax.core.errors import UserError
from csm_jax.inference.generator import Request
from csm_jax.inference.prompt import PromptTooLongError, RequestError
from csm_jax.io import audio
from csm_jax.io.audio import AudioError
from csm_jax.io.checkpoint import CheckpointError, load_model, save_model
from csm_jax.io.frames import Segment
from csm_jax.io.hub import resolve_checkpoint
from csm_jax.io.text import TokenizerError, load_tokenizer
from tests.helpers import truncated_adapter

SPEECH_TEXT = "this is what came before"


@pytest.fixture(scope="module")
def speech(context_wav):  # noqa: F811
    return audio.read_audio(context_wav)[4800:4800 + 6 * 1920]  # six frames of speech: enough to compare codes


def prompt_tokens(generator, context, text="Hi.", speaker=0):  # noqa: F811
    return generator.prompt(Request(text, speaker, context)).tokens


# ---- context audio is normalised -------------------------------------------------------------------------------


def test_int16_context_gives_the_codes_of_its_float_version(generator, speech):  # noqa: F811
    pcm = np.round(np.clip(speech, -1, 1 - 2 ** -15) * 2 ** 15).astype(np.int16)
    as_float = prompt_tokens(generator, [Segment(0, SPEECH_TEXT, pcm.astype(np.float64) / 2 ** 15)])
    np.testing.assert_array_equal(prompt_tokens(generator, [Segment(0, SPEECH_TEXT, pcm)]), as_float)
    pcm32 = pcm.astype(np.int32) << 16  # the same samples as 32-bit PCM
    np.testing.assert_array_equal(audio.as_mono(pcm32), audio.as_mono(pcm))


def test_stereo_context_is_the_mono_mean_whichever_axis_holds_the_channels(generator, speech):  # noqa: F811
    stereo = np.stack([speech, 0.5 * speech[::-1]], axis=1)
    mono = prompt_tokens(generator, [Segment(0, SPEECH_TEXT, stereo.mean(axis=1))])
    for given in (stereo, np.ascontiguousarray(stereo.T)):
        np.testing.assert_array_equal(prompt_tokens(generator, [Segment(0, SPEECH_TEXT, given)]), mono)


def test_speaker_ids_are_integers_given_as_ints_or_digit_strings(generator):  # noqa: F811
    one = prompt_tokens(generator, [], speaker=1)
    for same in ("1", "01", np.int64(1)):
        np.testing.assert_array_equal(prompt_tokens(generator, [], speaker=same), one)
    assert not np.array_equal(prompt_tokens(generator, [], speaker=2), one)


# ---- every entry point checks the request before any compute ------------------------------------------------------

ENTRY_POINTS = {
    "generate": lambda g, text, speaker, context, **kw: g.generate(text, speaker, context, **kw),
    "generate_batch": lambda g, text, speaker, context, seed=0, **kw: g.generate_batch(
        [Request(text, speaker, context)], seeds=[seed], **kw),
    "generate_codes": lambda g, text, speaker, context, seed=0, **kw: g.generate_codes(
        [Request(text, speaker, context)], seeds=[seed], **kw),
    "generate_stream": lambda g, text, speaker, context, **kw: g.generate_stream(text, speaker, context, **kw),
    "prompt": lambda g, text, speaker, context, seed=0, max_audio_length_ms=None: g.prompt(
        Request(text, speaker, context)),
}

NAN_AUDIO = np.array([0.1, np.nan, 0.2] * 1000, np.float32)
BAD_REQUESTS = [  # (text, speaker, context, keyword arguments, what the message must say)
    (None, 0, [], {}, "text is None (NoneType), not a str"),
    ("   ", 0, [], {}, "text is empty; give the words to say"),
    ("Hi.", None, [], {}, "speaker None is not a speaker id; speaker ids are integers >= 0"),
    ("Hi.", "bob", [], {}, "speaker 'bob' is not a speaker id"),
    ("Hi.", -1, [], {}, "speaker -1 is not a speaker id"),
    ("Hi.", 1.5, [], {}, "speaker 1.5 is not a speaker id"),
    ("Hi.", True, [], {}, "speaker True is not a speaker id"),
    ("Hi.", 0, [Segment(0, "x", np.zeros(0, np.float32))], {}, "context segment 0's audio holds no samples"),
    ("Hi.", 0, [Segment(0, "x", NAN_AUDIO)], {}, "context segment 0's audio has 1000 NaN or infinite samples"),
    ("Hi.", 0, [Segment(0, "x", np.full(4000, np.inf, np.float32))], {}, "4000 NaN or infinite samples"),
    ("Hi.", 0, [Segment(0, "x", np.zeros((3, 4000, 2), np.float32))], {}, "has shape (3, 4000, 2)"),
    ("Hi.", 0, [Segment(0, "x", np.zeros((100, 4000), np.float32))], {}, "at most 8 channels"),
    ("Hi.", 0, [Segment(0, "x", np.zeros(4000, np.int64))], {}, "dtype int64; give float audio in [-1, 1] or int16"),
    ("Hi.", 0, [Segment(0, "x", np.full(4000, 20000.0))], {}, "looks like integer PCM stored as floats"),
    ("Hi.", 0, [Segment(0, "x", None)], {}, "context segment 0 ('x') has no audio"),
    ("Hi.", 0, [Segment(None, "x", np.zeros(4000, np.float32))], {}, "context segment 0's speaker None"),
    ("Hi.", 0, [Segment("S1", "x", np.zeros(4000, np.float32))], {}, "context segment 0's speaker 'S1'"),
    ("Hi.", 0, [Segment(0, None, np.zeros(4000, np.float32))], {}, "context segment 0's text is None (NoneType)"),
    ("Hi.", 0, Segment(0, "x", np.zeros(4000, np.float32)), {}, "context is a Segment; give a list of Segment"),
    ("Hi.", 0, ["x"], {}, "context segment 0 is a str; give Segment(speaker, text, audio)"),
    ("Hi.", 0, [], {"seed": -1}, "seed -1 is not an integer in [0, 2**32)"),
    ("Hi.", 0, [], {"seed": 2 ** 32}, "seed 4294967296 is not an integer in [0, 2**32)"),
    ("Hi.", 0, [], {"max_audio_length_ms": float("inf")}, "max_audio_length_ms=inf is not a finite number"),
    ("Hi.", 0, [], {"max_audio_length_ms": float("nan")}, "max_audio_length_ms=nan is not a finite number"),
    ("Hi.", 0, [], {"max_audio_length_ms": -5.0}, "max_audio_length_ms=-5.0 is shorter than one 80 ms frame"),
    ("Hi.", 0, [], {"max_audio_length_ms": 1e9}, "lower max_audio_length_ms to"),
    ("word " * 300, 0, [], {}, "drop or shorten context segments, or shorten the text"),
]
# the prompt alone has no seed or length to check
PROMPT_ONLY_SKIPS = ("seed", "max_audio_length_ms")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_bad_requests_before_any_compute(generator, entry, monkeypatch):  # noqa: F811
    def no_compute(*args, **kwargs):
        raise AssertionError("generation started on a bad request")

    monkeypatch.setattr(generator.frames, "start", no_compute)
    monkeypatch.setattr(audio, "encode_batch", no_compute)
    checked = 0
    for text, speaker, context, kwargs, message in BAD_REQUESTS:
        if entry == "prompt" and any(k in kwargs for k in PROMPT_ONLY_SKIPS):
            continue
        with pytest.raises(UserError) as caught:
            ENTRY_POINTS[entry](generator, text, speaker, context, **kwargs)
        assert message in str(caught.value), (entry, message)
        assert "-12497953" not in str(caught.value) and "only -" not in str(caught.value)
        checked += 1
    assert checked >= 20


def test_an_empty_or_malformed_batch_is_refused(generator):  # noqa: F811
    for requests in ([], (), Request("Hi.", 0), ["Hi."]):
        with pytest.raises(RequestError, match="Request"):
            generator.generate_batch(requests)
    with pytest.raises(RequestError, match="one seed per request"):
        generator.generate_batch([Request("Hi.", 0), Request("Ho.", 1)], seeds=[1])


def test_a_ten_minute_context_is_refused_from_its_duration_before_encoding(generator, monkeypatch):  # noqa: F811
    def no_encode(*args, **kwargs):
        raise AssertionError("the context audio was encoded before the budget check")

    monkeypatch.setattr(audio, "encode_batch", no_encode)
    long = np.zeros(10 * 60 * audio.SAMPLE_RATE, np.int16)
    with pytest.raises(PromptTooLongError, match=r"the prompt is 75\d\d frames .* drop or shorten context segments"):
        generator.generate("Hi.", 0, [Segment(1, "a long monologue", long)], max_audio_length_ms=800)


def test_float_audio_files_with_nan_are_refused(tmp_path):
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "nan.wav", NAN_AUDIO, 24000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav has 1000 NaN or infinite samples"):
        audio.read_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="is a directory"):
        audio.read_audio(tmp_path)


# ---- Mimi weights: checked names and shapes, no unrestricted unpickling -------------------------------------------


@pytest.fixture(scope="module")
def mimi_state(generator):  # noqa: F811
    return {k: v.contiguous() for k, v in generator.mimi.state_dict().items()}


def test_mimi_weights_load_from_safetensors_and_tensor_only_pickles(mimi_state, tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("mimi")
    save_file(mimi_state, d / "mimi.safetensors")
    torch.save({"model": mimi_state}, d / "mimi.pt")  # moshi's own checkpoint layout
    for name in ("mimi.safetensors", "mimi.pt"):
        loaded = audio.load_mimi(d / name).state_dict()
        assert loaded.keys() == mimi_state.keys()
        assert all(torch.equal(loaded[k], mimi_state[k]) for k in mimi_state), name


class _RunsCode:
    """A pickle that creates a file when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_mimi_weights_are_checked_and_code_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f)
    torch.save({"model": {"w": _RunsCode(str(marker))}}, tmp_path / "evil_zip.pt")
    from safetensors.torch import save_file

    save_file({"encoder.model.0.conv.conv.weight": torch.zeros(3, 3), "lm.head": torch.zeros(2)},
              tmp_path / "other.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "text.safetensors").write_text("not weights either")
    cases = {
        "evil.pt": "refusing to load",
        "evil_zip.pt": "refusing to load",
        "other.safetensors": "does not hold Mimi's weights: 317 of Mimi's 318 tensors are missing",
        "notes.txt": "neither .safetensors nor a PyTorch .pt file",
        "text.safetensors": "cannot read Mimi weights",
        ".": "is a directory",
        "missing.safetensors": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(AudioError, match=message.replace(".", r"\.").replace("(", r"\(")):
            audio.load_mimi(tmp_path / name)
    with pytest.raises(AudioError, match=r"1 have the wrong shape \(encoder.model.0.conv.conv.weight \(3, 3\)"):
        audio.load_mimi(tmp_path / "other.safetensors")
    assert not marker.exists()


# ---- tokenizer and checkpoint files ---------------------------------------------------------------------------


def test_tokenizer_paths_that_are_missing_or_not_tokenizers(tmp_path):
    (tmp_path / "tokenizer.model").write_text("this is not a tokenizer\n")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="is not a tiktoken tokenizer.model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="is not a tiktoken tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):  # noqa: F811
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "ckpt")


def broken_copy(checkpoint, tmp_path, damage):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text("{not json"),
     r"cannot read .*broken/config.json \(JSONDecodeError: Expecting"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"broken/config.json holds a JSON list"),
    (lambda d: (d / "config.json").write_text('{"backbone": {}}'), r"broken/config.json is not a csm-jax model"),
    (lambda d: __import__("shutil").rmtree(d / "params"), "lacks params/"),
    (lambda d: [p.write_bytes(b"garbage") for p in (d / "params").rglob("*") if p.is_file()],
     "cannot restore the parameters in .*broken/params"),
])
def test_damaged_checkpoints_name_the_file(checkpoint, tmp_path, damage, message):
    broken = broken_copy(checkpoint, tmp_path, damage)
    with pytest.raises(CheckpointError, match=message):
        load_model(resolve_checkpoint(broken))


# ---- the conversion cache ----------------------------------------------------------------------------------------


def test_conversion_cache_keys_on_the_resolved_path_and_the_files(tmp_path, monkeypatch, caplog):
    conversions = []

    def converter(source, out, dtype):
        conversions.append(source)
        (out / "params").mkdir(parents=True)
        (out / "metadata.json").write_text(json.dumps({"format": "csm-jax"}))
        return out

    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"1" * 100)
    (tmp_path / "elsewhere").mkdir()
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    first = resolve_checkpoint("w/model.safetensors", cache=cache, converter=converter)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level("WARNING"):
        again = resolve_checkpoint("../w/model.safetensors", cache=cache, converter=converter)
    assert again == first and len(conversions) == 1
    assert f"using the cached conversion of ../w/model.safetensors at {first}" in caplog.text

    weights.write_bytes(b"2" * 120)  # replaced in place: new size and modification time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10 ** 9))
    replaced = resolve_checkpoint(weights, cache=cache, converter=converter)
    assert replaced != first and len(conversions) == 2


# ---- output files ----------------------------------------------------------------------------------------------


def test_audio_is_written_as_wav_flac_or_ogg_through_a_temporary_file(tmp_path):
    sf = pytest.importorskip("soundfile")
    wave = 0.3 * np.sin(np.arange(4800) / 10).astype(np.float32)
    for name, fmt in (("a.wav", "WAV"), ("a.flac", "FLAC"), ("a.ogg", "OGG")):
        info = sf.info(str(audio.write_audio(tmp_path / name, wave)))
        assert (info.format, info.samplerate, info.frames) == (fmt, 24000, 4800)
    with pytest.raises(AudioError, match="has the extension '.mp3'"):
        audio.write_audio(tmp_path / "a.mp3", wave)
    os.chmod(tmp_path / "a.wav", 0o640)
    audio.write_audio(tmp_path / "a.wav", wave[:1920])  # replaced whole, its permissions kept
    assert sf.info(str(tmp_path / "a.wav")).frames == 1920 and os.stat(tmp_path / "a.wav").st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.flac", "a.ogg", "a.wav"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_a_valid_partial(tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    out = tmp_path / "out.wav"
    out.write_bytes(b"the user's file")
    with pytest.raises(KeyboardInterrupt):
        with audio.audio_writer(out) as f:
            f.write(np.zeros(3840, np.float32))
            raise KeyboardInterrupt
    assert out.read_bytes() == b"the user's file"
    assert sf.info(str(tmp_path / "out.partial.wav")).frames == 3840
    assert "kept the 0.16 s" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        with audio.audio_writer(tmp_path / "empty.wav"):
            raise RuntimeError("nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial.wav", "out.wav"]


# ---- adapters ---------------------------------------------------------------------------------------------------


def test_use_adapter_names_a_way_to_keep_the_base_and_a_damaged_adapter_file(model, generator, tmp_path):  # noqa: F811
    import inspect

    from csm_jax.inference.generator import Generator, load_csm_1b
    from csm_jax.io.adapters import AdapterError

    adapter = truncated_adapter(tmp_path / "adapter")
    damaged = (adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterError) as e:
        generator.use_adapter(adapter)  # built without keep_base
    assert "load_csm_1b(..., keep_base=True)" in str(e.value)
    assert "keep_base" in inspect.signature(load_csm_1b).parameters  # the fix it names exists
    keeping = Generator(model, generator.tokenizer, generator.mimi, keep_base=True)
    with pytest.raises(AdapterError) as e:
        keeping.use_adapter(adapter)
    assert f"cannot read {adapter}/adapter_model.safetensors" in str(e.value)
    assert "damaged or incomplete: export or download the adapter again" in str(e.value)
    assert (adapter / "adapter_model.safetensors").read_bytes() == damaged
