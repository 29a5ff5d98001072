"""Stand-ins for the steps of benchmarks/gpu_check (tests/test_gpu_check.py): each real step replays what a smoke
run of it recorded (tests/data/gpu_check_figures.jsonl), and three misbehave the ways a GPU run can."""

import json
import time
from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "data" / "gpu_check_figures.jsonl"


def replay(rec, size, out):
    for line in RECORDED.read_text().splitlines():
        row = json.loads(line)
        if row["step"] == rec.step:
            rec[row["key"]] = row["value"]


def crash(rec, size, out):
    rec["before"] = {"ms": 1.0}
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def hang(rec, size, out):
    rec["before"] = {"ms": 2.0}
    time.sleep(600)


def failed_check(rec, size, out):
    rec["greedy"] = {"device_equals_transformers": False, "pass": False}
    rec["int8"] = {"pass": True}
