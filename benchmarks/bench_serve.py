"""Load test of the speech server on loopback: 1, 4 and 16 concurrent streaming clients against one-at-a-time
serving, on random weights (the `small` preset, random Mimi; Mimi on the GPU when JAX runs on one, as the server
puts it), in one run.

    python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --config small --slots 16 --frames 24 --requests 2

One-at-a-time serving is a 1-slot server with one client; then one `--slots` server takes 1, 4 and 16 clients.
Every client streams pcm (`stream_format` audio) requests back to back; each request asks for `--frames` frames
(a random model never ends early, so every request is exactly that long) and each client sends `--requests`
requests (at most `--max-seconds` per level). Reported per level, over the requests that succeeded: aggregate
frames/s (their frames / wall time), time to first audio (p50, p95) and request latency (p95), and their ratios to
one-at-a-time serving. Failed requests (an HTTP error, a broken or short stream) are counted, their errors printed,
and they make the exit status 1.
Compilation happens before timing (the server warms up at start, and one request per level is sent first).
First the two halves of serving are timed apart: the decode batch alone (frames/s with 1 and with `--slots` busy
slots) and Mimi's streaming decode (ms per frame of one stream, and of `--slots` streams in one call), which
bound what the server can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from csm_jax.core.codec import FRAME_MS  # noqa: E402
from csm_jax.core.config import preset  # noqa: E402
from csm_jax.core.model import Csm  # noqa: E402
from csm_jax.inference.generator import Generator  # noqa: E402
from csm_jax.io import audio  # noqa: E402
from csm_jax.io.text import load_tokenizer  # noqa: E402
from csm_jax.serve import serve_in_background  # noqa: E402
from csm_jax.serving.app import ServeConfig, build_app  # noqa: E402

TEXTS = ["Hello there, how are you today?", "The weather is fine.", "Please leave a message after the tone.",
         "One, two, three, four.", "This is a load test of the speech server."]


def random_generator(config: str) -> Generator:
    """The `config` preset at random weights with a random Mimi, which runs beside the model as the server's does: on
    the GPU JAX computes on if torch sees it, else on the CPU."""
    return Generator(Csm(preset(config), rngs=nnx.Rngs(0)), load_tokenizer(),
                     audio.random_mimi(0, device=audio.torch_device_beside_jax()))


@contextlib.contextmanager
def serving(generator, slots: int, chunk_frames: int):
    """A server with `slots` decode slots on a free loopback port, for the block's duration; yields its URL."""
    app = build_app(generator, ServeConfig(slots=slots, max_queue=64, chunk_frames=chunk_frames,
                                           max_audio_ms=100_000), tempfile.mkdtemp())
    with serve_in_background(app) as url:
        yield url


@dataclasses.dataclass
class Result:
    ttfa: float | None  # None when no audio came
    latency: float
    frames: int
    error: str | None = None  # why the request failed: an HTTP error, a broken stream, or fewer frames than asked


async def one_request(client: httpx.AsyncClient, text: str, frames: int, seed: int) -> Result:
    """One streamed request; a failure is a `Result` with its `error`, never an exception (a random model never
    ends early, so fewer frames than asked is a failure too)."""
    start = time.perf_counter()
    first, received, error = None, 0, None
    body = {"model": "csm-1b", "input": text, "response_format": "pcm", "seed": seed,
            "max_audio_length_ms": frames * FRAME_MS}
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
            else:
                async for chunk in r.aiter_bytes():
                    if chunk and first is None:
                        first = time.perf_counter() - start
                    received += len(chunk)
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"[:200]
    got = received // (1920 * 2)
    if error is None and got < frames:
        error = f"{got} of {frames} frames (the stream ended early)"
    return Result(first, time.perf_counter() - start, got, error)


async def level(url: str, clients: int, requests: int, frames: int, max_seconds: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await one_request(client, TEXTS[0], 2, 0)  # compiles this prompt bucket before timing
        results: list[Result] = []
        start = time.perf_counter()

        async def worker(w: int):
            for i in range(requests):
                if time.perf_counter() - start > max_seconds:
                    return
                results.append(await one_request(client, TEXTS[(w + i) % len(TEXTS)], frames, w * 1000 + i))

        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    return summary(results, clients, wall)


def summary(results: list[Result], clients: int, wall: float) -> dict:
    """A level's row: throughput (frames of the requests that succeeded / wall time), time to first audio and
    latency over those requests (None when none did), and the failed requests counted with their distinct errors."""
    ok = [r for r in results if r.error is None]

    def percentile(values, q):
        return float(np.percentile(values, q)) if len(values) else None

    ttfa, latency = [r.ttfa for r in ok], [r.latency for r in ok]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error is not None})[:5],
            "frames": sum(r.frames for r in ok), "fps": sum(r.frames for r in ok) / wall,
            "ttfa_p50": percentile(ttfa, 50), "ttfa_p95": percentile(ttfa, 95),
            "latency_p95": percentile(latency, 95), "wall": wall}


