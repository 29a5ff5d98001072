"""Step command_buffer: batch-1 decoding's launch overhead under XLA's command-buffer (CUDA graph) settings.

A CSM-1B frame is thousands of small kernels; XLA records runs of them into command buffers, by default not the
`while` loops of the frame loop itself. Each setting below runs in its own process (the flags are read when the
backend starts, and a crash costs one setting), on the same random weights, and records its ms/frame, so that one
GPU run says which setting to make the default. The flags exist in jax 0.11's XLA (the CPU smoke run parses them).

    python -m benchmarks.gpu_check.command_buffer SETTING OUT_DIR CONFIG FRAMES   # one setting (what the step runs)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# name -> XLA_FLAGS, in the order they run (the most likely gain first; XLA's default last, as a baseline on the same
# weights: decode_bf16 measured it already)
SETTINGS = {
    "while_conditional": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    "while_conditional_unrolled": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL "
                                  "--xla_gpu_command_buffer_unroll_loops=true",
    "off": "--xla_gpu_enable_command_buffer=",
    "xla_default": "",
}


def step(rec, size: dict, out: Path) -> None:
    """Runs the settings in turn, each in a subprocess that may take all the time left (a CSM-1B compile dominates)."""
    from benchmarks.gpu_check.record import read_figures

    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", time.time() + 600)) - 2  # 2 s to record a stop
    for name, flags in SETTINGS.items():
        left = deadline - time.time()
        if left < 5:
            rec[name] = {"error": "skipped: the step's time budget was spent", "xla_flags": flags}
            continue
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        cmd = [sys.executable, "-m", "benchmarks.gpu_check.command_buffer", name, str(out), size["full"],
               str(size["frames"])]
        try:
            code = subprocess.run(cmd, env=env, timeout=left).returncode
            if code != 0 and name not in read_figures(out).get(rec.step, {}):
                rec[name] = {"error": f"exit {code} before a figure (see the log)", "xla_flags": flags}
        except subprocess.TimeoutExpired:
            rec[name] = {"error": f"stopped at the step's budget after {left:.0f} s", "xla_flags": flags}


def one_setting(name: str, out: Path, config_name: str, frames: int) -> None:
    """Batch-1 ms/frame of `config_name` at random bf16 weights under this process's XLA_FLAGS."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.gpu_check.decode import batch_figures
    from benchmarks.gpu_check.record import Recorder
    from csm_jax.core.config import preset
    from csm_jax.core.model import Csm
    from csm_jax.inference.loop import FrameGenerator

    rec = Recorder(out, "command_buffer")
    config = preset(config_name)

    def measure():
        gen = FrameGenerator(Csm(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        return {**batch_figures(gen, config, 1, frames, None), "xla_flags": SETTINGS[name]}

    rec.guard(name, measure)


if __name__ == "__main__":
    name, out, config_name, frames = sys.argv[1:]
    one_setting(name, Path(out), config_name, int(frames))
