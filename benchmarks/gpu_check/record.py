"""How a step keeps what it measures: every figure is appended to OUT_DIR/figures.jsonl the moment it is known, so a
step stopped at its budget (or a crashed run) loses nothing it had measured."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

FIGURES = "figures.jsonl"


class Recorder:
    """One step's figures: `rec[key] = value` appends {"step", "key", "value"} to OUT_DIR/figures.jsonl at once."""

    def __init__(self, out: Path, step: str):
        self.path, self.step, self.data = out / FIGURES, step, {}

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        line = json.dumps({"step": self.step, "key": key, "value": value}, default=str)
        with self.path.open("a") as f:  # one write of one line: concurrent steps never interleave within it
            f.write(line + "\n")

    def guard(self, key: str, fn, *args, **kwargs):
        """Runs one sub-check; its exception is recorded under `key` as {"error": ...} and does not stop the step."""
        try:
            self[key] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (every failure is a result here)
            self[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            traceback.print_exc()
        return self.data[key]


def guard_attention(rec: Recorder, key: str, fn, *args):
    """`rec.guard`, and when the cuDNN attention path fails, the error is kept under `<key>_cudnn_error` and the
    check is run again with XLA's attention ($CSM_JAX_ATTENTION=xla for the rest of the step)."""
    import jax

    result = rec.guard(key, fn, *args)
    if "cudnn" in str(result.get("error", "")).lower() and os.environ.get("CSM_JAX_ATTENTION") != "xla":
        rec[f"{key}_cudnn_error"] = result["error"]
        os.environ["CSM_JAX_ATTENTION"] = "xla"
        jax.clear_caches()
        result = rec.guard(key, fn, *args)
        if "error" not in result:
            rec[key] = {**result, "attention": "xla (cuDNN failed)"}
    return rec.data[key]


def once(fn):
    """`fn()` computed on the first call; later calls return the same value or raise the same exception (a shared
    setup that failed fails every check that needs it, each recording it, without being tried again)."""
    memo: list = []

    def call():
        if not memo:
            try:
                memo.append((fn(), None))
            except Exception as e:  # noqa: BLE001 (re-raised to every caller)
                memo.append((None, e))
        value, error = memo[0]
        if error is not None:
            raise error
        return value

    return call


def read_figures(out: Path) -> dict[str, dict]:
    """Every step's figures so far, {step: {key: value}} (a later value of a key replaces the earlier one)."""
    steps: dict[str, dict] = {}
    path = out / FIGURES
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed step
                continue
            steps.setdefault(row["step"], {})[row["key"]] = row["value"]
    return steps


def failures(figures: dict) -> list[str]:
    """The sub-checks of one step that failed: an {"error": ...} or a {"pass": false} anywhere in its figures."""
    found = []

    def walk(path: str, node) -> None:
        if isinstance(node, dict):
            if "error" in node:
                found.append(f"{path}: {node['error']}")
            elif node.get("pass") is False:
                found.append(f"{path}: did not pass")
            for key, value in node.items():
                if key != "error":
                    walk(f"{path}.{key}", value)

    for key, value in figures.items():
        walk(key, value)
    return found


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_device_memory() -> None:
    """Drops JAX's compiled steps and what torch's allocator keeps, once a measurement's objects are gone."""
    import gc

    import jax
    import torch

    jax.clear_caches()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_installed(module: str) -> str:
    """The first package that `module` (or what it imports) lacks here, or "" when it imports."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        return e.name or module
    return ""
