"""SegNet family train-step cost: the MTAN 3-task step at NYUv2 size, and every weighting
strategy on it.

Usage::

    python benchmarks/segnet.py [--arg model=mtan,dataset=nyuv2] [--steps 5] [--only ew,uw]
        [--no_weightings] [--compile_workers K] [--deadline SECONDS] [--lower_only]

Builds ``configs/segnet.py:ARG`` (default: MTAN, NYUv2 288×384, batch 2, full width -- 44.2M
parameters), feeds random inputs of that size (no dataset needed) and prints two Markdown
tables for ``docs/benchmarks.md``: compile + first step and steady-state ms/step of the model
(with ``ew``), then each strategy's step time relative to ``ew`` (gradient-based ones also
with ``rep_grad=True`` where the strategy supports it), timed as ``benchmarks/weighting.py``
does: 3 warm-up steps, then the median of 3 rounds of ``--steps`` steps.

Compiling MTAN's step takes ~40-80 s on a GPU host (XLA autotunes hundreds of kernels on the
device) and the full table has 46 variants (30 strategies, 16 of them also with
``rep_grad``), so one after another they do not fit a short GPU lease. With
``--compile_workers K`` (default: one per CPU core but one, at most 6):

1. K worker processes (processes, not threads: tracing holds the GIL and takes seconds per
   variant) build, lower and compile ahead of time (``jit(...).lower(...).compile()``) every
   variant but ``ew``, in the order of the table with the ``rep_grad`` ones last, sharing
   75 % of the device's memory (the autotuning allocates on it), and send the executables
   back (``jax.experimental.serialize_executable``). Before they start, this process
   compiles and times ``ew`` alone: the model row and the baseline.
2. When all are compiled, or when ``--deadline`` (seconds since start) leaves just the time
   to time those compiled, the workers are stopped and this process times each executable
   alone on the idle device, printing each row as soon as it is known.

Sizing K: each worker autotunes on the device, and the gradient-based variants' autotuning
needs GBs (their [tasks, ...] gradient tensors). On one H100 (80 GB), 15 workers ran it out
of memory for every gradient-based variant, and 21 workers also starved this process's own
compile (docs/benchmarks.md); hence the default of at most 6.

``--compile_workers 0`` compiles in this process, one variant after another, through the
jitted step (slow, but it also handles staged models such as ATI-Net, whose step is chosen
on the host). ``--lower_only`` builds and lowers every variant (no compilation): a quick
check that each strategy traces on the model.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

from mtl_jax.data import pipeline
from mtl_jax.errors import UserError
from mtl_jax.experiment import build_experiment, make_mesh
from mtl_jax.weighting import WEIGHTINGS

sys.path.insert(0, os.path.dirname(__file__))
from step_time import _load_config, fake_batch  # noqa: E402
from weighting import strategy_config, time_steps  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "segnet.py")
WORKERS_MEMORY = 0.75  # the fraction of the device's memory the compile workers share
T0 = time.perf_counter()
if "jax_use_simplified_jaxpr_constants" in jax.config.values:
    # Constants embedded in the program (this JAX's default): serialize_executable refuses
    # executables that take closed-over constants as arguments.
    jax.config.update("jax_use_simplified_jaxpr_constants", False)


def hardware(devices: int) -> str:
    dev = jax.devices()[0]
    n = len(jax.devices()) if devices < 0 else devices
    if dev.platform == "cpu":
        return f"{os.cpu_count()} CPU cores ({platform.machine()})"
    return f"{n}x {dev.device_kind}"


def variants(names: list[str]) -> list[tuple[str, bool]]:
    """(strategy, rep_grad) pairs: every name, then the gradient-based ones that support
    ``rep_grad`` again with it (the order the workers compile them in)."""
    reps = [n for n in names
            if WEIGHTINGS[n].requires == "task_grads" and WEIGHTINGS[n].supports_rep_grad]
    return [(n, False) for n in names] + [(n, True) for n in reps]


def label(name: str, rep_grad: bool) -> str:
    return name + (" rep_grad" if rep_grad else "")


def load(config_path: str, arg: str, devices: int):
    """(config, host batch of random inputs) for ``config_path:arg`` on ``devices``."""
    config = _load_config(config_path, arg)
    config.num_devices = devices
    return config, fake_batch(config, config.batch_size, np.random.default_rng(0))


def lower_variant(config, name: str, rep_grad: bool, batch) -> dict[str, Any]:
    """Builds strategy ``name``'s experiment and lowers its train step and state init.

    Returns ``{"step": Lowered, "init": Lowered, "init_args": tuple, "seconds": {build,
    lower}}``; the state is ``init.compile()(*init_args)``. Needs the plain jitted step and
    init of ``build_experiment`` (no staging, no ``init_from``)."""
    t0 = time.perf_counter()
    exp = build_experiment(strategy_config(config, name, rep_grad))
    t1 = time.perf_counter()
    init = exp.init_state
    if not hasattr(exp.train_step, "lower") or not (
            isinstance(init, functools.partial) and hasattr(init.func, "lower")):
        raise UserError(f"{exp.config.model.architecture}: the train step or state init is "
                        "not one jitted function (a staged model, or model.init_from / "
                        "encoder_init set); run with --compile_workers 0")
    spec = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=pipeline.batch_sharding(exp.mesh)), batch)
    step = exp.train_step.lower(exp.abstract_state, spec)
    init_lowered = init.func.lower(*init.args, **init.keywords)
    return {"step": step, "init": init_lowered, "init_args": init.args,
            "seconds": {"build": t1 - t0, "lower": time.perf_counter() - t1}}


def _to_host(x: Any) -> Any:
    """An init argument as picklable data (typed PRNG keys as their key data + impl)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("prng_key", np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x)))
    return ("array", np.asarray(x), None)


