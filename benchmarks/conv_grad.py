"""Where a ResNet encoder's forward + backward spends its time, one convolution shape at a time,
and what the kernel gradient by taps (``mtl_jax.models.cpu_grads.kernel_grad_by_taps``) changes.

Usage::

    python benchmarks/conv_grad.py [--depth 101] [--size 224x288] [--batch 2]
        [--dilate 0,0,1] [--steps 3] [--top 12] [--no_shapes]

Traces ``build_encoder("resnet{depth}")`` once, records the arguments of every convolution it
runs (Flax's ``nn.intercept_methods``), groups identical convolutions and times one of each
alone (median of ``--steps`` calls after a compiling one): the forward pass, the forward with
XLA's input gradient, with XLA's kernel gradient, and with the kernel gradient by taps. The
count-weighted sums are then put next to the whole encoder's forward and forward + backward
(``jax.value_and_grad`` over parameters, ``train=True`` BatchNorm), with our convolutions and
with XLA's own gradients (``cpu_grads.xla_conv_gradients()``). Prints Markdown tables for
``docs/benchmarks.md``.

A kernel-gradient column far above the forward one is XLA's kernel-gradient convolution on the
CPU backend, which runs it as a convolution whose window is the whole output map; a
whole-encoder time far above the sum of its convolutions points at something else (BatchNorm,
layout copies, fusion). This is also the minimal reproduction of that XLA behaviour
(docs/benchmarks.md, "Train-step speed on CPU").
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models import cpu_grads
from mtl_jax.models.encoders import build_encoder

sys.path.insert(0, os.path.dirname(__file__))
from segnet_pieces import _time as timed  # noqa: E402  median of `steps` calls after one


def conv_signatures(model: nn.Module, variables, image) -> collections.Counter:
    """``Counter`` of (input shape, kernel shape, strides, padding, dilation) over the convs
    one forward pass runs."""
    seen: collections.Counter = collections.Counter()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            kshape = (*module.kernel_size, x.shape[-1], module.features)
            seen[(tuple(x.shape), kshape, tuple(module.strides), tuple(map(tuple, module.padding)),
                  tuple(module.kernel_dilation))] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]),
                       variables, image)
    return seen


def conv_times(sig, steps: int) -> dict[str, float]:
    xshape, kshape, strides, padding, dilation = sig
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=xshape), jnp.float32)
    k = jnp.asarray(rng.normal(size=kshape) * 0.05, jnp.float32)

    def conv(x_, k_):
        return jax.lax.conv_general_dilated(x_, k_, strides, padding, rhs_dilation=dilation,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(x_, k_):
        return jnp.sum(conv(x_, k_) ** 2)

    def taps(x_, k_):
        y, pullback = jax.vjp(lambda a: conv(a, k_), x_)
        g = 2.0 * y
        return pullback(g)[0], cpu_grads.kernel_grad_by_taps(x_, g, kshape, strides, padding,
                                                          dilation)

    return {
        "fwd": timed(jax.jit(conv), x, k, steps=steps),
        "dx": timed(jax.jit(jax.grad(loss, argnums=0)), x, k, steps=steps),
        "dk": timed(jax.jit(jax.grad(loss, argnums=1)), x, k, steps=steps),
        "both": timed(jax.jit(jax.grad(loss, argnums=(0, 1))), x, k, steps=steps),
        "taps": timed(jax.jit(taps), x, k, steps=steps),
    }


def encoder_times(model: nn.Module, variables, image, steps: int) -> tuple[float, float]:
    params, stats = variables["params"], variables["batch_stats"]

    def forward(p, im):
        feats, _ = model.apply({"params": p, "batch_stats": stats}, im, train=True,
                               mutable=["batch_stats"])
        return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in feats)

    fwd = timed(jax.jit(forward), params, image, steps=steps)
    fwd_bwd = timed(jax.jit(jax.value_and_grad(forward)), params, image, steps=steps)
    with cpu_grads.xla_conv_gradients():
        fwd_bwd_xla = timed(jax.jit(jax.value_and_grad(forward)), params, image, steps=steps)
    return fwd, fwd_bwd, fwd_bwd_xla


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--size", default="224x288")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dilate", default="0,0,1", help="replace_stride_with_dilation, layer2..4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="rows of the per-shape table")
    p.add_argument("--no_shapes", action="store_true", help="whole encoder only")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    dilate = tuple(bool(int(v)) for v in args.dilate.split(","))
    model = build_encoder(f"resnet{args.depth}", replace_stride_with_dilation=dilate)
    image = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, h, w, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), image, train=False)
    print(f"\nResNet-{args.depth}, {h}x{w}, batch {args.batch}, dilation {dilate}, "
          f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}, jax {jax.__version__}\n")
    fwd, fwd_bwd, fwd_bwd_xla = encoder_times(model, variables, image, args.steps)
    print("| what | s |\n|---|---|")
    print(f"| whole encoder, forward (train-mode BN) | {fwd:.3f} |")
    print(f"| whole encoder, forward + backward (XLA's conv gradients) | {fwd_bwd_xla:.3f} |")
    print(f"| whole encoder, forward + backward (ours: kernel gradient by taps) | "
          f"{fwd_bwd:.3f} |", flush=True)
    if args.no_shapes:
        return
    sigs = conv_signatures(model, variables, image)
    rows = [(sig, count, conv_times(sig, args.steps)) for sig, count in sigs.items()]
    total = {key: sum(c * t[key] for _, c, t in rows)
             for key in ("fwd", "dx", "dk", "both", "taps")}
    print(f"| {sum(sigs.values())} convs alone, forward (sum) | {total['fwd']:.3f} |")
    print(f"| convs, forward + input gradient (sum) | {total['dx']:.3f} |")
    print(f"| convs, forward + XLA's kernel gradient (sum) | {total['dk']:.3f} |")
    print(f"| convs, forward + both XLA gradients (sum) | {total['both']:.3f} |")
    print(f"| convs, forward + input gradient + kernel gradient by taps (sum) | "
          f"{total['taps']:.3f} |")
    rows.sort(key=lambda r: -r[1] * r[2]["both"])
    print("\n| input | kernel | stride | dilation | count | fwd s | +dx s | +dk s | +both s "
          "| +dx +taps s | count × both s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for (xs, ks, st, _, dil), count, t in rows[:args.top]:
        print(f"| {'x'.join(map(str, xs))} | {'x'.join(map(str, ks))} | {st[0]} | {dil[0]} | "
              f"{count} | {t['fwd']:.4f} | {t['dx']:.4f} | {t['dk']:.4f} | {t['both']:.4f} | "
              f"{t['taps']:.4f} | {count * t['both']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
