"""DenseMTL: step time and memory of the mTEB exchange block (xTAM attention, blocked vs naive).

Usage::

    python benchmarks/densemtl.py [--arg_base dataset=nyud_mt,tasks=sdn] [--batch_size 2] \
        [--input_size HxW] [--steps N] [--variants ARG [ARG ...]] [--timeout S]

Each variant is a ``configs/densemtl.py`` argument string appended to ``--arg_base`` (later
names win). Defaults: ``model=3ways`` (3-ways decoders, no exchange block), then
``model=ours`` (mTEB with six directional xTAMs at decoder stage 1 for S-D-N) with
``attention_impl=blocked`` and with ``attention_impl=naive``; NYUD-MT resolution 448x576,
batch 2, random inputs of that resolution (no dataset needed), one device.

Every variant runs in a fresh subprocess (this script re-invoked with ``--single VARIANT``), so
peak RSS, device memory statistics and compilation caches do not mix. In it the train step is
lowered and compiled ahead of time; "compile + first step" is that compilation plus the first
call, and ``--steps`` further steps are timed with ``block_until_ready`` (default 3 on CPU,
where ResNet-101 at 448x576 takes seconds per step, 20 on GPU/TPU). Reported memory:

* XLA temp / arguments / outputs: ``compiled.memory_analysis()`` of the train step (every
  backend): temporaries (activations kept for the backward pass, attention matrices, ...),
  the train state + batch passed in, and what it returns;
* peak device memory: ``jax.devices()[0].memory_stats()['peak_bytes_in_use']`` after the timed
  steps on GPU/TPU ("n/a" on CPU, which keeps no such statistics);
* peak RSS of the subprocess (``resource.getrusage``): a rough host-side figure, the only
  measured one on CPU (it includes the compiler's own memory).

``--conv_grad xla`` keeps XLA's own convolution gradients on CPU (``MTL_JAX_CPU_CONV_GRAD=xla``,
inherited by the subprocesses) to compare with the default kernel gradient by taps
(``mtl_jax/models/cpu_grads``); the hardware column says which ran.

Prints one Markdown table row per variant for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

DEFAULT_VARIANTS = (
    "model=3ways",
    "model=ours,attention_impl=blocked",
    "model=ours,attention_impl=naive",
)
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "densemtl.py")
RESULT_PREFIX = "DENSEMTL_BENCH_RESULT "
HEADER = ("| variant | input | compile + first step | s/step | XLA temp memory | "
          "XLA arguments / outputs | peak device memory | peak RSS | hardware |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _parse_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"input size must look like 448x576, got {text!r}")
    return int(h), int(w)


def run_single(args: argparse.Namespace) -> dict:
    """Build, compile and time one variant in this process; returns the measurements."""
    import jax
    import numpy as np

    from mtl_jax.data import pipeline
    from mtl_jax.experiment import build_experiment

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_time import _load_config, fake_batch

    arg = ",".join(a for a in (args.arg_base, args.single) if a)
    config = _load_config(args.config, arg)
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.input_size:
        config.input_size = tuple(args.input_size)
    config.num_devices = 1
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    steps = args.steps or (3 if on_cpu else 20)

    exp = build_experiment(config)
    batch = pipeline.to_global(fake_batch(config, config.batch_size, np.random.default_rng(0)),
                               pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    per_step = (time.perf_counter() - t0) / steps

    peak_device = None
    if not on_cpu:
        stats = dev.memory_stats() or {}
        peak_device = stats.get("peak_bytes_in_use")
    hw = (f"{os.cpu_count()} CPU cores, {platform.machine()}, conv grad "
          f"{os.environ.get('MTL_JAX_CPU_CONV_GRAD', 'taps')}" if on_cpu
          else f"1x {dev.device_kind}")
    h, w = config.input_size
    return dict(
        variant=args.single,
        input=f"{h}x{w}, batch {config.batch_size}",
        compile_s=compile_s,
        first_step_s=first_step_s,
        steps=steps,
        s_per_step=per_step,
        temp_bytes=getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
        argument_bytes=getattr(mem, "argument_size_in_bytes", None) if mem is not None else None,
        output_bytes=getattr(mem, "output_size_in_bytes", None) if mem is not None else None,
        peak_device_bytes=peak_device,
        peak_rss_bytes=_peak_rss_bytes(),
        hardware=hw,
    )


def format_row(r: dict) -> str:
    first = r["compile_s"] + r["first_step_s"]
    sec = r["s_per_step"]
    step = f"{sec:.2f} s" if sec >= 1 else f"{sec * 1000:.0f} ms"
    return (f"| {r['variant']} | {r['input']} | {first:.1f} s (compile {r['compile_s']:.1f} s) "
            f"| {step} ({r['steps']} steps) | {_bytes(r['temp_bytes'])} | "
            f"{_bytes(r['argument_bytes'])} / {_bytes(r['output_bytes'])} | "
            f"{_bytes(r['peak_device_bytes'])} | {_bytes(r['peak_rss_bytes'])} | "
            f"{r['hardware']} |")


def run_all(args: argparse.Namespace) -> None:
    """Re-invoke this script once per variant (fresh process each) and print the table."""
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--single", variant,
               "--config", args.config, "--arg_base", args.arg_base]
        for flag, value in (("--batch_size", args.batch_size), ("--steps", args.steps)):
            if value:
                cmd += [flag, str(value)]
        if args.input_size:
            cmd += ["--input_size", "x".join(str(x) for x in args.input_size)]
        print(f"[densemtl bench] {variant} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = e.stdout or "", f"timeout after {args.timeout} s"
            if isinstance(out, bytes):
                out = out.decode(errors="replace")
        result = next((json.loads(line[len(RESULT_PREFIX):]) for line in out.splitlines()
                       if line.startswith(RESULT_PREFIX)), None)
        if result is None:
            row = f"| {variant} | failed ({rc}) | | | | | | | |"
        else:
            row = format_row(result)
        print(f"[densemtl bench] {variant} done in {time.perf_counter() - t0:.0f} s:\n{row}",
              file=sys.stderr, flush=True)
        rows.append(row)
    print(HEADER)
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--arg_base", default="dataset=nyud_mt,tasks=sdn",
                   help="config arguments shared by every variant")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="config argument strings, one per variant (appended to --arg_base)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's (2)")
    p.add_argument("--input_size", type=_parse_size, default=None,
                   help="HxW override of the config's input size, e.g. 224x288")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps after the first (default: 3 on CPU, 20 on GPU/TPU)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant")
    p.add_argument("--conv_grad", choices=("taps", "xla"), default=None,
                   help="CPU convolution kernel gradient (default: the library's, taps)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.conv_grad:
        os.environ["MTL_JAX_CPU_CONV_GRAD"] = args.conv_grad  # the subprocesses inherit it
    if args.single is not None:
        result = run_single(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        print(format_row(result), flush=True)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
