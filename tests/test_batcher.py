"""Continuous batching against single generations: requests placed into slots at different frame boundaries,
next to other running requests, as the decode batch grows and shrinks, give the codes `FrameGenerator.generate`
gives each alone (greedy and seeded sampling with per-request settings)."""

import jax
import numpy as np
import pytest
from flax import nnx

from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.inference.batcher import SlotBatcher, batch_sizes
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.prompt import PromptTooLongError
from csm_jax.inference.sampling import GREEDY, FrameSampling, RowSampler, SamplerConfig, sample
from tests.helpers import random_prompt

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def frames():
    return FrameGenerator(Csm(CONFIG, rngs=nnx.Rngs(0)))


def run_staggered(batcher, jobs, chunk=2, sizes=None):
    """jobs: (start chunk, prompt, max_frames, seed, sampling); each enters the first free slot at its chunk.
    Returns the codes (n, F) of each job; `sizes` (a list) receives the decode batch size of every run."""
    out = {i: [] for i in range(len(jobs))}
    slot_of, waiting, finished, tick = {}, list(range(len(jobs))), set(), 0
    while len(finished) < len(jobs):
        for i in [i for i in waiting if jobs[i][0] <= tick]:
            free = [s for s in range(batcher.slots) if s not in slot_of.values()]
            if free:
                slot_of[i] = free[0]
                waiting.remove(i)
                batcher.insert(free[0], *jobs[i][1:])
        codes, kept, done = batcher.run(chunk)
        if sizes is not None:
            sizes.append(batcher.rows)
        for i, slot in list(slot_of.items()):
            out[i].append(codes[slot][kept[slot]])
            if done[slot]:
                finished.add(i)
                del slot_of[i]
        tick += 1
    return [np.concatenate(out[i]).T for i in range(len(jobs))]


def test_greedy_requests_entering_at_different_frames_match_single_generations(frames):
    greedy = FrameSampling.same(GREEDY)
    jobs = [(0, random_prompt(CONFIG, 1, context_text=3, context_audio=2), 9, 0, greedy),
            (1, random_prompt(CONFIG, 2, context_text=12, context_audio=9), 12, 0, greedy),
            (3, random_prompt(CONFIG, 3), 5, 0, greedy),  # waits for a free slot, reuses a finished slot's row
            (3, random_prompt(CONFIG, 4, context_text=70, context_audio=3), 7, 0, greedy)]  # a wider prompt bucket
    got = run_staggered(SlotBatcher(frames, slots=2), jobs)
    for (_, prompt, max_frames, seed, sampling), codes in zip(jobs, got):
        np.testing.assert_array_equal(codes, frames.generate([prompt], max_frames, sampling, [seed])[0])


def test_seeded_sampling_with_per_request_settings_matches_single_generations(frames):
    settings = [FrameSampling(SamplerConfig(1.0, 20), SamplerConfig(0.8, top_p=0.9)),
                FrameSampling.same(SamplerConfig(0.9, 50)),
                FrameSampling(SamplerConfig(0.7, 0, min_p=0.05), GREEDY)]
    jobs = [(0, random_prompt(CONFIG, 5), 10, 11, settings[0]), (2, random_prompt(CONFIG, 6), 8, 12, settings[1]),
            (1, random_prompt(CONFIG, 7), 9, 13, settings[2]), (4, random_prompt(CONFIG, 5), 6, 14, settings[0])]
    got = run_staggered(SlotBatcher(frames, slots=3), jobs, chunk=3)
    for (_, prompt, max_frames, seed, sampling), codes in zip(jobs, got):
        np.testing.assert_array_equal(codes, frames.generate([prompt], max_frames, sampling, [seed])[0])
    assert not np.array_equal(got[0][:, :6], got[3])  # another seed, other codes


