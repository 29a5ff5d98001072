"""Mimi under the rules moshi applies on a CUDA device only, emulated on the CPU: its streaming encoder and decoder
are CUDA graphs that take the shapes of their first captured call and refuse any other (`CudaGraphRules`), and
its transformer pieces are torch.compiled, which fails on a machine without a C toolchain. Every Mimi call path of
csm_jax (the server's batched streams with 4 clients at different positions, streamed generation, long-form
decoding) must give the audio it gives without these rules."""

import threading
import time

import httpx
import numpy as np
import pytest
import torch
from moshi.models import compression
from moshi.modules import streaming, transformer
from moshi.utils import compile as moshi_compile

from csm_jax.inference.batcher import SlotBatcher
from csm_jax.inference.end_of_speech import EndOfSpeech
from csm_jax.inference.generator import Request, sampling_from
from csm_jax.inference.longform import generate_until_end
from csm_jax.io import audio
from tests.helpers import KEY, tiny_server
from tests.test_serve import expected, narrator_context


class CudaGraphRules(moshi_compile.CUDAGraphed):
    """moshi's `CUDAGraphed` as it behaves on a CUDA device, on any device: calls run the function while warming
    up, the next call is captured, and a later call whose arguments differ from the captured ones raises moshi's
    ValueError (a real graph replays fixed buffers). Inside moshi's `no_cuda_graph` (or with NO_CUDA_GRAPH=1) and
    inside another graph the function runs directly, as in moshi."""

    def __init__(self, func, warmup_steps: int = 1, disable: bool = False):
        super().__init__(func, warmup_steps, disable=False)  # moshi disables it off CUDA

    def __call__(self, *args):
        if not moshi_compile._is_cuda_graph_enabled() or moshi_compile.in_cuda_graph():
            return self.func(*args)
        with moshi_compile._set_in_cuda_graph():
            if self.warmup_steps > 0:
                self.warmup_steps -= 1
            elif self._args is None:
                self._args = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
            else:
                got = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
                if got != self._args:
                    raise ValueError(f"CUDA Graphed function captured with {self._args}, called with {got}: "
                                     f"every call must be done with exactly the same shapes")
            return self.func(*args)


def fails_to_compile(fn, *args, **kwargs):
    """torch.compile where no C compiler, Python headers or Triton exist: the compiled function fails when run."""
    def compiled(*a, **k):
        raise RuntimeError("torch.compile: Failed to find C compiler. Please specify via CC environment variable.")

    return compiled


@pytest.fixture(scope="module")
def cuda_rules():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compression, "CUDAGraphed", CudaGraphRules)
        mp.setattr(streaming, "CUDAGraphed", CudaGraphRules)
        yield mp


@pytest.fixture(scope="module")
def server4(tmp_path_factory, cuda_rules):
    with tiny_server(tmp_path_factory, slots=4, max_queue=4) as s:
        yield s


@pytest.fixture(scope="module")
def generator(server4):
    """The server's own generator (one tiny model for the module), used while the server is idle."""
    return server4.generator


@pytest.fixture
def frame_counts(monkeypatch):
    """The (rows, frames) of every streaming Mimi decode call."""
    calls, decode = [], audio.decode

    def spy(mimi, codes):
        if mimi._streaming_state is not None:
            calls.append((codes.shape[0], codes.shape[-1]))
        return decode(mimi, codes)

    monkeypatch.setattr(audio, "decode", spy)
    return calls


def test_the_emulated_rule_refuses_another_frame_count_in_moshis_own_streaming(generator, cuda_rules):
    mimi, codes = generator.mimi, np.random.default_rng(0).integers(1, 2048, (1, 32, 7))
    with torch.no_grad(), mimi.streaming(1):
        for frames in (2, 2, 2):  # warm-up, capture, replay
            mimi.decode(torch.from_numpy(codes[..., :frames]))
        with pytest.raises(ValueError, match="same shapes"):
            mimi.decode(torch.from_numpy(codes[..., :1]))


