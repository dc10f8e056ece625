"""What each CPU gradient kernel (``mtl_jax/models/cpu_grads``) costs in compile time and
saves in step time, over a config's own number of training steps.

Usage::

    python benchmarks/kernel_cost.py [--config configs/quickstart.py] [--arg ""] \
        [--steps 20] [--rounds 1]

For every variant -- all kernels on, then each kernel switched off alone
(``MTL_JAX_CPU_KERNELS=<kernel>``) -- a fresh process (no persistent compilation cache)
builds the config's experiment, times the train step's compilation (``lower`` + ``compile``)
and the median of ``--steps`` steps on random inputs of the config's resolution. Variants
alternate within each of ``--rounds`` rounds, so a slow phase of the machine hits all of
them. A kernel **pays** when the step time it saves, times the config's
``num_train_steps``, exceeds the compile time it adds. Prints one Markdown table for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("on", "conv", "max_pool", "add_relu", "batch_norm")


def measure(config_path: str, arg: str, steps: int) -> dict:
    """One process: compile seconds and median step seconds of the config's train step."""
    import jax
    import numpy as np

    from mtl_jax.config_utils import load_config
    from mtl_jax.data import pipeline
    from mtl_jax.experiment import build_experiment

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_time import fake_batch

    config = load_config(config_path, arg)
    config.num_devices = 1
    exp = build_experiment(config)
    batch = pipeline.to_global(fake_batch(config, config.batch_size, np.random.default_rng(0)),
                               pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "step_s": statistics.median(times),
            "num_train_steps": int(config.num_train_steps)}


def _run(variant: str, args) -> dict:
    env = dict(os.environ, MTL_JAX_CPU_KERNELS=variant, JAX_COMPILATION_CACHE_DIR="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--arg",
           args.arg, "--steps", str(args.steps), "--child"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                    "quickstart.py"))
    p.add_argument("--arg", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.arg, args.steps)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            results[variant].append(_run(variant, args))

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    n_steps = results["on"][0]["num_train_steps"]
    name = os.path.basename(args.config) + (f":{args.arg}" if args.arg else "")
    print(f"\n{name}: {n_steps} training steps; median of {args.rounds} round(s), "
          f"{args.steps} steps each; {os.cpu_count()} CPU cores\n")
    print("| kernel switched off | compile s | ms/step | compile the kernel adds (s) "
          "| time it saves over the run (s) | pays? |")
    print("|---|---|---|---|---|---|")
    on_c, on_s = med("on", "compile_s"), med("on", "step_s")
    print(f"| none (all on) | {on_c:.1f} | {on_s * 1000:.0f} | – | – | – |")
    for variant in VARIANTS[1:]:
        c, s = med(variant, "compile_s"), med(variant, "step_s")
        added, saved = on_c - c, (s - on_s) * n_steps
        print(f"| {variant} | {c:.1f} | {s * 1000:.0f} | {added:+.1f} | {saved:+.1f} | "
              f"{'yes' if saved > added else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