def test_the_batch_grows_and_shrinks_with_the_busy_slots_and_requests_keep_their_codes(frames):
    sampled, greedy = FrameSampling.same(SamplerConfig(0.9, 20)), FrameSampling.same(GREEDY)
    jobs = [(0, random_prompt(CONFIG, 1), 4, 1, greedy), (0, random_prompt(CONFIG, 2), 16, 2, sampled),
            (1, random_prompt(CONFIG, 3), 6, 3, sampled), (6, random_prompt(CONFIG, 4), 5, 4, greedy)]
    sizes = []
    got = run_staggered(SlotBatcher(frames, slots=4, sizes=(1, 2, 4), shrink_after=1), jobs, sizes=sizes)
    # 2 rows, 4 when the third enters, 2 then 1 as they finish (the second request moves to row 0), 2, then 1 again
    # (the fourth moves from row 1 to row 0)
    assert sizes == [2, 4, 2, 2, 1, 1, 2, 2, 1]
    for (_, prompt, max_frames, seed, sampling), codes in zip(jobs, got):
        np.testing.assert_array_equal(codes, frames.generate([prompt], max_frames, sampling, [seed])[0])


def test_requests_inserted_together_share_a_prefill_and_keep_their_codes(frames):
    sampled, greedy = FrameSampling.same(SamplerConfig(0.9, 20)), FrameSampling.same(GREEDY)
    requests = [(0, random_prompt(CONFIG, 1), 6, 5, sampled),  # one prefill of 2 rows with the third
                (2, random_prompt(CONFIG, 2, context_text=70, context_audio=3), 5, 6, greedy),  # a wider bucket
                (1, random_prompt(CONFIG, 3), 7, 7, sampled)]
    batcher = SlotBatcher(frames, slots=4, sizes=(1, 2, 4))
    batcher.insert_many(requests)
    out = {slot: [] for slot, *_ in requests}
    while batcher.row_of:
        codes, kept, _ = batcher.run(2)
        for slot in out:
            out[slot].append(codes[slot][kept[slot]])
    for slot, prompt, max_frames, seed, sampling in requests:
        np.testing.assert_array_equal(np.concatenate(out[slot]).T,
                                      frames.generate([prompt], max_frames, sampling, [seed])[0])


def test_batch_sizes_are_powers_of_four_up_to_the_slots(frames):
    assert [batch_sizes(s) for s in (1, 2, 4, 8, 16, 20)] == [(1,), (1, 2), (1, 4), (1, 4, 8), (1, 4, 16),
                                                              (1, 4, 16, 20)]
    batcher = SlotBatcher(frames, slots=8)
    assert batcher.rows == 1
    with pytest.raises(ValueError, match="must be positive and end at the 8 slots"):
        SlotBatcher(frames, slots=8, sizes=(1, 4))


def test_release_stops_a_slot_and_leaves_the_others_running(frames):
    batcher = SlotBatcher(frames, slots=2)
    greedy = FrameSampling.same(GREEDY)
    batcher.insert(0, random_prompt(CONFIG, 1), 20, 0, greedy)
    batcher.insert(1, random_prompt(CONFIG, 2), 6, 0, greedy)
    batcher.run(2)
    batcher.release(0)
    codes, kept, done = batcher.run(4)
    assert done[0] and not kept[0].any()
    assert kept[1].all()
    single = frames.generate([random_prompt(CONFIG, 2)], 6, greedy)[0]
    np.testing.assert_array_equal(codes[1].T, single[:, 2:6])


def test_prompts_over_the_budget_are_refused_with_the_fix(frames):
    batcher = SlotBatcher(frames, slots=1)
    with pytest.raises(PromptTooLongError, match="lower max_audio_length_ms"):
        batcher.insert(0, random_prompt(CONFIG, 1, context_text=200), 100, 0, FrameSampling())


@pytest.mark.parametrize("config", [SamplerConfig(0.9, 50), SamplerConfig(1.3, 0, top_p=0.8),
                                    SamplerConfig(0.5, 7, min_p=0.1), GREEDY])
def test_per_row_settings_draw_what_static_settings_draw(config):
    rows = 6
    logits = jax.random.normal(jax.random.key(0), (rows, 2051)) * 3
    uniforms = jax.random.uniform(jax.random.key(1), (rows,))
    mixed = [config if r % 2 == 0 else SamplerConfig(1.0, 3) for r in range(rows)]
    ours = jax.jit(sample)(uniforms, logits, RowSampler.of(mixed))
    for r in range(rows):
        expect = sample(uniforms[r:r + 1], logits[r:r + 1], mixed[r])
        assert int(ours[r]) == int(expect[0])
