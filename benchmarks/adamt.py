"""AdaMT-Net train-step time with ``grad_magnitude`` (eq. 5) relative to equal weights (``ew``).

Usage::

    python benchmarks/adamt.py [--arg dataset=cityscapes_mtan,tasks=sd] [--width 64] \
        [--height 128 --width_px 256] [--batch_size 8] [--steps 5] [--rounds 3]

Both train steps are compiled for the same model, batch and device, then timed
**interleaved in one process**: each round times ``--steps`` steps of ``ew`` and then of
``grad_magnitude`` (alternating which goes first), and the ratio is that of the per-strategy
medians over the rounds. On a machine shared with other jobs the load changes over minutes,
so interleaving keeps the two measurements under the same conditions. Random inputs of the
given resolution (no dataset needed). Prints a Markdown table row for ``docs/benchmarks.md``.

``grad_magnitude`` needs the gradient of each task loss w.r.t. its own decoder: the step
takes it from one forward pass, one VJP per decoder and one VJP through the encoder
(``mtl_jax.steps.decomposed_grads``), so the target is a ratio of at most 1.15.
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

sys.path.insert(0, os.path.dirname(__file__))
from step_time import _load_config, fake_batch  # noqa: E402

STRATEGIES = ("ew", "grad_magnitude")


def _compiled(config, name: str, batch):
    config = config.copy_and_resolve_references()
    config.weighting = {"name": name}
    exp = build_experiment(config)
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    t0 = time.perf_counter()
    state, m = exp.train_step(state, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    state, m = exp.train_step(state, b)  # warm up
    jax.block_until_ready(m)
    return {"exp": exp, "batch": b, "state": state, "first": first}


def _time(entry, steps: int) -> float:
    state = entry["state"]
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = entry["exp"].train_step(state, entry["batch"])
    jax.block_until_ready(m)
    entry["state"] = state
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arg", default="dataset=cityscapes_mtan,tasks=sd")
    p.add_argument("--width", type=int, default=64, help="first encoder width (paper 64)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width_px", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args()
    config = _load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "adamt.py"),
                          f"{args.arg},width={args.width}")
    config.input_size = (args.height, args.width_px)
    config.batch_size = args.batch_size
    config.num_devices = args.devices
    batch = fake_batch(config, args.batch_size, np.random.default_rng(0))
    entries = {name: _compiled(config, name, batch) for name in STRATEGIES}
    times = {name: [] for name in STRATEGIES}
    for r in range(args.rounds):
        order = STRATEGIES if r % 2 == 0 else STRATEGIES[::-1]
        for name in order:
            times[name].append(_time(entries[name], args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1000:.0f} ms/step"
                                             for n in STRATEGIES), flush=True)
    med = {n: statistics.median(times[n]) for n in STRATEGIES}
    dev = jax.devices()[0]
    n_dev = args.devices if args.devices > 0 else len(jax.devices())
    hw = (f"{os.cpu_count()} CPU cores ({platform.machine()}), {n_dev} device(s)"
          if dev.platform == "cpu" else f"{n_dev}x {dev.device_kind}")
    print()
    print("| model | input | ew ms/step | grad_magnitude ms/step | × ew | compile+1st step "
          "(ew / gm) | hardware |")
    print("|---|---|---|---|---|---|---|")
    print(f"| adamt.py:{args.arg},width={args.width} | {args.height}x{args.width_px}, batch "
          f"{args.batch_size} | {med['ew'] * 1000:.0f} | {med['grad_magnitude'] * 1000:.0f} | "
          f"{med['grad_magnitude'] / med['ew']:.2f} | {entries['ew']['first']:.0f} s / "
          f"{entries['grad_magnitude']['first']:.0f} s | {hw}; median of {args.rounds} "
          f"interleaved rounds × {args.steps} steps |")


if __name__ == "__main__":
    main()
