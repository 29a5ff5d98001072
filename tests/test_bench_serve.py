"""benchmarks/bench_serve.py's load test counts and reports failed requests (an HTTP error, a stream that breaks or
ends short, no audio at all) instead of crashing on their missing time to first audio."""

import asyncio

import httpx

from benchmarks.bench_serve import against, one_request, summary

FRAME_BYTES = 1920 * 2  # a frame of 16-bit pcm


def answers(handler):
    """`one_request` of 3 frames against a server that answers with `handler`."""
    async def ask():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://server") as client:
            return await one_request(client, "words", 3, 0)

    return asyncio.run(ask())


def test_failed_requests_are_results_with_their_error():
    whole = answers(lambda request: httpx.Response(200, content=b"\0" * 3 * FRAME_BYTES))
    assert whole.error is None and whole.frames == 3 and whole.ttfa is not None
    busy = answers(lambda request: httpx.Response(429, json={"error": {"message": "at capacity"}}))
    assert busy.error.startswith("HTTP 429") and busy.ttfa is None and busy.frames == 0
    short = answers(lambda request: httpx.Response(200, content=b"\0" * FRAME_BYTES))
    assert short.error == "1 of 3 frames (the stream ended early)" and short.ttfa is not None
    empty = answers(lambda request: httpx.Response(200))
    assert empty.error == "0 of 3 frames (the stream ended early)" and empty.ttfa is None

    def refuse(request):
        raise httpx.ConnectError("connection refused")

    assert answers(refuse).error == "ConnectError: connection refused"

    row = summary([whole, busy, short, empty, whole], clients=4, wall=2.0)
    assert row["requests"] == 5 and row["failed"] == 3 and len(row["errors"]) == 3
    assert row["frames"] == 6 and row["fps"] == 3.0  # the two whole requests
    assert row["ttfa_p95"] == whole.ttfa
    nothing = summary([busy, empty], clients=1, wall=1.0)
    assert nothing["failed"] == 2 and nothing["fps"] == 0 and nothing["ttfa_p50"] is None
    assert against(row, nothing) == {"fps_x": None, "ttfa_p95_x": None}
    assert against(nothing, row) == {"fps_x": 0.0, "ttfa_p95_x": None}