def _from_host(x: tuple) -> Any:
    kind, data, impl = x
    return jax.random.wrap_key_data(data, impl=impl) if kind == "prng_key" else data


# ---- worker processes -------------------------------------------------------------------

def _worker_init(mem_fraction: float, cache_dir: str) -> None:
    # Before this process's backend starts: its share of the device's memory (XLA autotunes
    # on the device while compiling; without a cap the workers' allocators ran it out of
    # memory), and the compilation cache.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.4f}"
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)


def _worker_job(config_path: str, arg: str, devices: int, name: str,
                rep_grad: bool) -> dict[str, Any]:
    """Lowers and compiles one variant; returns its serialized executables, or the error."""
    out: dict[str, Any] = {"name": name, "rep_grad": rep_grad, "pid": os.getpid()}
    try:
        config, batch = load(config_path, arg, devices)
        low = lower_variant(config, name, rep_grad, batch)
        t0 = time.perf_counter()
        step, init = low["step"].compile(), low["init"].compile()
        out["seconds"] = {**low["seconds"], "compile": time.perf_counter() - t0}
        out["step"] = serialize_executable.serialize(step)
        out["init"] = serialize_executable.serialize(init)
        out["init_args"] = [_to_host(a) for a in low["init_args"]]
    except Exception:  # noqa: BLE001 -- reported in the table, the others go on
        out["error"] = traceback.format_exc()
    return out


def _load_compiled(res: dict[str, Any]):
    """(train step, state-init thunk) from a worker's result."""
    step = serialize_executable.deserialize_and_load(*res["step"])
    init = serialize_executable.deserialize_and_load(*res["init"])
    args = [_from_host(a) for a in res["init_args"]]
    return step, lambda: init(*args)


# ---- this process -----------------------------------------------------------------------

def model_row(arg: str, config, first: float, per_step: float, steps: int, hw: str) -> str:
    h, w = config.input_size
    return (f"| segnet.py:{arg} | {h}x{w}, batch {config.batch_size} | {first:.1f} s | "
            f"{per_step * 1000:.1f} ms (3 × {steps} steps) | {hw} |")


