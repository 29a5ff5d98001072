"""Command line of benchmarks/gpu_check (run benchmarks/gpu_check.sh, which sets the environment up, not this):

    python -m benchmarks.gpu_check OUT_DIR [--smoke]                       # every step, each in its own process
    python -m benchmarks.gpu_check --step NAME MODULE:FUNCTION OUT_DIR [--smoke]  # one step (what the driver runs)
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

from benchmarks.gpu_check.plan import SIZES
from benchmarks.gpu_check.record import Recorder


def run_one(name: str, target: str, out: Path, smoke: bool) -> int:
    """Runs one step function; an exception outside its guarded checks is recorded under "step" and exits 1."""
    rec = Recorder(out, name)
    try:
        module, function = target.split(":")
        step = getattr(importlib.import_module(module if "." in module else f"benchmarks.gpu_check.{module}"), function)
        step(rec, SIZES["smoke" if smoke else "gpu"], out)
    except Exception as e:  # noqa: BLE001 (a failure is a result)
        rec["step"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    args = [a for a in argv if a != "--smoke"]
    if args[:1] == ["--step"] and len(args) == 4:
        return run_one(args[1], args[2], Path(args[3]), smoke)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    from benchmarks.gpu_check.driver import run_all

    return run_all(Path(args[0]), smoke)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
