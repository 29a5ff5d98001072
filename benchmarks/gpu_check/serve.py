"""Step serve: benchmarks/bench_serve.py's load test, small config, Mimi beside the model (on the card): the halves
(decode batch alone, Mimi alone), one-at-a-time serving, then 1, 4 and 16 streaming clients over loopback, each
level recorded as it ends, with the goals' ratios against one at a time."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_check.record import not_installed, once


def step(rec, size: dict, out: Path) -> None:
    if missing := not_installed("benchmarks.bench_serve"):  # the server (starlette, uvicorn) and httpx
        rec["setup"] = {"error": f"{missing} not installed (carry its wheel: bash benchmarks/gpu_wheels.sh .whl)"}
        return
    from benchmarks.bench_serve import against, load_test, parts, random_generator

    s = size["serve"]
    rec["sizes"] = s
    generator = once(lambda: random_generator(s["config"]))
    rec.guard("mimi_device", lambda: str(next(generator().mimi.parameters()).device))
    rec.guard("halves", lambda: parts(generator(), s["slots"], s["frames"], s["chunk_frames"]))

    def levels():
        base = None
        for row in load_test(generator(), s["slots"], s["clients"], s["frames"], s["requests"], s["chunk_frames"],
                             s["max_seconds"]):
            if base is None:
                base = rec["one_at_a_time"] = row
            else:
                rec[f"clients_{row['clients']}"] = {**row, **against(row, base)}
        return {"levels": len(s["clients"]) + 1}

    rec.guard("load_test", levels)
