"""Step env: what the machine is (device, versions of everything a GPU run depends on, whether a C compiler is
there for torch.compile) and two measured rates the later steps compare against: the memory read bandwidth (the
bandwidth floor of batch-1 decoding, the same jitted sum as benchmarks/bench_generate.py) and the bf16 matmul rate."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.timing import median_time

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax",
            "torch", "triton", "transformers", "peft", "moshi", "numpy")
SWITCHES = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "NO_TORCH_COMPILE",
            "NO_CUDA_GRAPH", "JAX_COMPILATION_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            if "cuda" not in name:  # only the plugin that is there is worth a line
                found[name] = "missing"
    return found


def toolchain() -> dict:
    """torch's CUDA and cuDNN, the driver, and whether torch.compile (Inductor, Triton) can build here: it needs a C
    compiler and Python's headers at run time."""
    import torch

    out = {"torch_cuda": torch.version.cuda, "torch_cudnn": torch.backends.cudnn.version(),
           "c_compiler": shutil.which("cc") or shutil.which("gcc") or None,
           "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return out


def step(rec, size: dict, out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_generate import read_bandwidth

    rec["versions"] = versions()
    rec["python"] = sys.version.split()[0]
    device = jax.devices()[0]
    rec["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    rec["switches"] = {k: os.environ[k] for k in SWITCHES if k in os.environ}
    rec.guard("toolchain", toolchain)
    rec.guard("jax_environment", lambda: jax.print_environment_info(return_string=True))

    def read():
        nbytes = size["read_mib"] << 20
        return {"bytes_per_s": read_bandwidth(nbytes, size["repeats"]), "bytes": nbytes}

    def matmul_rate():
        m = size["matmul"]
        a, b = (jax.random.normal(jax.random.key(i), (m, m), jnp.bfloat16) for i in (1, 2))
        f = jax.jit(lambda a, b: a @ b)
        seconds = median_time(lambda: f(a, b).block_until_ready(), size["repeats"] * 2, warmup=1)
        return {"flops_per_s": 2 * m ** 3 / seconds, "size": m}

    rec.guard("read_bandwidth", read)
    rec.guard("matmul_bf16", matmul_rate)
