"""Which compiled operations a config's train step spends its time in (jax.profiler trace).

Usage::

    python benchmarks/profile_step.py [--config configs/quickstart.py] [--arg ""]
        [--steps 3] [--top 25] [--trace_dir /tmp/mtl_jax_profile] [--conv_grad taps|xla]

Compiles the config's train step on random inputs of its resolution (as
``benchmarks/step_time.py``), runs two warm-up steps, then traces ``--steps`` steps with
``jax.profiler.trace(..., create_perfetto_trace=True)`` and reads the Perfetto JSON it writes:
every executed XLA operation (a "thunk" on CPU: a fusion, a library call such as a YNNPACK
convolution or matrix product, a copy) is one event. Prints two Markdown tables for
``docs/benchmarks.md``: time per step by operation kind (the HLO name without its number:
``ynn_fusion``, ``copy_bitcast_fusion``, ``transpose_copy_fusion``, ...) and the single most
expensive operations. On CPU, XLA runs independent operations concurrently on its thread
pool, so the per-kind sums can exceed the step's wall time. The trace directory can also be
opened in Perfetto (ui.perfetto.dev) or TensorBoard's profile plugin.

To see what an operation is, dump the optimised HLO: ``XLA_FLAGS=--xla_dump_to=DIR``, then
grep ``DIR/*after_optimizations.txt`` for its name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax
import numpy as np

from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment

sys.path.insert(0, os.path.dirname(__file__))
from step_time import _load_config, add_conv_grad_flag, fake_batch, use_conv_grad  # noqa: E402

# Host-side events of the runtime and of Python, not compiled operations.
NOT_OPS = ("ThunkExecutor", "$", "Slinky", "PjitFunction", "end: ", "Common", "Parse",
           "PjRt", "TfrtCpu", "Execute")


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and call counts per event name in the newest Perfetto trace."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: did jax.profiler write one?")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not str(e.get("name", "")).startswith(NOT_OPS):
            total[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                    "quickstart.py"))
    p.add_argument("--arg", default="")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--input_size", default=None, help="HxW override, e.g. 224x288")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace_dir", default="/tmp/mtl_jax_profile")
    add_conv_grad_flag(p)
    args = p.parse_args()
    use_conv_grad(args)
    config = _load_config(args.config, args.arg)
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.input_size:
        config.input_size = tuple(int(v) for v in args.input_size.split("x"))
    config.num_devices = 1
    exp = build_experiment(config)
    batch = pipeline.to_global(fake_batch(config, config.batch_size, np.random.default_rng(0)),
                               pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    for _ in range(3):  # compile + warm up
        state, m = exp.train_step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = exp.train_step(state, batch)
        jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / args.steps
    total, count = op_times(args.trace_dir)
    by_kind: collections.Counter = collections.Counter()
    kind_count: collections.Counter = collections.Counter()
    for name, us in total.items():
        kind = re.sub(r"\.\d+$", "", name)
        by_kind[kind] += us
        kind_count[kind] += count[name]
    n = args.steps
    name = os.path.basename(args.config) + (f":{args.arg}" if args.arg else "")
    h, w = config.input_size
    print(f"\n{name}, {h}x{w}, batch {config.batch_size}, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores; traced step {wall * 1000:.0f} ms (profiler on); "
          f"operations sum to {sum(by_kind.values()) / n / 1000:.0f} ms per step\n")
    print("| operation kind | ms/step | calls/step |\n|---|---|---|")
    for kind, us in by_kind.most_common(args.top):
        print(f"| `{kind}` | {us / n / 1000:.1f} | {kind_count[kind] // n} |")
    print("\n| operation | ms/step |\n|---|---|")
    for op, us in total.most_common(args.top):
        print(f"| `{op}` | {us / n / 1000:.1f} |")


if __name__ == "__main__":
    main()