def test_streamed_and_long_form_decoding_follow_the_rules(server4, generator, frame_counts):
    context = narrator_context(server4)  # the prompts of the server test: the same compiled programs
    whole = generator.generate("Streamed words here.", "1", context, max_audio_length_ms=880, seed=3)
    streamed = list(generator.generate_stream("Streamed words here.", "1", context, max_audio_length_ms=880, seed=3,
                                              first_chunk_frames=1, chunk_frames=4))
    assert [len(c) // audio.FRAME_SAMPLES for c in streamed] == [1, 4, 4, 2]  # 1, then 4, then a shorter last
    np.testing.assert_allclose(np.concatenate(streamed), whole, rtol=0, atol=1e-5 * np.abs(whole).max())

    prompt = generator.prompt(Request("Long form.", "1", context), 11)
    codes, wave = generate_until_end(generator, prompt, 11, sampling_from(0.9, 50, None), 5,
                                     EndOfSpeech(stop_after_silence_ms=0), chunk=4)
    want = generator.decode([codes])[0]
    assert codes.shape[1] == 11 and frame_counts[-3:] == [(1, 4), (1, 4), (1, 3)]
    np.testing.assert_allclose(wave, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_without_a_compiler_mimi_runs_its_compiled_pieces_eagerly(generator, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert "a C compiler (gcc, clang or $CC)" in audio._compile_toolchain_missing()
    monkeypatch.setattr(torch, "compile", fails_to_compile)
    monkeypatch.setattr(audio, "torch_compile_works", lambda: False)
    x, alpha = torch.randn(1, 3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="C compiler"):  # moshi compiles on first use, here as on a GPU
        transformer._rms_norm(x, alpha, None, 1e-5)
    with audio.moshi_switches(generator.mimi):
        torch.testing.assert_close(transformer._rms_norm(x, alpha, None, 1e-5),
                                   x * torch.rsqrt(1e-5 + (x ** 2).mean(-1, keepdim=True)))


@pytest.fixture
def real_time_device(monkeypatch):
    """The decode batch at 40 ms a frame, twice real time (the tiny model would finish a request before Mimi has
    decoded its first frames, and the requests would not overlap)."""
    run = SlotBatcher.run

    def paced(self, frames):
        time.sleep(0.04 * frames)
        return run(self, frames)

    monkeypatch.setattr(SlotBatcher, "run", paced)


def test_four_clients_at_different_positions_each_get_their_single_generation(server4, real_time_device,
                                                                             frame_counts):
    # odd frame counts (15, 11, 9, 7): a stream's last Mimi call, padded by no going-on stream, has an odd count
    # where the calls before it have the even counts of 2-frame steps
    jobs = [("The first of four requests.", 11, 1200), ("Second one.", 12, 880), ("A third request here.", 13, 720),
            ("Four.", 14, 560)]
    started = [threading.Event() for _ in jobs]
    got, errors = [None] * len(jobs), []

    def ask(i):
        try:
            if i:
                assert started[i - 1].wait(120)  # each starts once the one before has audio: other positions
            text, seed, ms = jobs[i]
            chunks = []
            with httpx.stream("POST", server4.url + "/v1/audio/speech", timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "csm-1b", "input": text, "voice": "narrator", "response_format": "pcm",
                                    "seed": seed, "max_audio_length_ms": ms}) as r:
                assert r.status_code == 200, r.read()
                for chunk in r.iter_bytes():
                    chunks.append(chunk)
                    started[i].set()
            got[i] = np.frombuffer(b"".join(chunks), "<i2").astype(np.float32) / 32767
        except BaseException as e:  # noqa: BLE001 (reported below, from the test's thread)
            errors.append(e)
        finally:
            started[i].set()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for (text, seed, ms), wave in zip(jobs, got):
        want = expected(server4, text, ms, seed)
        assert len(wave) == len(want) > 0
        np.testing.assert_allclose(wave, want, atol=2 / 32768)  # 16-bit rounding of the same float audio
    # the later streams shared the 4-row bank, whose calls had several frame counts: a CUDA graph would have refused
    assert len({frames for rows, frames in frame_counts if rows == 4}) > 1, frame_counts
