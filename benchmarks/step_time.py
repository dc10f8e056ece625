"""Compile time and steps/s of a config's train step (default: the quickstart model).

Usage::

    python benchmarks/step_time.py [--config configs/quickstart.py] [--arg ""] \
        [--steps 50] [--batch_size 16] [--devices 1]

Random inputs of the config's resolution (no dataset needed). Measures the first call
(compilation + one step) and the mean time of the following ``--steps`` steps, waiting for
the device with ``block_until_ready``. It prints one Markdown table row for
``docs/benchmarks.md``. ``--conv_grad xla`` keeps XLA's own convolution gradients on CPU
(``MTL_JAX_CPU_CONV_GRAD=xla``) instead of the kernel gradient by taps
(``mtl_jax/models/cpu_grads``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from mtl_jax.config_utils import load_config
from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment


def _load_config(path: str, arg: str):
    return load_config(path, arg)


def add_conv_grad_flag(parser) -> None:
    """``--conv_grad taps|xla``: the CPU convolution kernel gradient (mtl_jax/models/cpu_grads)."""
    parser.add_argument("--conv_grad", choices=("taps", "xla"), default=None,
                        help="CPU convolution kernel gradient (default: the library's, taps)")


def use_conv_grad(args) -> None:
    """Apply ``--conv_grad`` (read when a step is traced; subprocesses inherit it)."""
    if args.conv_grad:
        os.environ["MTL_JAX_CPU_CONV_GRAD"] = args.conv_grad


def fake_batch(config, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, w = config.input_size
    n_cls = config.tasks.get("semseg", {}).get("num_classes", 10)
    normals = rng.normal(size=(batch_size, h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {
        "image": rng.uniform(size=(batch_size, h, w, 3)).astype(np.float32),
        "semseg": rng.integers(0, n_cls, (batch_size, h, w)).astype(np.int32),
        "depth": rng.uniform(0.5, 8, (batch_size, h, w, 1)).astype(np.float32),
        "normals": normals,
        "edges": rng.integers(0, 2, (batch_size, h, w)).astype(np.int32),
        "example_mask": np.ones((batch_size,), np.float32),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                    "quickstart.py"))
    p.add_argument("--arg", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--devices", type=int, default=-1)
    add_conv_grad_flag(p)
    args = p.parse_args()
    use_conv_grad(args)
    config = _load_config(args.config, args.arg)
    if args.batch_size:
        config.batch_size = args.batch_size
    config.num_devices = args.devices
    exp = build_experiment(config)
    batch = pipeline.to_global(fake_batch(config, config.batch_size, np.random.default_rng(0)),
                               pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    t0 = time.perf_counter()
    state, m = exp.train_step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = exp.train_step(state, batch)
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - t0) / args.steps
    dev = jax.devices()[0]
    hw = (f"{os.cpu_count()} CPU cores, {platform.machine()}, conv grad "
          f"{os.environ.get('MTL_JAX_CPU_CONV_GRAD', 'taps')}" if dev.platform == "cpu"
          else f"{exp.mesh.size}x {dev.device_kind}")
    name = os.path.basename(args.config) + (f":{args.arg}" if args.arg else "")
    h, w = config.input_size
    line = (f"| {name} | {h}x{w}, batch {config.batch_size} | {first:.1f} s | "
            f"{1 / per_step:.2f} steps/s ({per_step * 1000:.0f} ms/step) | "
            f"{config.batch_size / per_step:.0f} images/s | {hw} |")
    print(line)


if __name__ == "__main__":
    main()
