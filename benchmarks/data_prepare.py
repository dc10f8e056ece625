"""Time the preparation of the default synthetic dataset splits (2,000 train / 500 val).

Usage::

    python benchmarks/data_prepare.py [--domain source] [--num_train 2000] [--num_val 500]

Builds into a fresh temporary data dir (so nothing is reused), prints the wall time, the
rendering throughput and the size on disk, as a Markdown table row for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import tensorflow_datasets as tfds

from mtl_jax.data import registry


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--domain", default="source")
    p.add_argument("--num_train", type=int, default=2000)
    p.add_argument("--num_val", type=int, default=500)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args()
    tfds.disable_progress_bar()
    tmp = tempfile.mkdtemp(prefix="mtl_jax_bench_")
    try:
        t0 = time.perf_counter()
        registry.build("synthetic", data_dir=tmp, domain=args.domain, num_train=args.num_train,
                       num_val=args.num_val, height=args.height, width=args.width)
        dt = time.perf_counter() - t0
        n = args.num_train + args.num_val
        size = _dir_size(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    line = (f"| synthetic/{args.domain} {args.height}x{args.width}, {args.num_train}/{args.num_val}"
            f" | {dt:.1f} s | {n / dt:.0f} examples/s | {size / 2**20:.0f} MiB | "
            f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()} |")
    print(line)


if __name__ == "__main__":
    main()
