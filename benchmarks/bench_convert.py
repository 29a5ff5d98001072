"""Wall time and peak memory of one `python -m convert` run (arguments passed through).

    python -m benchmarks.bench_convert /tmp/csm-full/original /tmp/csm-full/orbax
    python -m benchmarks.bench_convert /tmp/csm-full/orbax /tmp/csm-full/hf --to transformers

Peak RSS (getrusage) counts the pages of memory-mapped source files that were touched; peak anonymous memory
(RssAnon, sampled every 20 ms) is the memory the conversion itself allocates. Compare both with the size of
the model's parameters in the output dtype (6.21 GB float32, 3.11 GB bfloat16 for CSM-1B).
"""

from __future__ import annotations

import resource
import sys
import threading
import time


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    def __init__(self, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.running = every_s, 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.every_s)


def main() -> int:
    from convert.__main__ import main as convert_main  # imports torch, jax, orbax: part of the baseline

    baseline = rss_anon_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    status = convert_main(sys.argv[1:])
    wall = time.perf_counter() - start
    sampler.running = False
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"wall {wall:.1f} s; peak RSS {peak_rss / 1e9:.2f} GB; peak anonymous {sampler.peak / 1e9:.2f} GB "
          f"(of which the runtime after imports: {baseline / 1e9:.2f} GB)")
    return status


if __name__ == "__main__":
    sys.exit(main())
