"""The serving loop: a bounded queue of jobs, one device thread that keeps a `SlotBatcher` busy, and one audio
thread that turns the codes of all running jobs into audio in one batched streaming Mimi call per step, each job
in its own `MimiStreams` row.

The device thread admits waiting jobs into free slots at every chunk boundary (a prefill per job, while the
other slots keep their state), runs `chunk_frames` frames for all slots, hands the step's codes of every job to
the audio thread at once, and frees the slot of a finished or cancelled job at once. When Mimi falls behind,
the audio thread decodes the frames that piled up in fewer, longer calls. Jobs talk to their asyncio handler
through `Job.emit`.
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
    mimi_row: int | None = None  # the job's row in `MimiStreams` while its audio is decoded

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
        """Compiles the prefill, the slot insert, the frame step of every decode batch size and the moves between
        them before the first request, and leaves the batch at its smallest size."""
        batcher, steps = self.batcher, self.chunk_frames
        shrink_after, batcher.shrink_after = batcher.shrink_after, 1
        frames = steps * (2 * len(batcher.sizes) + 1)
        for low, high in zip((0,) + batcher.sizes, batcher.sizes):  # grows through every size, prefills each size
            batcher.insert_many([(slot, prompt, frames, 0, FrameSampling()) for slot in range(low, high)])
            batcher.run(steps)
        for slot in reversed(range(self.slots)):  # and shrinks back
            batcher.release(slot)
            if slot in batcher.sizes or slot == 0:
                batcher.run(steps)
        batcher.shrink_after = shrink_after
        codes = np.zeros((prompt.tokens.shape[1] - 1, steps), np.int64)
        for size in batcher.sizes:  # each Mimi bank once
            rows = self.streams.open(size)
            self.streams.decode({row: codes for row in rows})
            for row in rows:
                self.streams.close(row)

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
        """Places waiting jobs into free slots, all that fit prefilled together."""
        with self.wake:
            while not self.stopping and not self.pending and not self.active:
                self.wake.wait()
            free = [s for s in range(self.slots) if s not in self.active]
            jobs = [self.pending.popleft() for _ in range(min(len(free), len(self.pending)))]
        for job in [job for job in jobs if job.cancelled.is_set()]:
            job.emit(END)
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if self.stopping or not jobs:
            return
        try:
            self.batcher.insert_many([(slot, job.prompt, job.max_frames, job.seed, job.sampling)
                                      for slot, job in zip(free, jobs)])
        except Exception as e:  # checked before submit: anything here is a bug, reported to those jobs only
            log.exception("prefill failed")
            for slot in free[:len(jobs)]:
                self.batcher.release(slot)
            for job in jobs:
                job.emit(e)
            return
        self.active.update(zip(free, jobs))
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
                    job.cancel()
                    job.emit(e)
                self.audio_jobs.put([(job, None, True) for job in self.active.values()])
                self.active.clear()
                self.batcher = SlotBatcher(self.batcher.frames, self.slots, self.batcher.length)
                continue
            step, produced = [], 0
            for slot, job in list(self.active.items()):
                new = codes[slot][kept[slot]]
                produced += len(new)
                final = bool(done[slot]) or job.cancelled.is_set()
                step.append((job, new.T, final))
                if final:
                    if not done[slot]:
                        self.batcher.release(slot)
                    del self.active[slot]
            self.audio_jobs.put(step)  # one item per step: the audio thread sees every running job's frames
            if self.metrics is not None:
                self.metrics.frames.inc(produced)
                self.metrics.frame_rate.observe(produced)
            with self.wake:
                self._gauges()

    # ---- audio thread ----------------------------------------------------------------------------------------

    def _audio_loop(self) -> None:
        backlog: dict[Job, np.ndarray] = {}  # each open stream's codes not decoded yet
        finished: set[Job] = set()  # streams whose last codes are in the backlog
        while True:
            steps = [self.audio_jobs.get()]
            while True:  # take every step waiting: fewer, longer Mimi calls when audio falls behind
                try:
                    steps.append(self.audio_jobs.get_nowait())
                except queue.Empty:
                    break
            if any(step is None for step in steps):
                return
            for step in steps:
                for job, codes, last in step:
                    if codes is not None:
                        backlog[job] = codes if job not in backlog else np.concatenate([backlog[job], codes], 1)
                    if last:
                        finished.add(job)
            while self._deliver(backlog, finished):  # again while streams end and free rows for waiting ones
                pass

    def _deliver(self, backlog: dict, finished: set) -> bool:
        """One Mimi call per bank for every stream with codes waiting: a bank decodes as many frames as all its
        going-on streams have (`MimiStreams.decode` needs the same number for each), the rest waits for the next
        step; a finished stream's last frames go with the others, padded. New streams get rows while there are
        free ones (others wait for a stream to end). Returns whether anything was decoded or ended."""
        progress = False
        for job in [job for job in backlog if job.cancelled.is_set()]:
            del backlog[job]
        new = [job for job in backlog if job.mimi_row is None]
        new = new[:self.streams.rows - len(self.streams.open_rows)]
        for job, row in zip(new, self.streams.open(len(new), expect=self.busy())):  # a burst opens in one bank
            job.mimi_row = row
        placed = [job for job in backlog if job.mimi_row is not None]
        for bank in self.streams.banks_of([job.mimi_row for job in placed]):
            jobs = [job for job in placed if job.mimi_row in bank]
            going_on = [backlog[job].shape[1] for job in jobs if job not in finished]
            frames = min(going_on) if going_on else max(backlog[job].shape[1] for job in jobs)
            codes = {job: backlog[job][:, :frames] for job in jobs}
            codes = {job: c for job, c in codes.items() if c.shape[1]}
            if not codes:
                continue
            progress = True
            try:
                waves = self.streams.decode({job.mimi_row: c for job, c in codes.items()})
            except Exception as e:
                log.exception("Mimi decode failed")
                for job in codes:
                    job.cancel()
                    job.emit(e)
                    del backlog[job]
                continue
            for job, c in codes.items():
                job.frames += c.shape[1]
                job.emit(waves[job.mimi_row])
                backlog[job] = backlog[job][:, c.shape[1]:]
        for job in [job for job in finished if job not in backlog or not backlog[job].shape[1]]:
            backlog.pop(job, None)
            finished.discard(job)
            if job.mimi_row is not None:
                self.streams.close(job.mimi_row)
                job.mimi_row = None
            job.emit(END)
            progress = True
        return progress
