"""Step time of every weighting strategy relative to equal weighting (``ew``).

Usage::

    python benchmarks/weighting.py [--arg ""] [--steps 20] [--devices -1] [--only a,b]

Same model (the quickstart config), batch and devices for every strategy; random inputs of
the config's resolution. Each strategy's train step is compiled, warmed up, then timed over
``--steps`` steps (median of 3 repetitions); gradient-based strategies are also timed with
``rep_grad=True`` (those that support it). Prints a Markdown table for ``docs/benchmarks.md``.
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

EXTRA = {"fixed": {"weights": {"semseg": 1.0, "depth": 1.0, "normals": 1.0}},
         "dwa": {"steps_per_epoch": 100}, "stch": {"steps_per_epoch": 100}}


def strategy_config(config, name: str, rep_grad: bool):
    """A copy of ``config`` training with strategy ``name`` (its EXTRA arguments, and
    ``rep_grad=True`` if asked); the benchmarks' one definition of a strategy's variant."""
    config = config.copy_and_resolve_references()
    config.weighting = {"name": name, **EXTRA.get(name, {}), **({"rep_grad": True}
                                                                 if rep_grad else {})}
    return config


def time_strategy(config, name: str, rep_grad: bool, steps: int, batch) -> float:
    exp = build_experiment(strategy_config(config, name, rep_grad))
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    return time_steps(exp.train_step, exp.init_state(), b, steps)


def time_steps(train_step, state, batch, steps: int) -> float:
    """Seconds per step of ``train_step`` from ``state`` on ``batch``: 3 warm-up steps
    (compilation, if ``train_step`` is not compiled yet), then the median of 3 rounds of
    ``steps`` steps, each waited for with ``block_until_ready``."""
    for _ in range(3):  # compile + warm up
        state, m = train_step(state, batch)
    jax.block_until_ready(m)
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = train_step(state, batch)
        jax.block_until_ready(m)
        reps.append((time.perf_counter() - t0) / steps)
    return statistics.median(reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                    "quickstart.py"))
    p.add_argument("--arg", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", type=int, default=-1)
    p.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    args = p.parse_args()
    config = _load_config(args.config, args.arg)
    config.num_devices = args.devices
    batch = fake_batch(config, config.batch_size, np.random.default_rng(0))
    names = [n for n in args.only.split(",") if n] or sorted(WEIGHTINGS)
    base = time_strategy(config, "ew", False, args.steps, batch)
    dev = jax.devices()[0]
    n_dev = len(jax.devices()) if args.devices < 0 else args.devices
    hw = (f"{os.cpu_count()} CPU cores ({platform.machine()}), {n_dev} device(s)"
          if dev.platform == "cpu" else f"{n_dev}x {dev.device_kind}")
    h, w = config.input_size
    print(f"\n{os.path.basename(args.config)}{':' + args.arg if args.arg else ''}, "
          f"{h}x{w}, batch {config.batch_size}, {hw}; ew = {base * 1000:.0f} ms/step\n")
    print("| strategy | requires | ms/step | × ew | rep_grad ms/step | rep_grad × ew |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cls = WEIGHTINGS[name]
        t = base if name == "ew" else time_strategy(config, name, False, args.steps, batch)
        row = f"| `{name}` | {cls.requires} | {t * 1000:.0f} | {t / base:.2f} |"
        if cls.requires == "task_grads" and cls.supports_rep_grad:
            tr = time_strategy(config, name, True, args.steps, batch)
            row += f" {tr * 1000:.0f} | {tr / base:.2f} |"
        else:
            row += " – | – |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
