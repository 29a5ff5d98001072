"""The serving loop: a bounded queue of jobs, one device thread that keeps a `SlotBatcher` busy, and one audio
thread that turns each job's codes into audio with its own streaming Mimi state.

The device thread admits waiting jobs into free slots at every chunk boundary (a prefill per job, while the
other slots keep their state), runs `chunk_frames` frames for all slots, hands each job its new codes, and frees
the slot of a finished or cancelled job at once. Jobs talk to their asyncio handler through `Job.emit`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from csm_jax.inference.batcher import SlotBatcher
from csm_jax.inference.sampling import FrameSampling
from csm_jax.io.frames import Frames
from csm_jax.serving.mimi_streams import MimiStreams

log = logging.getLogger("csm_jax.serve")

END = object()  # the last item a job's queue receives after its audio


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@dataclasses.dataclass(eq=False)
class Job:
    """One speech request on its way through the engine. Items arrive on `queue`: float32 audio chunks, then
    END, or an exception."""

    prompt: Frames
    max_frames: int
    seed: int
    sampling: FrameSampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    created: float = dataclasses.field(default_factory=time.perf_counter)
    frames: int = 0
    mimi_state: dict | None = None

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, frames, mimi_streams: MimiStreams, slots: int, max_queue: int, chunk_frames: int = 2,
                 metrics=None, cache_length: int | None = None):
        self.batcher = SlotBatcher(frames, slots, cache_length)
        self.streams = mimi_streams
        self.max_queue, self.chunk_frames, self.metrics = max_queue, chunk_frames, metrics
        self.pending: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}
        self.wake = threading.Condition()
        self.audio_jobs: queue.Queue = queue.Queue()
        self.stopping = False
        self.threads = [threading.Thread(target=self._device_loop, name="csm-device", daemon=True),
                        threading.Thread(target=self._audio_loop, name="csm-audio", daemon=True)]

    @property
    def slots(self) -> int:
        return self.batcher.slots

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.audio_jobs.put(None)
        for t in self.threads:
            t.join(timeout=10)

    def warm_up(self, prompt: Frames) -> None:
        """Compiles the prefill, the slot insert and the frame step before the first request."""
        self.batcher.insert(0, prompt, self.chunk_frames + 1, 0, FrameSampling())
        self.batcher.run(self.chunk_frames)
        self.batcher.release(0)
        self.batcher.run(self.chunk_frames)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.pending) >= self.max_queue + self.slots - len(self.active):  # free slots take some
                raise QueueFull
            self.pending.append(job)
            self._gauges()
            self.wake.notify()

    def queue_depth(self) -> int:
        return len(self.pending)

    def busy(self) -> int:
        return len(self.active)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))
            self.metrics.slots_busy.set(len(self.active))

    # ---- device thread ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.pending and not self.active:
                    self.wake.wait()
                if self.stopping:
                    return
                free = [s for s in range(self.slots) if s not in self.active]
                if not free or not self.pending:
                    return
                job = self.pending.popleft()
            if job.cancelled.is_set():
                job.emit(END)
                continue
            try:
                self.batcher.insert(free[0], job.prompt, job.max_frames, job.seed, job.sampling)
            except Exception as e:  # checked before submit: anything here is a bug, reported to that job only
                log.exception("prefill failed")
                job.emit(e)
                continue
            self.active[free[0]] = job
            with self.wake:
                self._gauges()

    def _device_loop(self) -> None:
        while not self.stopping:
            self._admit()
            if self.stopping or not self.active:
                continue
            try:
                codes, kept, done = self.batcher.run(self.chunk_frames)
            except Exception as e:
                log.exception("decode step failed; failing the running requests")
                for job in self.active.values():
                    job.emit(e)
                self.active.clear()
                self.batcher = SlotBatcher(self.batcher.frames, self.slots, self.batcher.length)
                continue
            produced = 0
            for slot, job in list(self.active.items()):
                new = codes[slot][kept[slot]]
                produced += len(new)
                if len(new) and not job.cancelled.is_set():
                    self.audio_jobs.put((job, new.T))
                if done[slot] or job.cancelled.is_set():
                    if not done[slot]:
                        self.batcher.release(slot)
                    self.audio_jobs.put((job, None))
                    del self.active[slot]
            if self.metrics is not None:
                self.metrics.frames.inc(produced)
                self.metrics.frame_rate.observe(produced)
            with self.wake:
                self._gauges()

    # ---- audio thread ----------------------------------------------------------------------------------------

    def _audio_loop(self) -> None:
        while True:
            items = [self.audio_jobs.get()]
            while True:  # take everything waiting: one Mimi call per job for all its new frames
                try:
                    items.append(self.audio_jobs.get_nowait())
                except queue.Empty:
                    break
            if any(item is None for item in items):
                return
            groups: dict[Job, list] = {}
            for job, codes in items:
                groups.setdefault(job, []).append(codes)
            for job, parts in groups.items():
                self._deliver(job, parts)

    def _deliver(self, job: Job, parts: list) -> None:
        codes = [c for c in parts if c is not None]
        if codes and not job.cancelled.is_set():
            try:
                job.mimi_state, wave = self.streams.decode(job.mimi_state, np.concatenate(codes, axis=1))
            except Exception as e:
                log.exception("Mimi decode failed")
                job.cancel()
                job.emit(e)
                return
            job.frames += sum(c.shape[1] for c in codes)
            job.emit(wave)
        if parts[-1] is None:
            job.mimi_state = None
            job.emit(END)
