"""Where the SegNet family's CPU train step spends its time: the whole step of a plain SegNet
(``model=stl``) and of MTAN against single pieces at the first level's size.

Usage::

    python benchmarks/segnet_pieces.py [--size 288x384] [--width 64] [--batch 2] [--steps 2]
        [--models stl,mtan | --pieces_only]

Prints one Markdown table for ``docs/benchmarks.md`` ("SegNet family"): seconds per call
(median of ``--steps`` calls after one compiling call) of

* the forward pass (``predict_step``) and the train step of ``configs/segnet.py:model=stl``
  (one task: SegNet only) and ``model=mtan`` (three tasks, attention) at the given size;
* one 3×3 convolution ``width -> width`` at full resolution (the layer SegNet has four of at
  that resolution): forward alone, with the input gradient, with the kernel gradient, with
  both; the 2×2 max-pool with its window mask, and max-unpooling, forward + backward; each on
  a ``[batch, H, W, width]`` input.

The pieces' times times their counts bound what the whole step should cost; a step far above
that bound points at a slow compiled path rather than the arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment
from mtl_jax.models import pooling

sys.path.insert(0, os.path.dirname(__file__))
from step_time import _load_config, fake_batch  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "segnet.py")


def _config(arg: str, size: tuple[int, int], width: int, batch: int):
    config = _load_config(CONFIG, arg)
    config.input_size = size
    config.model.width = width
    config.batch_size = batch
    config.num_devices = 1
    return config


def _time(fn, *args, steps: int) -> float:
    """Median seconds of ``steps`` calls after one (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_rows(arg: str, size, width, batch, steps) -> list[tuple[str, float]]:
    config = _config(arg, size, width, batch)
    exp = build_experiment(config, steps_per_epoch=100)
    b = pipeline.to_global(fake_batch(config, batch, np.random.default_rng(0)),
                           pipeline.batch_sharding(exp.mesh))
    state = exp.init_state()
    fwd = _time(exp.predict_step, state, b["image"], steps=steps)
    holder = {"state": state}

    def step(batch_):
        holder["state"], m = exp.train_step(holder["state"], batch_)
        return m

    train = _time(step, b, steps=steps)
    return [(f"segnet.py:{arg} forward (predict_step)", fwd),
            (f"segnet.py:{arg} train step", train)]


def piece_rows(size, width, batch, steps) -> list[tuple[str, float]]:
    h, w = size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, h, w, width)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, width, width)) * 0.05, jnp.float32)

    def conv(x_, k_):
        return jax.lax.conv_general_dilated(x_, k_, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(x_, k_):
        return jnp.sum(conv(x_, k_) ** 2)

    conv_fwd = jax.jit(conv)
    conv_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    conv_dx = jax.jit(jax.grad(loss, argnums=0))
    conv_dk = jax.jit(jax.grad(loss, argnums=1))

    def pool_unpool(x_):
        pooled, mask = pooling.max_pool_with_mask(x_)
        return jnp.sum(pooling.max_unpool(pooled * 2.0, mask) ** 2)

    pool_grad = jax.jit(jax.grad(pool_unpool))
    pool_only = jax.jit(jax.grad(lambda x_: jnp.sum(pooling.max_pool_with_mask(x_)[0] ** 2)))
    name = f"one conv3x3 {width}->{width}"
    return [(f"{name}, forward", _time(conv_fwd, x, kernel, steps=steps)),
            (f"{name}, forward + input gradient", _time(conv_dx, x, kernel, steps=steps)),
            (f"{name}, forward + kernel gradient", _time(conv_dk, x, kernel, steps=steps)),
            (f"{name}, forward + backward", _time(conv_grad, x, kernel, steps=steps)),
            ("max-pool with mask, forward + backward", _time(pool_only, x, steps=steps)),
            ("max-pool + max-unpool, forward + backward", _time(pool_grad, x, steps=steps))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="288x384")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--models", default="stl,mtan", help="segnet.py models to time whole")
    p.add_argument("--pieces_only", action="store_true")
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    rows = piece_rows(size, args.width, args.batch, args.steps)
    if not args.pieces_only:
        for model in filter(None, args.models.split(",")):
            arg = f"model={model},dataset=nyuv2" + (",tasks=s" if model in ("stl", "stan") else "")
            rows += model_rows(arg, size, args.width, args.batch, args.steps)
    print(f"\n{args.size}, width {args.width}, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}\n")
    print("| what | s/call |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} |", flush=True)


if __name__ == "__main__":
    main()
