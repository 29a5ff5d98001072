"""The serving engine without HTTP: streams decoded together in one batched Mimi call, joining, leaving and
reusing rows, equal each stream decoded alone; and requests whose audio falls behind the decode batch (decoded in
longer calls) still get the audio of their single generation."""

import asyncio
import time

import numpy as np

from csm_jax.inference.prompt import coded_prompt_frames
from csm_jax.inference.sampling import GREEDY, FrameSampling, SamplerConfig
from csm_jax.io import audio
from csm_jax.serving.engine import END, Engine, Job
from csm_jax.serving.mimi_streams import MimiStreams
from tests.helpers import HANG_SECONDS


def test_streams_decoded_together_equal_each_stream_decoded_alone(generator):
    mimi = generator.mimi
    rng = np.random.default_rng(0)
    # stream: (first call, frames); "a" alone takes the 1-row bank, "b" joins in the 2-row bank, "c" takes the row
    # "b" leaves (reset to the start), and its last call has 1 frame beside 2 of "a"
    plan = {"a": (0, 10), "b": (1, 4), "c": (3, 3)}
    codes = {name: rng.integers(1, 2048, (32, frames)) for name, (_, frames) in plan.items()}
    streams, rows, got = MimiStreams(mimi, rows=2), {}, {name: [] for name in plan}
    for call in range(5):
        batch = {}
        for name, (first, frames) in plan.items():
            t = (call - first) * 2
            if 0 <= t < frames:
                if name not in rows:
                    rows[name] = streams.open()[0]
                batch[rows[name]] = codes[name][:, t:t + 2]
        out = streams.decode(batch)
        for name in list(rows):
            got[name].append(out[rows[name]])
            first, frames = plan[name]
            if (call - first) * 2 + 2 >= frames:
                streams.close(rows.pop(name))
    assert not streams.open_rows
    for name, (_, frames) in plan.items():
        with audio.streaming_decoder(mimi, batch_size=1):
            alone = [audio.decode(mimi, codes[name][None, :, t:t + 2])[0] for t in range(0, frames, 2)]
        want = np.concatenate(alone)
        assert len(np.concatenate(got[name])) == frames * audio.FRAME_SAMPLES
        np.testing.assert_allclose(np.concatenate(got[name]), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_audio_falling_behind_the_batch_keeps_each_requests_single_generation(generator):
    slots = 2
    n = generator.frames.config.num_codebooks
    requests = [("First words here.", 8, 1, FrameSampling.same(SamplerConfig(0.9, 20))),
                ("Second.", 4, 2, FrameSampling.same(GREEDY)),
                ("A third, waiting for a slot.", 6, 3, FrameSampling.same(SamplerConfig(0.8, 30)))]
    prompts = [coded_prompt_frames(generator.tokenizer, text, "0", (), n) for text, *_ in requests]
    streams = MimiStreams(generator.mimi, slots)
    engine = Engine(generator.frames, streams, slots=slots, max_queue=4, chunk_frames=2)
    engine.start()

    async def collect(job):
        parts = []
        while (item := await job.queue.get()) is not END:
            if isinstance(item, Exception):
                raise item
            parts.append(item)
        return parts

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, frames, seed, sampling, loop) for p, (_, frames, seed, sampling) in zip(prompts, requests)]
        with streams.lock:  # Mimi busy: the decode batch runs every request to its end, steps pile up
            for job in jobs:
                engine.submit(job)
            deadline = time.monotonic() + HANG_SECONDS
            while (engine.busy() or engine.queue_depth()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return await asyncio.gather(*(collect(job) for job in jobs))

    try:
        parts = asyncio.run(scenario())
    finally:
        engine.close()
    for prompt, (_, frames, seed, sampling), got in zip(prompts, requests, parts):
        codes = generator.frames.generate([prompt], frames, sampling, [seed])[0]
        want = generator.decode([codes])[0]
        wave = np.concatenate(got)
        assert len(wave) == len(want) > 0
        np.testing.assert_allclose(wave, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert len(parts[0]) < 4  # its 4 steps of 2 frames reached Mimi in fewer, longer calls
