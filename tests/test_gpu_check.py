"""benchmarks/gpu_check.sh, the one script a lent GPU runs, in its --smoke form: every step on the CPU with tiny
sizes, through the same code, so that the script cannot break unseen between GPU runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_step_and_prints_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("env", "correctness", "mimi", "decode_bf16", "decode_int8", "train", "serve", "lora", "transformers"):
        assert results[step]["_status"] == "ok", f"{step}: {results[step]['_status']}\n{log[-4000:]}"

    env_ = results["env"]
    assert env_["versions"]["jax"] != "missing" and env_["device"]["platform"] == "cpu"
    assert env_["copy"]["bytes_per_s"] > 0 and env_["matmul_bf16"]["flops_per_s"] > 0

    correctness = results["correctness"]
    for check in ("parity_float32", "parity_bfloat16", "greedy", "int8"):
        assert correctness[check].get("pass") is True, (check, correctness[check])
    assert correctness["parity_float32"]["max_abs"] < 1e-4

    assert results["mimi"]["pass"] is True and results["mimi"]["encode_ms"] > 0

    # per-frame times are differences of two timed runs (2N and N frames): on a busy CPU at the smoke sizes they
    # can come out at or below zero, so here they are only checked to be numbers
    for step in ("decode_bf16", "decode_int8"):
        decode = results[step]
        for batch in (1,):
            figures = decode[f"batch_{batch}"]
            assert math.isfinite(figures["ms_per_frame"]) and figures["first_call_s"] > 0, (step, batch, figures)
        assert math.isfinite(decode["batch_1"]["share_of_bandwidth_floor"])
        assert decode["time_to_first_audio"]["audio_ms"] > decode["time_to_first_audio"]["codes_ms"] > 0
    assert results["decode_int8"]["weight_bytes_per_frame"] * 2 == results["decode_bf16"]["weight_bytes_per_frame"]

    theirs = results["transformers"]["batch_1"]
    assert math.isfinite(theirs["ms_per_frame"]) and math.isfinite(theirs["ours_speedup"]) and "eager" in theirs["mode"]

    train = results["train"]
    assert train["loss_finite"] and train["frames_per_s"] > 0 and 0 < train["mfu_vs_790"] < 1
    assert train["flops_per_step"] > 0

    # the load test at smoke size: one at a time, then 1 and 2 clients on a 2-slot server, 4 frames a request
    serve = results["serve"]
    assert serve["mimi_device"] == "cpu"
    assert serve["halves"]["batch2_fps"] > 0 and serve["halves"]["mimi2_ms_per_frame"] > 0
    for key in ("one_at_a_time", "clients_1", "clients_2"):
        row = serve[key]
        assert row["requests"] >= 1 and row["frames"] == 4 * row["requests"], (key, row)
        assert row["fps"] > 0 and 0 < row["ttfa_p50"] <= row["ttfa_p95"] <= row["latency_p95"], (key, row)
    assert serve["clients_2"]["fps_x"] > 0 and serve["clients_2"]["ttfa_p95_x"] > 0

    lora = results["lora"]["tiny_bfloat16"]  # our LoRA step and transformers + PEFT's, both measured
    assert lora["ours_ms"] > 0 and lora["transformers_peft_ms"] > 0, lora
    assert lora["transformers_over_ours"] == lora["transformers_peft_ms"] / lora["ours_ms"]

    table = (tmp_path / "gpu_check.md").read_text().strip()
    assert proc.stdout.rstrip().endswith(table)  # printed last
    assert "| check | result |" in table and "not measured" not in table, table