def parts(generator, slots: int, frames: int, chunk: int) -> dict:
    """The two halves of serving, timed apart: the decode batch alone (1 and `slots` busy slots, frames/s) and
    Mimi's streaming decode (ms per frame of 1 and of `slots` streams decoded together)."""
    from csm_jax.inference.batcher import SlotBatcher
    from csm_jax.inference.prompt import coded_prompt_frames
    from csm_jax.inference.sampling import FrameSampling
    from csm_jax.serving.mimi_streams import MimiStreams

    prompt = coded_prompt_frames(generator.tokenizer, TEXTS[0], 0, (), generator.frames.config.num_codebooks)
    out = {}
    for busy in (1, slots):
        batcher = SlotBatcher(generator.frames, busy)
        for rep in range(2):  # the first round compiles
            for s in range(busy):
                batcher.insert(s, prompt, frames, s, FrameSampling())
            start, made = time.perf_counter(), 0
            while True:
                _, kept, done = batcher.run(chunk)
                made += int(kept.sum())
                if done.all():
                    break
        out[f"batch{busy}_fps"] = made / (time.perf_counter() - start)
    codes = np.random.default_rng(0).integers(1, 2048, (generator.frames.config.num_codebooks, chunk))
    for rows in (1, slots):  # one stream alone, then `slots` streams in one call
        streams = MimiStreams(generator.mimi, rows)
        batch = {row: codes for row in streams.open(rows)}
        streams.decode(batch)
        start = time.perf_counter()
        for _ in range(5):
            streams.decode(batch)
        out[f"mimi{rows}_ms_per_frame"] = (time.perf_counter() - start) / (5 * chunk) * 1000
    return out


def load_test(generator, slots: int, clients, frames: int, requests: int, chunk_frames: int, max_seconds: float):
    """Yields a row per level as it is measured: one-at-a-time serving first (a 1-slot server, one client sending
    twice `requests`), then one `slots` server with each number of `clients` (one client sends twice `requests`)."""
    with serving(generator, 1, chunk_frames) as url:
        row = asyncio.run(level(url, 1, requests * 2, frames, max_seconds))
    yield {**row, "server": "1 slot (one at a time)"}
    with serving(generator, slots, chunk_frames) as url:
        for n in clients:
            row = asyncio.run(level(url, n, requests if n > 1 else requests * 2, frames, max_seconds))
            yield {**row, "server": f"{slots} slots"}


def against(row: dict, base: dict) -> dict:
    """A level's ratios to one-at-a-time serving, as the goals are stated (16 clients: throughput >= 6x, p95 time to
    first audio <= 2x); None where either side has no figure."""
    def ratio(key):
        return row[key] / base[key] if row[key] is not None and base[key] else None

    return {"fps_x": ratio("fps"), "ttfa_p95_x": ratio("ttfa_p95")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--frames", type=int, default=24, help="frames per request (80 ms each)")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--chunk-frames", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=300, help="stop starting requests after this per level")
    args = p.parse_args(argv)

    generator = random_generator(args.config)
    split = parts(generator, args.slots, args.frames, args.chunk_frames)
    rows = list(load_test(generator, args.slots, args.clients, args.frames, args.requests, args.chunk_frames,
                          args.max_seconds))
    base = rows[0]

    print(f"config {args.config}, {args.frames} frames per request, chunk {args.chunk_frames} frames, "
          f"{os.cpu_count()} CPUs")
    print(f"decode batch alone: {split['batch1_fps']:.1f} frames/s with 1 slot, {split[f'batch{args.slots}_fps']:.1f} "
          f"with {args.slots} busy slots ({split[f'batch{args.slots}_fps'] / split['batch1_fps']:.2f}x); Mimi "
          f"streaming decode {split['mimi1_ms_per_frame']:.1f} ms per frame of one stream, "
          f"{split[f'mimi{args.slots}_ms_per_frame']:.1f} ms per frame of {args.slots} streams in one call")
    print(f"{'server':<24}{'clients':>8}{'requests':>9}{'failed':>7}{'frames/s':>10}{'x base':>8}{'TTFA p50':>10}"
          f"{'TTFA p95':>10}{'x base':>8}{'latency p95':>12}")
    for r in rows:
        x = against(r, base)
        print(f"{r['server']:<24}{r['clients']:>8}{r['requests']:>9}{r['failed']:>7}{r['fps']:>10.1f}"
              f"{figure(x['fps_x'], '.2f'):>8}{figure(r['ttfa_p50'], '.3f', 's'):>10}"
              f"{figure(r['ttfa_p95'], '.3f', 's'):>10}{figure(x['ttfa_p95_x'], '.2f'):>8}"
              f"{figure(r['latency_p95'], '.2f', 's'):>12}")
    for r in rows:
        for error in r["errors"]:
            print(f"failed ({r['server']}, {r['clients']} clients): {error}")
    return 1 if any(r["failed"] for r in rows) else 0


def figure(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


if __name__ == "__main__":
    sys.exit(main())
