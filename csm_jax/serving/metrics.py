"""Prometheus metrics of the speech server (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class FrameRate:
    """Frames per second over the last `window` seconds, for the frames_per_second gauge."""

    def __init__(self, window: float = 10.0):
        self.window, self.events, self.lock = window, collections.deque(), threading.Lock()

    def observe(self, frames: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.events.append((now, frames))
            while self.events and self.events[0][0] < now - self.window:
                self.events.popleft()

    def value(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(n for t, n in self.events if t >= now - self.window) / self.window


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("csm_requests", "Speech requests by outcome", ["status"], registry=r)
        self.frames = Counter("csm_frames_generated", "Mimi frames generated (80 ms of audio each)", registry=r)
        self.frame_rate = FrameRate()
        Gauge("csm_frames_per_second", "Frames generated per second over the last 10 s",
              registry=r).set_function(self.frame_rate.value)
        self.ttfa = Histogram("csm_time_to_first_audio_seconds", "From request to its first audio bytes",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("csm_request_seconds", "From request to its last audio bytes",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("csm_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("csm_slots_busy", "Decode slots in use", registry=r)
        self.slots_total = Gauge("csm_slots", "Decode slots", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
