"""Runs the steps of benchmarks/gpu_check/plan.py, each in its own process under its own time budget (a crash, an
out-of-memory or a hang costs one step, and each step starts with the card's memory free). Each step's output streams
to OUT_DIR/gpu_check.log and its figures to OUT_DIR/figures.jsonl as they are measured; after each step
OUT_DIR/gpu_check.json is rewritten, and at the end OUT_DIR/gpu_check.md holds the table (also printed last), which
says which steps failed and why. Compilation caches for JAX and torch's Inductor live under OUT_DIR/cache/compile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check.plan import BUDGET_SCALE, SIZES, STEPS, TOTAL_BUDGET
from benchmarks.gpu_check.record import FIGURES, failures, read_figures
from benchmarks.gpu_check.table import table

MIN_STEP_SECONDS = 10  # a step is not started with less left than this (times the smoke scale)


def compile_caches(out: Path) -> dict:
    """Environment variables that keep JAX's and torch.compile's compiled programs under OUT_DIR."""
    root = (out / "cache" / "compile").resolve()
    return {"JAX_COMPILATION_CACHE_DIR": str(root / "jax"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}


def run_step(name: str, target: str, out: Path, smoke: bool, budget: float, log) -> str:
    """Runs one step in a process group of its own, killed whole at `budget` seconds; returns its status."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--step", name, target, str(out)] + (["--smoke"] * smoke)
    env = {**os.environ, **compile_caches(out), "GPU_CHECK_DEADLINE": str(time.time() + budget),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"stopped at its {budget:.0f} s budget (figures so far kept)"
    if code:
        return f"failed (exit {code})"
    return "ok"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_all(out: Path, smoke: bool, steps=STEPS, total_budget: float = TOTAL_BUDGET) -> int:
    """Every step in order; returns 1 when any step (or any of its checks) failed, else 0."""
    size = SIZES["smoke" if smoke else "gpu"]
    scale = BUDGET_SCALE["smoke" if smoke else "gpu"]
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES).unlink(missing_ok=True)  # this run's figures only
    results = {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "steps": {}}
    start = time.time()
    with (out / "gpu_check.log").open("w") as log:
        for name, target, budget in steps:
            left = total_budget * scale - (time.time() - start)
            if left < MIN_STEP_SECONDS * scale:
                results["steps"][name] = {"status": "skipped: the run's time budget was spent", "failures": []}
                continue
            budget = min(budget * scale, left)
            log.write(f"==== {name} (budget {budget:.0f} s)\n")
            log.flush()
            t0 = time.time()
            status = run_step(name, target, out, smoke, budget, log)
            seconds = time.time() - t0
            log.write(f"==== {name}: {status} in {seconds:.1f} s\n")
            log.flush()
            failed = failures(read_figures(out).get(name, {}))
            if status == "ok" and failed:
                status = "failed (a check)"
            results["steps"][name] = {"status": status, "failures": failed, "seconds": round(seconds, 1),
                                      "budget": round(budget)}
            print(f"{name}: {status} in {seconds:.1f} s", flush=True)
            write_json(out / "gpu_check.json", {**results, "figures": read_figures(out)})
    results["total_seconds"] = round(time.time() - start, 1)
    write_json(out / "gpu_check.json", {**results, "figures": read_figures(out)})
    text = table(read_figures(out), results["steps"], size)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text, flush=True)
    return int(any(s["status"] != "ok" for s in results["steps"].values()))
