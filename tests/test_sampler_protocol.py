"""The sampler protocol: your sampler chooses every token inside the compiled loop, its state goes on through the
codebooks, the frames and `stream`'s chunks and comes back at the end, and another seed or initial state reuses
the compiled loop. Tiny random models."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import csm_jax
from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.inference import kernels, loop
from csm_jax.inference.end_of_speech import end_bias_processor
from csm_jax.inference.generator import Request
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.sampler_protocol import SamplerError
from csm_jax.inference.score import best_of_n
from csm_jax.inference.sampling import GREEDY, FrameSampling
from tests.helpers import random_prompt

CONFIG = preset("tiny")
N = CONFIG.num_codebooks
GREEDY_FRAMES = FrameSampling.same(GREEDY)


@pytest.fixture(scope="module")
def tiny_model():
    return Csm(CONFIG, rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def frames(tiny_model):
    return FrameGenerator(tiny_model, cpu_kernels=False)


def counting(logits, keys, frame, codebook, state):
    """Greedy over every code but 0 (so no frame ends the utterance); counts its calls, in total and per row."""
    tokens = jnp.argmax(logits.at[:, 0].set(-jnp.inf), -1).astype(jnp.int32)
    return tokens, {"calls": state["calls"] + 1, "per_row": state["per_row"] + 1}


def no_repeat(logits, keys, frame, codebook, previous):
    """Greedy, but codebook c never repeats its code of the frame before: previous (B, n), -1 for none."""
    last = previous[:, codebook]
    token = jnp.argmax(jnp.where(jnp.arange(logits.shape[-1]) == last[:, None], -jnp.inf, logits), -1)
    return token.astype(jnp.int32), previous.at[:, codebook].set(token.astype(jnp.int32))


def no_repeat_by_hand(logits: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`no_repeat` as a Python loop over one row's logits (F, n, V): (codes (n, F), the last frame's codes)."""
    previous = previous.copy()
    codes = np.zeros(logits.shape[:2], np.int32)
    for t in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            row = logits[t, c].copy()
            if previous[c] >= 0:
                row[previous[c]] = -np.inf
            codes[t, c] = previous[c] = int(np.argmax(row))
    return codes.T, previous


def teacher_forced_logits(model: Csm, prompt, codes: np.ndarray) -> np.ndarray:
    """The logits (F, n, V) the stacked model gives every codebook of `codes` (n, F) after `prompt`: frame t's
    codebook 0 after the frames before it, codebook c after the frame's codebooks < c."""
    n, f = codes.shape
    tokens = np.concatenate([prompt.tokens, np.pad(codes.T, ((0, 0), (0, 1)))])
    mask = np.concatenate([prompt.mask, np.broadcast_to(np.arange(n + 1) < n, (f, n + 1))])
    c0, hidden = model(jnp.asarray(tokens[None]), jnp.asarray(mask[None]))
    at = slice(len(prompt) - 1, len(prompt) - 1 + f)  # the positions that predict frames 0..F-1
    depth = model.depth_logits(hidden[0, at], jnp.asarray(codes.T))
    return np.concatenate([np.asarray(c0[0, at])[:, None], np.asarray(depth)], axis=1)


def test_the_state_counts_every_call_through_frames_and_depth_steps(frames):
    prompts = [random_prompt(CONFIG, 1), random_prompt(CONFIG, 2)]
    start = {"calls": 0, "per_row": np.zeros(2, np.int32)}
    codes, state = frames.generate(prompts, 5, GREEDY_FRAMES, sampler=counting, sampler_state=start,
                                   return_sampler_state=True)
    assert [c.shape for c in codes] == [(N, 5)] * 2
    assert int(state["calls"]) == 5 * N
    np.testing.assert_array_equal(state["per_row"], [5 * N] * 2)
    assert start["per_row"].tolist() == [0, 0]  # the caller's initial state is left alone
    assert all((c != 0).all() for c in codes)


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_a_stateful_sampler_emits_what_a_python_loop_over_the_same_logits_chooses(tiny_model, cpu_kernels):
    if cpu_kernels and not kernels.available():
        pytest.skip("the CPU kernels do not build here (no g++)")
    frames = FrameGenerator(tiny_model, cpu_kernels=cpu_kernels)
    assert frames.model.cpu_kernels == cpu_kernels
    prompts = [random_prompt(CONFIG, 3), random_prompt(CONFIG, 4, context_audio=9)]
    greedy = frames.generate(prompts, 6, GREEDY_FRAMES)
    # row 0 starts free; row 1 may not begin with the codes plain greedy gives its first frame
    previous = np.stack([np.full(N, -1, np.int32), greedy[1][:, 0]])
    codes, last = frames.generate(prompts, 6, GREEDY_FRAMES, sampler=no_repeat, sampler_state=previous,
                                  return_sampler_state=True)
    for r, prompt in enumerate(prompts):
        assert codes[r].shape == (N, 6)
        by_hand, by_hand_last = no_repeat_by_hand(teacher_forced_logits(tiny_model, prompt, codes[r]), previous[r])
        np.testing.assert_array_equal(codes[r], by_hand)
        np.testing.assert_array_equal(np.asarray(last[r]), by_hand_last)
        assert not np.array_equal(codes[r], greedy[r])  # the rule changed what greedy alone emits
    assert (greedy[1][:, 0] != codes[1][:, 0]).all()


