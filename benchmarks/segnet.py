"""SegNet family train-step cost: the MTAN 3-task step at NYUv2 size, and every weighting
strategy on it.

Usage::

    python benchmarks/segnet.py [--arg model=mtan,dataset=nyuv2] [--steps 3] [--only ew,uw]
        [--no_weightings]

Builds ``configs/segnet.py:ARG`` (default: MTAN, NYUv2 288×384, batch 2, full width -- 44.2M
parameters), feeds random inputs of that size (no dataset needed) and prints two Markdown
tables for ``docs/benchmarks.md``: compile + first step and steady-state s/step of the model,
then each strategy's step time relative to ``ew`` (gradient-based ones also with
``rep_grad=True``), as ``benchmarks/weighting.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment
from mtl_jax.weighting import WEIGHTINGS

sys.path.insert(0, os.path.dirname(__file__))
from step_time import _load_config, fake_batch  # noqa: E402
from weighting import time_strategy  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "segnet.py")


def hardware(devices: int) -> str:
    dev = jax.devices()[0]
    n = len(jax.devices()) if devices < 0 else devices
    if dev.platform == "cpu":
        return f"{os.cpu_count()} CPU cores ({platform.machine()})"
    return f"{n}x {dev.device_kind}"


def model_step(config, steps: int, batch) -> tuple[float, float]:
    """(compile + first step seconds, median steady-state seconds per step)."""
    exp = build_experiment(config, steps_per_epoch=100)
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    t0 = time.perf_counter()
    state, m = exp.train_step(state, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = exp.train_step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arg", default="model=mtan,dataset=nyuv2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--devices", type=int, default=-1)
    p.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    p.add_argument("--no_weightings", action="store_true")
    args = p.parse_args()
    config = _load_config(CONFIG, args.arg)
    config.num_devices = args.devices
    batch = fake_batch(config, config.batch_size, np.random.default_rng(0))
    h, w = config.input_size
    hw = hardware(args.devices)
    first, per_step = model_step(config, args.steps, batch)
    print("\n| config | input | compile + first step | s/step | hardware |\n|---|---|---|---|---|")
    print(f"| segnet.py:{args.arg} | {h}x{w}, batch {config.batch_size} | {first:.1f} s | "
          f"{per_step:.2f} s ({args.steps} steps) | {hw} |", flush=True)
    if args.no_weightings:
        return
    names = [n for n in args.only.split(",") if n] or sorted(WEIGHTINGS)
    base = time_strategy(config, "ew", False, args.steps, batch)
    print(f"\nsegnet.py:{args.arg}, {h}x{w}, batch {config.batch_size}, {hw}; "
          f"ew = {base:.2f} s/step\n")
    print("| strategy | requires | s/step | × ew | rep_grad s/step | rep_grad × ew |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cls = WEIGHTINGS[name]
        t = base if name == "ew" else time_strategy(config, name, False, args.steps, batch)
        row = f"| `{name}` | {cls.requires} | {t:.2f} | {t / base:.2f} |"
        if cls.requires == "task_grads":
            tr = time_strategy(config, name, True, args.steps, batch)
            row += f" {tr:.2f} | {tr / base:.2f} |"
        else:
            row += " – | – |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
