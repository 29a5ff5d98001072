"""Host malloc: a block over glibc's 32 MiB mapping threshold that a worker thread frees is reused by its next
allocation, not faulted in afresh (XLA's CPU runtime allocates each run's temporaries so; the training CLI and the
step benchmarks set this up before JAX starts)."""

import json
import os
import subprocess
import sys

from csm_jax.core.host_memory import KEPT, keep_freed_memory

RUNS = """
import ctypes, json, resource, sys, threading
from csm_jax.core.host_memory import keep_freed_memory
setting = keep_freed_memory() if sys.argv[1] == "keep" else "defaults"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []

def runs(size=64 << 20):
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=runs)
worker.start()
worker.join()
print(json.dumps({"setting": setting, "faults": faults}))
"""


def page_faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", RUNS, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_freed_block_is_reused_by_the_next_allocation():
    """64 MiB allocated, written and freed three times on a worker thread: with the setting, only the first time
    faults its pages in (the later ones under 1% of that); with glibc's defaults every time does."""
    kept, default = page_faults("keep"), page_faults("defaults")
    assert kept["setting"] == KEPT, kept
    assert max(kept["faults"][1:]) <= kept["faults"][0] // 100, kept
    assert min(default["faults"][1:]) >= default["faults"][0] // 2, default


def test_malloc_tunables_the_user_set_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert keep_freed_memory() == "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