def test_streamed_chunks_carry_the_state_and_equal_one_generate(frames):
    prompt = random_prompt(CONFIG, 5)
    previous = np.full((1, N), -1, np.int32)
    (whole,) = frames.generate([prompt], 7, GREEDY_FRAMES, sampler=no_repeat, sampler_state=previous)
    chunks = list(frames.stream(prompt, 7, GREEDY_FRAMES, first_chunk=1, chunk=2, sampler=no_repeat,
                                sampler_state=previous))
    assert [c.shape[1] for c in chunks] == [1, 2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)


def temperatures_per_codebook(logits, keys, frame, codebook, temperatures):
    t = temperatures[codebook]
    tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row / t))(keys, logits)
    return tokens.astype(jnp.int32), temperatures


def test_new_seeds_and_initial_states_reuse_the_compiled_loop(frames):
    prompts = [random_prompt(CONFIG, 6), random_prompt(CONFIG, 7)]

    def run(seeds, temperatures):
        return frames.generate(prompts, 4, GREEDY_FRAMES, seeds, sampler=temperatures_per_codebook,
                               sampler_state=temperatures)

    first = run([1, 2], jnp.full(N, 0.8))
    compiled = loop._run_until._cache_size(), loop._prefill._cache_size()
    again, other_seed, other_state = run([1, 2], jnp.full(N, 0.8)), run([3, 2], jnp.full(N, 0.8)), \
        run([1, 2], np.linspace(2.0, 0.5, N).astype(np.float32))
    assert (loop._run_until._cache_size(), loop._prefill._cache_size()) == compiled
    counted = frames.generate(prompts, 4, GREEDY_FRAMES, sampler=counting,
                              sampler_state={"calls": 0, "per_row": np.zeros(2, np.int32)},
                              return_sampler_state=True)[1]
    compiled = loop._run_until._cache_size(), loop._prefill._cache_size()
    recounted = frames.generate(prompts, 4, GREEDY_FRAMES, sampler=counting,  # a Python 0 before, int32 arrays now
                                sampler_state={"calls": jnp.int32(100), "per_row": jnp.arange(2)},
                                return_sampler_state=True)[1]
    assert (loop._run_until._cache_size(), loop._prefill._cache_size()) == compiled
    assert int(counted["calls"]) == 4 * N and int(recounted["calls"]) == 100 + 4 * N
    np.testing.assert_array_equal(recounted["per_row"], [4 * N, 1 + 4 * N])

    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(other_seed[1], first[1])  # row 1 kept its seed
    assert not np.array_equal(other_seed[0], first[0])
    assert not any(np.array_equal(a, b) for a, b in zip(first, other_state))
    (alone,) = frames.generate(prompts[1:], 4, GREEDY_FRAMES, [2], sampler=temperatures_per_codebook,
                               sampler_state=jnp.full(N, 0.8))
    np.testing.assert_array_equal(alone, first[1])  # a row draws the same alone as in a batch


def test_a_logits_processor_runs_before_the_sampler(frames):
    def greedy(logits, keys, frame, codebook, state):
        return jnp.argmax(logits, -1).astype(jnp.int32), state

    (codes,) = frames.generate([random_prompt(CONFIG, 8)], 4, GREEDY_FRAMES,
                               processor=end_bias_processor(1e4, min_frames=2), sampler=greedy)
    assert (codes[0, :2] != 0).all() and (codes[0, 2:] == 0).all()


def test_a_state_may_hold_its_own_prng_key(frames):
    def own_key(logits, keys, frame, codebook, key):
        key, draw = jax.random.split(key)
        return jax.random.categorical(draw, logits).astype(jnp.int32), key

    prompt = random_prompt(CONFIG, 10)
    (codes,), key = frames.generate([prompt], 3, GREEDY_FRAMES, sampler=own_key, sampler_state=jax.random.key(5),
                                    return_sampler_state=True)
    assert codes.shape == (N, 3)
    expected = jax.random.key(5)
    for _ in range(3 * N):  # one split per call
        expected = jax.random.split(expected)[0]
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(expected))


def test_a_sampler_that_breaks_the_protocol_is_told_what_to_return(frames):
    prompt = random_prompt(CONFIG, 9)

    def widens_its_state(logits, keys, frame, codebook, state):
        return jnp.argmax(logits, -1).astype(jnp.int32), state.astype(jnp.float32)

    def one_token_for_all_rows(logits, keys, frame, codebook, state):
        return jnp.argmax(logits[0]).astype(jnp.int32), state

    with pytest.raises(SamplerError, match="same structure, shapes and dtypes"):
        frames.generate([prompt], 2, GREEDY_FRAMES, sampler=widens_its_state, sampler_state=0)
    with pytest.raises(SamplerError, match=r"one integer token per row, shape \(1,\)"):
        frames.generate([prompt], 2, GREEDY_FRAMES, sampler=one_token_for_all_rows)
    with pytest.raises(SamplerError, match="give sampler= as well"):
        frames.generate([prompt], 2, GREEDY_FRAMES, sampler_state=0)


