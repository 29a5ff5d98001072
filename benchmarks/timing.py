"""Wall-clock timing shared by the benchmarks."""

import statistics
import time


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each of `fns` (name -> function) over `repeats` rounds that call each once in turn, after
    `warmup` untimed rounds (compiles, caches): a busy machine's drift falls on every side alike. Each function must
    block until its device work is done."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones (see `median_times`)."""
    return median_times({"": fn}, repeats, warmup)[""]
