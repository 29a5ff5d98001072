"""benchmarks/gpu_check, the one script a lent GPU runs, proven in its wiring in seconds: the plan's budgets, the
driver (each step in its own process, figures kept the moment they are measured, a crash, a hang and a failed check
each reported as such, exit 1), the table over every step's recorded figures, and the real env step and command-buffer
flags on this CPU. The whole smoke run (every step's own code at tiny sizes, on the GPU image's versions) is
benchmarks/gpu_rehearsal.sh."""

import importlib
import json
import os
import subprocess
import sys

from benchmarks.gpu_check import command_buffer, driver
from benchmarks.gpu_check.plan import SIZES, STEPS, TOTAL_BUDGET
from benchmarks.gpu_check.record import FIGURES, Recorder, read_figures
from benchmarks.gpu_check.table import table
from tests.gpu_check_stubs import RECORDED


def test_every_step_resolves_and_the_budgets_fit_the_run():
    assert sum(budget for _, _, budget in STEPS) <= TOTAL_BUDGET
    assert [name for name, _, _ in STEPS][:4] == ["env", "decode_bf16", "decode_int8", "transformers_eager"]
    for _, target, _ in STEPS:
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(f"benchmarks.gpu_check.{module}"), function)), target
    recorded = {json.loads(line)["step"] for line in RECORDED.read_text().splitlines()}
    assert recorded == {name for name, _, _ in STEPS}, "re-record tests/data/gpu_check_figures.jsonl (see its test)"


def test_the_driver_keeps_each_figure_and_reports_every_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    steps = [(name, "tests.gpu_check_stubs:replay", budget) for name, _, budget in STEPS]
    steps[1:1] = [("crash", "tests.gpu_check_stubs:crash", 30), ("hang", "tests.gpu_check_stubs:hang", 0.5),
                  ("failed_check", "tests.gpu_check_stubs:failed_check", 30)]
    code = driver.run_all(tmp_path, smoke=True, steps=steps, total_budget=1000)
    assert code == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {name: s["status"] for name, s in results["steps"].items()}
    assert status["crash"] == "failed (exit 1)" and status["hang"].startswith("stopped at its 5 s budget")
    assert status["failed_check"] == "failed (a check)"
    assert results["steps"]["failed_check"]["failures"] == ["greedy: did not pass"]
    assert "RuntimeError: CUDA error" in results["steps"]["crash"]["failures"][0]
    assert all(status[name] == "ok" for name, _, _ in STEPS), status
    figures = read_figures(tmp_path)
    assert figures["hang"]["before"] == {"ms": 2.0} and figures["crash"]["before"] == {"ms": 1.0}  # kept
    assert "==== hang (budget 5 s)" in (tmp_path / "gpu_check.log").read_text()

    text = (tmp_path / "gpu_check.md").read_text().strip()
    assert capsys.readouterr().out.rstrip().endswith(text)  # the table is printed last
    assert "| step hang | stopped at its 5 s budget" in text
    assert "| step crash | failed (exit 1)" in text and "illegal memory access" in text
    assert "| step failed_check | failed (a check)" in text and "greedy: did not pass" in text


def test_the_table_shows_every_recorded_figure():
    """A smoke run's figures of every step leave no row of the table without its figure."""
    figures = {}
    for line in RECORDED.read_text().splitlines():
        row = json.loads(line)
        figures.setdefault(row["step"], {})[row["key"]] = row["value"]
    steps = {name: {"status": "ok", "failures": []} for name, _, _ in STEPS}
    text = table(figures, steps, SIZES["smoke"])
    assert "not measured" not in text and "None" not in text, text
    for name, _, _ in STEPS:
        assert f"| step {name} | ok |" in text


def test_figures_survive_a_line_cut_short(tmp_path):
    rec = Recorder(tmp_path, "decode_bf16")
    rec["batch_1"] = {"ms_per_frame": 3.5}
    rec["batch_1"] = {"ms_per_frame": 3.25}
    with (tmp_path / FIGURES).open("a") as f:
        f.write('{"step": "decode_bf16", "key": "time_to_fi')  # the step was killed mid-write
    assert read_figures(tmp_path) == {"decode_bf16": {"batch_1": {"ms_per_frame": 3.25}}}


def test_the_env_step_and_every_command_buffer_setting_run_here(tmp_path):
    """The real env step at smoke sizes, and each XLA_FLAGS setting of the command_buffer step accepted by this
    jaxlib (XLA stops at start-up on a flag it does not know)."""
    from benchmarks.gpu_check import env

    rec = Recorder(tmp_path, "env")
    env.step(rec, SIZES["smoke"], tmp_path)
    assert rec.data["read_bandwidth"]["bytes_per_s"] > 0 and rec.data["matmul_bf16"]["flops_per_s"] > 0
    assert "jax" in rec.data["jax_environment"] and rec.data["versions"]["jax"] != "missing"
    assert {"torch_cuda", "torch_cudnn", "c_compiler", "python_headers"} <= set(rec.data["toolchain"])
    for name, flags in command_buffer.SETTINGS.items():
        done = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                              env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == "3.0", (name, done.stderr[-2000:])
