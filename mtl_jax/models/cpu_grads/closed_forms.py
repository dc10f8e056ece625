"""Two rewrites that run on **every** backend (not chosen per backend): ``add_relu`` (a
residual block's ``relu(a + b)`` in a form XLA's CPU fusion does not duplicate) and
BatchNorm's training backward in closed form. Same values as the plain form (``add_relu`` bit
for bit, BatchNorm to float rounding); on GPU and TPU the programs differ, the results do not.
Switched off (kernels ``add_relu``, ``batch_norm``): ``relu(a + b)`` and JAX's derivative of
the BatchNorm forward. Measurements: docs/benchmarks.md, "Train-step speed on CPU".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.cpu_grads.switch import enabled


def add_relu(a: jax.Array, b: jax.Array) -> jax.Array:
    """``relu(a + b)`` for two arrays of one shape and dtype, by :func:`_add_relu` where the
    kernel ``add_relu`` is on, else ``jax.nn.relu(a + b)``."""
    if not enabled("add_relu"):
        return jax.nn.relu(a + b)
    return _add_relu(a, b)


@jax.custom_vjp
def _add_relu(a: jax.Array, b: jax.Array) -> jax.Array:
    """``relu(a + b)``, bit for bit, with relu's gradient (0 at 0).

    Written as ``max(a, -b) + b``: equal to ``max(a + b, 0)`` in floating point (``a > -b``
    gives the same rounded sum; otherwise ``-b + b`` is exactly +0; NaN propagates), but the
    last operation now reads two full-size arrays. That matters to XLA's CPU fusion, which
    duplicates "effectively unary" element-wise producers into every consumer: with
    ``max(a + b, 0)`` last, each block's output fusion re-derived the whole residual stream
    back to the stage's first block, forward and backward, so the element-wise cost grew with
    the square of the depth (``benchmarks/fusion_chain.py``). With a binary last op the output
    is materialised once, where the next convolution needs it anyway.

    The backward pass masks by the *output* (``out > 0`` exactly when ``a + b > 0``), so the
    saved residual is the output, the array the next layer keeps alive anyway.
    """
    return jnp.maximum(a, -b) + b


def _add_relu_fwd(a, b):
    out = jnp.maximum(a, -b) + b
    return out, out


def _add_relu_bwd(out, g):
    g = jnp.where(out > 0, g, jnp.zeros_like(g))
    return g, g


_add_relu.defvjp(_add_relu_fwd, _add_relu_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     fast_variance: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all axes but the last (float32 in and out): returns
    ``(y, mean, var)``, ``y = (x - mean) · rsqrt(var + ε) · scale + bias`` with the batch mean
    and the biased batch variance (two-pass, or one-pass with ``fast_variance``).

    Its gradient is the closed form of :func:`_batch_norm_closed_form` where the kernel
    ``batch_norm`` is on, else JAX's derivative of :func:`batch_norm_forward`.
    """
    if not enabled("batch_norm"):
        return batch_norm_forward(x, scale, bias, epsilon, fast_variance)
    return _batch_norm_closed_form(x, scale, bias, epsilon, fast_variance)


def batch_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                       fast_variance: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward formula of :func:`batch_norm_train`, differentiated by JAX."""
    return _batch_norm_fwd(x, scale, bias, epsilon, fast_variance)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_closed_form(x, scale, bias, epsilon, fast_variance):
    """:func:`batch_norm_forward` whose gradient is the closed form (as cuDNN's and PyTorch's
    BatchNorm backward), with ``x̂ = (x - mean) · rsqrt(var + ε)`` and ``n`` values per channel:

        dbias = Σ g,  dscale = Σ g·x̂,  dx = scale · rsqrt(var + ε) · (g - (dbias + x̂·dscale) / n)

    plus the (usually zero) cotangents of ``mean`` and ``var``. It is the same function as
    differentiating the forward pass, written so that the backward reads ``x - mean`` (saved
    by the forward) and ``g`` once for its two per-channel sums and once for ``dx``; JAX's own
    derivative takes a third sum (the mean's cotangent, which is analytically
    ``dbias · rsqrt(var + ε) · scale``) and one more pass over a full-size array.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, fast_variance)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, fast_variance):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    xc = x - mean
    if fast_variance:
        var = jnp.maximum(jnp.mean(x * x, axis=axes) - mean * mean, 0.0)
    else:
        var = jnp.mean(jnp.square(xc), axis=axes)
    inv = jax.lax.rsqrt(var + epsilon)
    y = xc * (inv * scale) + bias
    return (y, mean, var), (xc, inv, scale)


def _batch_norm_bwd(epsilon, fast_variance, residuals, cotangents):
    del epsilon, fast_variance
    xc, inv, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(xc.ndim - 1))
    n = int(np.prod(xc.shape[:-1]))
    d_bias = jnp.sum(g, axis=axes)
    d_scale = jnp.sum(g * xc, axis=axes) * inv  # Σ g·x̂
    # dx = scale·inv·(g - dbias/n - x̂·dscale/n) + g_mean/n + 2·(x - mean)·g_var/n
    a = scale * inv
    shift = g_mean / n - a * d_bias / n
    slope = 2.0 * g_var / n - a * inv * d_scale / n
    dx = a * g + xc * slope + shift
    return dx, d_scale, d_bias


_batch_norm_closed_form.defvjp(_batch_norm_fwd, _batch_norm_bwd)
