"""The on-device sampler against transformers' greedy `generate`, a plain step-by-step loop, and itself
(batched, streamed, seeded); prompt building and the frame budget."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from csm_jax.core.config import preset
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.prompt import PromptTooLongError, check_budget, max_frames_for
from csm_jax.io.frames import Frames, Segment, segment_frames
from csm_jax.inference.sampling import GREEDY, FrameSampling, SamplerConfig
from csm_jax.io.text import load_tokenizer
from tests.helpers import random_prompt
from tests.references import csm_from_transformers, transformers_model

CONFIG = preset("tiny")
GREEDY_FRAMES = FrameSampling.same(GREEDY)


@pytest.fixture(scope="module")
def models():
    hf = transformers_model(CONFIG, seed=0)
    return hf, csm_from_transformers(hf, CONFIG)


@pytest.fixture(scope="module")
def generator(models):
    return FrameGenerator(models[1])


def reference_greedy(model, prompt: Frames, max_frames: int) -> np.ndarray:
    """The plainest loop: no KV caches; every frame re-runs the backbone over the whole sequence (right-padded
    to one length, so one compile) and the teacher-forced depth decoder once per codebook."""
    n = CONFIG.num_codebooks

    @nnx.jit
    def next_frame(m, tokens, mask, segment_ids, last):
        hidden = m(tokens, mask, segment_ids)[1][:, last]
        codes = jnp.zeros((1, n), jnp.int32).at[:, 0].set(jnp.argmax(m.codebook0_logits(hidden), -1))
        for i in range(1, n):
            codes = codes.at[:, i].set(jnp.argmax(m.depth_logits(hidden, codes)[:, i - 1], -1))
        return codes[0]

    length = len(prompt) + max_frames
    tokens = np.zeros((1, length, n + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    tokens[0, :len(prompt)], mask[0, :len(prompt)] = prompt.tokens, prompt.mask
    frames = []
    for t in range(len(prompt), length):
        segment_ids = (np.arange(length) < t).astype(np.int32)[None]
        codes = np.asarray(next_frame(model, tokens, mask, segment_ids, t - 1))
        if not codes.any():
            break
        frames.append(codes)
        tokens[0, t, :n], mask[0, t, :n] = codes, True
    return np.array(frames, np.int32).T


def test_greedy_matches_transformers_generate(models, generator):
    """transformers is fed the same prompt as `inputs_embeds` (its 3-D input_ids path embeds audio frames only, so
    mixed text/audio prompts go in as embeddings), both stacks greedy (`do_sample=False`, and
    `depth_decoder_do_sample=False` for its depth decoder)."""
    hf, model = models
    prompt = random_prompt(CONFIG, 0)
    ours = generator.generate([prompt], 24, GREEDY_FRAMES)[0]
    embeds = np.asarray(model.embed_frames(jnp.asarray(prompt.tokens[None]), jnp.asarray(prompt.mask[None])))
    with torch.no_grad():
        theirs = hf.generate(inputs_embeds=torch.tensor(embeds), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=24, do_sample=False, depth_decoder_do_sample=False)
    assert ours.shape == (32, 24)
    np.testing.assert_array_equal(ours, theirs[0].numpy().T)


def test_greedy_matches_a_plain_step_by_step_loop_batched_and_padded(generator, models):
    prompts = [random_prompt(CONFIG, 1, context_text=3, context_audio=2),
               random_prompt(CONFIG, 2, context_text=12, context_audio=9)]
    batch = generator.generate(prompts, 20, GREEDY_FRAMES)
    for prompt, codes in zip(prompts, batch):
        np.testing.assert_array_equal(codes, reference_greedy(models[1], prompt, 20))


def end_of_speech_after(frames_per_row):
    """A logits processor forcing the all-zero end frame at frame `frames_per_row[r]` of row r."""
    stops = jnp.asarray(frames_per_row)

    def processor(logits, frame, codebook):
        force = (frame >= stops)[:, None]
        zero_only = jnp.where(jnp.arange(logits.shape[-1]) == 0, 0.0, -jnp.inf)
        return jnp.where(force, zero_only, logits)

    return processor


def test_each_row_stops_on_its_own_end_frame(generator):
    prompts = [random_prompt(CONFIG, 3), random_prompt(CONFIG, 4)]
    free = generator.generate(prompts, 12, GREEDY_FRAMES)
    stopped = generator.generate(prompts, 12, GREEDY_FRAMES, processor=end_of_speech_after([3, 7]))
    assert [c.shape[1] for c in stopped] == [3, 7]  # the end frame itself is dropped
    np.testing.assert_array_equal(stopped[0], free[0][:, :3])
    np.testing.assert_array_equal(stopped[1], free[1][:, :7])


def test_seeded_sampling_is_reproducible_alone_batched_and_streamed(generator):
    sampling = FrameSampling(codebook0=SamplerConfig(temperature=1.0, top_k=20),
                             depth=SamplerConfig(temperature=0.8, top_p=0.9))
    prompts = [random_prompt(CONFIG, 5), random_prompt(CONFIG, 6)]
    first = generator.generate(prompts, 10, sampling, seeds=[11, 12])
    again = generator.generate(prompts, 10, sampling, seeds=[11, 12])
    alone = generator.generate(prompts[1:], 10, sampling, seeds=[12])
    other = generator.generate(prompts[1:], 10, sampling, seeds=[13])
    streamed = list(generator.stream(prompts[1], 10, sampling, seed=12, first_chunk=1, chunk=3))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(alone[0], first[1])
    assert not np.array_equal(other[0], first[1])
    assert [c.shape[1] for c in streamed] == [1, 3, 3, 3]
    np.testing.assert_array_equal(np.concatenate(streamed, axis=1), first[1])


def test_prompt_frames_follow_the_reference_layout():
    tokenizer = load_tokenizer()
    codes = np.arange(64, dtype=np.int32).reshape(32, 2) + 1
    frames = segment_frames(tokenizer, Segment(1, "Hi"), codes)
    ids = [128000, *tokenizer.encode("[1]Hi"), 128001]
    assert len(frames) == len(ids) + 3  # text, two audio frames, the end frame
    np.testing.assert_array_equal(frames.tokens[:len(ids), -1], ids)
    assert frames.mask[:len(ids), -1].all() and not frames.mask[:len(ids), :-1].any()
    np.testing.assert_array_equal(frames.tokens[len(ids):len(ids) + 2, :32], codes.T)
    assert not frames.tokens[-1].any() and frames.mask[-1, :32].all() and not frames.mask[-1, 32]


def test_budget_errors_name_the_fix():
    assert max_frames_for(10_000) == 125
    check_budget(1922, 125, 2048)
    with pytest.raises(PromptTooLongError, match="lower max_audio_length_ms"):
        check_budget(1923, 125, 2048)
    with pytest.raises(ValueError, match="at least 80 ms"):
        max_frames_for(50)
