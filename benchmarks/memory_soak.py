"""Resident memory over many generate() calls of varied sizes, schedulers and batch sizes.

    python benchmarks/memory_soak.py                  # 200 calls, embedded model
    python benchmarks/memory_soak.py --calls 1000 --model ./my-sd-folder

Every combination is visited in the first round, so what later rounds add is growth per call
(a leak), not a first-time cost (allocator pools, a new size's buffers). Prints the RSS after
the first round and at the end, and the growth per call between them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

import fastdiff
from fastdiff import schedulers, testing

SIZES = [(64, 64), (64, 96), (96, 64), (128, 128), (32, 64)]
IMAGES = [1, 2]


def rss_mib() -> float:
    """The process's resident set now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/memory_soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--model", default="tiny-shapes")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    combos = list(itertools.product(SIZES, schedulers.NAMES, IMAGES))
    rounds = max(1, args.calls // len(combos))
    print(f"cpu: {testing.cpu_name()}, torch threads {torch.get_num_threads()}, {args.calls} calls, "
          f"{len(combos)} combinations of size x scheduler x images")
    samples, seconds = [], []
    start = rss_mib()
    for i in range(args.calls):
        (h, w), scheduler, n = combos[i % len(combos)]
        t0 = time.perf_counter()
        fastdiff.generate("a red circle on a blue background", model=args.model, backend="torch", steps=args.steps,
                          height=h, width=w, scheduler=scheduler, num_images=n, seed=i, output_type="np")
        seconds.append(time.perf_counter() - t0)
        if (i + 1) % len(combos) == 0:
            samples.append(rss_mib())
    end = rss_mib()
    first = samples[0] if samples else start
    later = args.calls - len(combos)
    print(f"RSS before the first call  {start:8.1f} MiB")
    print(f"RSS after round 1 of {rounds}    {first:8.1f} MiB  ({len(combos)} calls, every combination once)")
    print(f"RSS after {args.calls} calls       {end:8.1f} MiB")
    if later > 0:
        print(f"growth after round 1       {end - first:+8.1f} MiB over {later} calls ({(end - first) * 1024 / later:+.1f} KiB per call)")
    print("RSS per round (MiB):", " ".join(f"{s:.1f}" for s in samples))
    print(f"median call {statistics.median(seconds) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
