"""Wall-clock timing shared by the benchmarks."""

import statistics
import time


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones (compiles, caches); `fn` must block
    until its device work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
