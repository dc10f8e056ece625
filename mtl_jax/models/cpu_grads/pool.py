"""The max-pool's CPU gradient: each window's first maximum found by element-wise passes
instead of XLA's select-and-scatter.

:func:`max_pool` (what ``layers.max_pool`` runs) has a custom VJP that picks
:func:`max_pool_grad_by_mask` on the CPU backend **when lowering** (``platform_dependent``),
XLA's select-and-scatter elsewhere. Switched off (kernel ``max_pool``): the plain
``reduce_window`` and its derivative (select-and-scatter on every backend). Measurements:
docs/benchmarks.md, "Train-step speed on CPU".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.models.cpu_grads.switch import enabled


def max_pool_nhwc(x_BxHxWxC: jax.Array, window: Sequence[int], strides: Sequence[int],
                  padding: Sequence[tuple[int, int]]) -> jax.Array:
    """The plain max-pool (``reduce_window`` of ``max`` with ``-inf`` padding), XLA's gradient."""
    return jax.lax.reduce_window(x_BxHxWxC, -jnp.inf, jax.lax.max, (1, *window, 1),
                                 (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def max_pool_grad_by_mask(x_BxHxWxC: jax.Array, g_BxOHxOWxC: jax.Array,
                          window: Sequence[int], strides: Sequence[int],
                          padding: Sequence[tuple[int, int]]) -> jax.Array:
    """The input gradient of a max-pool (``-inf`` padding) without select-and-scatter: each
    output's gradient goes to the first maximum of its window in row-major order (as XLA's
    ``select_and_scatter`` and PyTorch do; a NaN counts as the maximum).

    Two element-wise passes over the window offsets, which XLA fuses into a few loops. The
    first finds, per output, the offset of the first maximum (a running maximum that only a
    strictly larger value, or a first NaN, replaces). The second spreads each output's
    gradient to that offset's input with an interior-padded ``pad``. XLA's CPU backend instead
    expands select-and-scatter into a reduce-window carrying four int32 index arrays and a
    scatter.

    The window's maximum is found again here from ``x``, never compared with the forward
    pass's output: XLA may compute the pool's input twice, once in the forward fusion and once
    in the backward one, and the two can differ in the last bit (e.g. a BatchNorm + ReLU
    fused into both with different multiply-add contraction). An equality test against the
    saved output then found no maximum in some windows and lost their gradient
    (docs/benchmarks.md; ``tests/test_cpu_grad_paths.py`` has the case). Here every window
    sends its gradient to exactly one input.
    """
    kh, kw = window
    sh, sw = strides
    (plh, phh), (plw, phw) = padding
    b, h, w, c = x_BxHxWxC.shape
    ho = (h + plh + phh - kh) // sh + 1
    wo = (w + plw + phw - kw) // sw + 1
    x_pad = jnp.pad(x_BxHxWxC, ((0, 0), (plh, phh), (plw, phw), (0, 0)),
                    constant_values=-jnp.inf)
    hp, wp = x_pad.shape[1:3]
    span_h, span_w = (ho - 1) * sh + 1, (wo - 1) * sw + 1  # input rows/cols one offset reads
    offsets = [(a, d) for a in range(kh) for d in range(kw)]

    def window_slice(a: int, d: int) -> jax.Array:
        return jax.lax.slice(x_pad, (0, a, d, 0), (b, a + span_h, d + span_w, c),
                             (1, sh, sw, 1))

    best = window_slice(*offsets[0])
    first = jnp.zeros(best.shape, jnp.int32)
    for t, (a, d) in enumerate(offsets[1:], start=1):
        cand = window_slice(a, d)
        better = (cand > best) | (jnp.isnan(cand) & ~jnp.isnan(best))
        best = jnp.where(better, cand, best)
        first = jnp.where(better, jnp.int32(t), first)
    zero = jnp.zeros((), g_BxOHxOWxC.dtype)
    dx_pad = None
    for t, (a, d) in enumerate(offsets):
        spread = jax.lax.pad(jnp.where(first == t, g_BxOHxOWxC, zero), zero,
                             ((0, 0, 0), (a, hp - a - span_h, sh - 1),
                              (d, wp - d - span_w, sw - 1), (0, 0, 0)))
        dx_pad = spread if dx_pad is None else dx_pad + spread
    return dx_pad[:, plh:plh + h, plw:plw + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return max_pool_nhwc(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    return max_pool_nhwc(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, g):
    def xla_grad(x_, g_):
        return jax.vjp(lambda a: max_pool_nhwc(a, window, strides, padding), x_)[1](g_)[0]

    def cpu_grad(x_, g_):
        return max_pool_grad_by_mask(x_, g_, window, strides, padding)

    return (jax.lax.platform_dependent(x, g, cpu=cpu_grad, default=xla_grad),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x_BxHxWxC: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """:func:`max_pool_nhwc` (hashable tuples), its gradient by :func:`max_pool_grad_by_mask`
    on CPU where the kernel is on."""
    if not enabled("max_pool"):
        return max_pool_nhwc(x_BxHxWxC, window, strides, padding)
    return _max_pool(x_BxHxWxC, window, strides, padding)