def strategy_row(name: str, times: dict[bool, float | str], base: float) -> str:
    """A table row; ``times[rep_grad]`` is seconds per step or why there is none."""
    def cells(t: float | str | None) -> str:
        if t is None:
            return " – | – |"
        if isinstance(t, str):
            return f" {t} | – |"
        return f" {t * 1000:.1f} | {t / base:.2f} |"
    cls = WEIGHTINGS[name]
    return f"| `{name}` | {cls.requires} |" + cells(times.get(False)) + cells(times.get(True))


def run_sequential(args, config, batch, names: list[str], hw: str) -> None:
    """--compile_workers 0: each variant compiled through its jitted step, then timed."""
    exp = build_experiment(strategy_config(config, "ew", False), steps_per_epoch=100)
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    t0 = time.perf_counter()
    state, m = exp.train_step(state, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    base = time_steps(exp.train_step, state, b, args.steps)
    del exp, state
    print_model(args, config, first, base, hw)
    if args.no_weightings:
        return
    print_header(args, config, hw, base)
    for name in names:
        times: dict[bool, float | str] = {}
        for rep_grad in (False, True):
            if (name, rep_grad) not in variants([name]):
                continue
            if name == "ew" and not rep_grad:
                times[rep_grad] = base
                continue
            e = build_experiment(strategy_config(config, name, rep_grad))
            times[rep_grad] = time_steps(e.train_step, e.init_state(), b, args.steps)
        print(strategy_row(name, times, base), flush=True)


def print_model(args, config, first: float, per_step: float, hw: str) -> None:
    print("\n| config | input | compile + first step | ms/step | hardware |\n"
          "|---|---|---|---|---|")
    print(model_row(args.arg, config, first, per_step, args.steps, hw), flush=True)


def print_header(args, config, hw: str, base: float) -> None:
    h, w = config.input_size
    print(f"\nsegnet.py:{args.arg}, {h}x{w}, batch {config.batch_size}, {hw}; "
          f"ew = {base * 1000:.1f} ms/step\n")
    print("| strategy | requires | ms/step | × ew | rep_grad ms/step | rep_grad × ew |")
    print("|---|---|---|---|---|---|", flush=True)


def run_parallel(args, config, batch, names: list[str], hw: str) -> None:
    # ew first, alone: the model row (compile + first step) and the baseline.
    t0 = time.perf_counter()
    low = lower_variant(config, "ew", False, batch)
    t1 = time.perf_counter()
    step, init = low["step"].compile(), low["init"].compile()
    t2 = time.perf_counter()
    state = init(*low["init_args"])
    b = pipeline.to_global(batch, pipeline.batch_sharding(make_mesh(config)))
    t3 = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    first = (t2 - t0) + (time.perf_counter() - t3)
    print(f"# ew: build + lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, first step "
          f"{time.perf_counter() - t3:.2f} s", flush=True)
    t_ew = time.perf_counter()
    base = time_steps(step, state, b, args.steps)
    # What timing one variant costs here: ew's timing plus loading and a margin.
    per_variant = 2 * (time.perf_counter() - t_ew) + 2
    del state, step, init, low
    print_model(args, config, first, base, hw)
    todo = [v for v in variants(names) if v != ("ew", False)] if not args.no_weightings else []
    if not todo:
        return

    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir:
        cache_dir = tempfile.mkdtemp(prefix="segnet_bench_cache_")
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    workers = min(args.compile_workers, len(todo))
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_worker_init, initargs=(WORKERS_MEMORY / workers, cache_dir))
    pending = {v: pool.apply_async(_worker_job, (args.config, args.arg, args.devices) + v)
               for v in todo}
    print(f"# {len(todo)} variants to {workers} compile workers (cache {cache_dir})",
          flush=True)
    done: dict[tuple[str, bool], dict[str, Any]] = {}
    t_start = time.perf_counter()
    while len(done) < len(todo):
        for v, r in pending.items():
            if v not in done and r.ready():
                res = r.get()
                done[v] = res
                secs = res.get("seconds", {})
                print(f"# {time.perf_counter() - T0:6.1f} s  compiled {label(*v)}: " + (
                    "ERROR " + res["error"].strip().splitlines()[-1] if "error" in res else
                    ", ".join(f"{k} {s:.1f} s" for k, s in secs.items())), flush=True)
        left = args.deadline - (time.perf_counter() - T0) if args.deadline else float("inf")
        if len(done) < len(todo) and left < (len(done) + 1) * per_variant + 10:
            print(f"# deadline: {len(todo) - len(done)} variants not compiled, stopping the "
                  "workers", flush=True)
            break
        time.sleep(0.5)
    pool.terminate()
    pool.join()
    print(f"# compile phase {time.perf_counter() - t_start:.1f} s wall, "
          f"{len(done)}/{len(todo)} variants", flush=True)
    print_header(args, config, hw, base)
    for name in names:
        times: dict[bool, float | str] = {}
        for v in variants([name]):
            if v == ("ew", False):
                times[False] = base
                continue
            res = done.get(v)
            left = args.deadline - (time.perf_counter() - T0) if args.deadline else 1e9
            if res is None:
                times[v[1]] = "not compiled (deadline)"
            elif "error" in res:
                times[v[1]] = "failed"
                print(f"# {label(*v)} failed:\n{res['error']}", file=sys.stderr, flush=True)
            elif left < per_variant:
                times[v[1]] = "not timed (deadline)"
            else:
                try:
                    step, init_state = _load_compiled(res)
                    times[v[1]] = time_steps(step, init_state(), b, args.steps)
                except Exception:  # noqa: BLE001 -- seen on CPU: a deserialized executable
                    # missing a fused kernel; compile it here instead if there is time
                    print(f"# {label(*v)}: the worker's executable did not run:\n"
                          f"{traceback.format_exc()}", file=sys.stderr, flush=True)
                    if left < per_variant + 1.5 * (t2 - t0):
                        times[v[1]] = "failed"
                    else:  # not from the persistent cache: it holds the same executable
                        jax.config.update("jax_enable_compilation_cache", False)
                        try:
                            e = build_experiment(strategy_config(config, *v))
                            times[v[1]] = time_steps(e.train_step, e.init_state(), b,
                                                     args.steps)
                            print(f"# {label(*v)}: compiled and timed here instead",
                                  file=sys.stderr, flush=True)
                        except Exception:  # noqa: BLE001
                            times[v[1]] = "failed"
                            print(traceback.format_exc(), file=sys.stderr, flush=True)
                        e = None
                step = init_state = None
                res.clear()
        print(strategy_row(name, times, base), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--arg", default="model=mtan,dataset=nyuv2")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round (3 rounds)")
    p.add_argument("--devices", type=int, default=-1)
    p.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    p.add_argument("--no_weightings", action="store_true")
    p.add_argument("--compile_workers", type=int,
                   default=max(1, min(6, (os.cpu_count() or 2) - 1)),
                   help="worker processes compiling the variants (0: in this process, "
                        "one after another)")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds since start by which the table must be printed (0: none)")
    p.add_argument("--lower_only", action="store_true",
                   help="only build and lower every variant (a check that each traces)")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or sorted(WEIGHTINGS)
    unknown = sorted(set(names) - set(WEIGHTINGS))
    if unknown:
        raise UserError(f"--only: unknown strategies {unknown}; choose from {sorted(WEIGHTINGS)}")
    if "ew" not in names:
        names = ["ew"] + names  # the baseline row
    if args.compile_workers and not args.lower_only:
        # This process shares the device with the workers while they compile: it takes
        # what it needs (ew's step while they compile; each variant's once they are gone).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    config, batch = load(args.config, args.arg, args.devices)
    if args.lower_only:
        failed = 0
        for v in variants(names):
            try:
                secs = lower_variant(config, *v, batch)["seconds"]
                print(f"{label(*v)}: lowered (build {secs['build']:.1f} s, lower "
                      f"{secs['lower']:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001 -- every variant is checked
                failed += 1
                print(f"{label(*v)}: FAILED\n{traceback.format_exc()}", flush=True)
        sys.exit(1 if failed else 0)
    hw = hardware(args.devices)
    if args.compile_workers > 0:
        run_parallel(args, config, batch, names, hw)
    else:
        run_sequential(args, config, batch, names, hw)


if __name__ == "__main__":
    main()
