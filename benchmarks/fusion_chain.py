"""Minimal reproduction: XLA's CPU fusion re-derives a residual stream in every block.

Usage::

    python benchmarks/fusion_chain.py [--blocks 4,8,16,32] [--channels 256] [--size 14x18]

A chain of ``N`` residual blocks ``x ← relu(norm(conv1×1(x)) + x)`` (batch 2, float32), its
gradient compiled with ``jax.jit(jax.grad(...))``, written two ways:

- ``relu(y + x)``: ``max(y + x, 0)`` ends every block. XLA's CPU instruction fusion treats
  the ``max`` as "effectively unary" (one full-size operand) and so free to duplicate into
  every consumer; the block's output is materialised for the next convolution, but the next
  block's fusion re-derives it (and the one before it, ...) instead of reading it. The largest
  fusion's operand count grows by 3 per block and the step time with the square of ``N``.
- ``layers.add_relu(y, x)``: ``max(y, -x) + x``, equal bit for bit, its last operation reads two
  full-size arrays, which XLA does not duplicate past a consumer it cannot fuse into (the
  convolution): constant fusion size, linear time.

Prints a Markdown table (largest fused computation's operand count, median step time) for
``docs/benchmarks.md``. ResNet-101's layer3 (23 blocks) is where this cost the most.
"""

from __future__ import annotations

import argparse
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models import layers


def chain_grad(n_blocks: int, channels: int, size: tuple[int, int], residual):
    def net(ks, x):
        for k in ks:
            y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            m = jnp.mean(y, (0, 1, 2))
            y = (y - m) * jax.lax.rsqrt(jnp.mean(jnp.square(y - m), (0, 1, 2)) + 1e-5)
            x = residual(y, x)
        return jnp.mean(x ** 2)

    rng = np.random.default_rng(0)
    ks = [jnp.asarray(rng.normal(size=(1, 1, channels, channels)) / np.sqrt(channels),
                      jnp.float32) for _ in range(n_blocks)]
    x = jnp.asarray(rng.normal(size=(2, *size, channels)), jnp.float32)
    return jax.jit(jax.grad(net)), ks, x


def largest_fusion(compiled_text: str) -> int:
    bodies = re.findall(r"\n%?fused_computation[\w.]* \(.*?\n\}", compiled_text, re.S)
    return max(len(re.findall(r"parameter\(", body)) for body in bodies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="4,8,16,32")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", default="14x18")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    print(f"\n{args.channels} channels, 2x{size[0]}x{size[1]}, {jax.devices()[0].platform}, "
          f"jax {jax.__version__}\n")
    print("| blocks | block output | largest fusion (operands) | step ms |\n|---|---|---|---|")
    for n in (int(v) for v in args.blocks.split(",")):
        for name, residual in (("`relu(y + x)`", lambda y, x: nn.relu(y + x)),
                               ("`layers.add_relu(y, x)`", layers.add_relu)):
            f, ks, x = chain_grad(n, args.channels, size, residual)
            operands = largest_fusion(f.lower(ks, x).compile().as_text())
            jax.block_until_ready(f(ks, x))
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(ks, x))
                times.append(time.perf_counter() - t0)
            print(f"| {n} | {name} | {operands} | {1000 * float(np.median(times)):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