def test_the_generator_returns_the_final_state_and_streams_with_it(generator):
    start = {"calls": 0, "per_row": np.zeros(1, np.int32)}
    audio, state = generator.generate("Hi.", max_audio_length_ms=400, sampler=counting, sampler_state=start,
                                      return_sampler_state=True)
    assert len(audio) == 5 * 1920 and int(state["calls"]) == 5 * 32
    codes = generator.generate_codes([Request("Hi.")], 400, sampler=no_repeat,
                                     sampler_state=np.full((1, 32), -1, np.int32))
    chunks = generator.stream_codes(Request("Hi."), 400, GREEDY_FRAMES, 0, first_chunk_frames=2, chunk_frames=2,
                                    sampler=no_repeat, sampler_state=np.full((1, 32), -1, np.int32))
    np.testing.assert_array_equal(np.concatenate(list(chunks), axis=1), codes[0])


def ends_at_frame_4(logits, keys, frame, codebook, state):
    """`counting`, but every code of frame 4 is 0: the end frame."""
    tokens, state = counting(logits, keys, frame, codebook, state)
    return jnp.where(frame == 4, 0, tokens), state


@pytest.mark.parametrize("sampler, frames_per_chunk", [(counting, [2, 2, 2]), (ends_at_frame_4, [2, 2, 0])])
def test_a_stream_yields_the_state_after_each_chunk_and_ends_with_the_state_of_generate(generator, sampler,
                                                                                       frames_per_chunk):
    start = {"calls": 0, "per_row": np.zeros(1, np.int32)}
    audio, final = generator.generate("Hi.", max_audio_length_ms=480, seed=2, sampler=sampler, sampler_state=start,
                                      return_sampler_state=True)
    pairs = list(generator.generate_stream("Hi.", max_audio_length_ms=480, seed=2, first_chunk_frames=2,
                                           chunk_frames=2, sampler=sampler, sampler_state=start,
                                           return_sampler_state=True))
    assert [len(chunk) // 1920 for chunk, _ in pairs] == frames_per_chunk  # the end frame came after a chunk
    assert len(audio) == sum(frames_per_chunk) * 1920
    # the end frame's draws count too: 5 frames' calls when frame 4 ends the utterance
    calls = [int(state["calls"]) for _, state in pairs]
    assert calls == [32 * 2, 32 * 4, 32 * (6 if sum(frames_per_chunk) == 6 else 5)]
    jax.tree.map(np.testing.assert_array_equal, pairs[-1][1], final)


def no_repeat_drawn(logits, keys, frame, codebook, previous):
    """The documented sampler: a draw at temperature 0.8 that never repeats codebook c's code of the frame before."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) == previous[:, codebook, None], -jnp.inf, logits)
    tokens = jax.vmap(jax.random.categorical)(keys, logits / 0.8).astype(jnp.int32)
    return tokens, previous.at[:, codebook].set(tokens)


def test_best_of_n_returns_the_chosen_candidates_state_as_generate_gives_it(generator):
    start = np.full((3, 32), -1, np.int32)
    best, means, state = best_of_n(generator, Request("Hi."), 3, 400, seed=4, sampler=no_repeat_drawn,
                                   sampler_state=start, return_sampler_state=True)
    chosen = int(np.argmax(means))
    assert len(set(means.tolist())) == 3  # three different candidates
    (alone,), alone_state = generator.generate_codes([Request("Hi.")], 400, seeds=[4 + chosen],
                                                     sampler=no_repeat_drawn, sampler_state=start[chosen:chosen + 1],
                                                     return_sampler_state=True)
    np.testing.assert_array_equal(best, alone)
    assert state.shape == (1, 32)
    np.testing.assert_array_equal(state, alone_state)
    np.testing.assert_array_equal(state[0], best[:, -1])  # this sampler's state: the last frame's codes
    with pytest.raises(SamplerError, match=r"leading axis of 3; \['calls'\] has shape \(\)"):
        best_of_n(generator, Request("Hi."), 3, 400, sampler=counting,
                  sampler_state={"calls": 0, "per_row": np.zeros(3, np.int32)}, return_sampler_state=True)


def test_the_documented_example_runs(generator, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "guides" / "sampling-research.md").read_text()
    example = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.setattr(csm_jax, "load_csm_1b", lambda *args, **kwargs: generator)  # the tiny model, not the hub's
    scope = {"gen": generator}
    exec(example, scope)
    assert scope["last"].shape == (1, 32) and len(scope["audio"]) % 1920 == 0
    assert scope["codes"].shape[0] == 32 and scope["means"].shape == (8,)
