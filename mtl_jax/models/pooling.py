"""2×2 max-pooling that remembers where each maximum was, and max-unpooling (SegNet).

A different op from ``layers.max_pool`` (the models' one plain max-pool), kept because
unpooling needs the positions. Its semantics are PyTorch's (``nn.MaxPool2d(2, 2,
return_indices=True)`` + ``nn.MaxUnpool2d(2, 2)``): within each non-overlapping 2×2 window the
*first* maximum in row-major order (top-left, top-right, bottom-left, bottom-right) wins, the
tie rule of ``layers.max_pool`` too (PyTorch's CPU kernel replaces its running maximum only
by a strictly larger value). A NaN counts as the maximum (of several NaNs the first wins here,
PyTorch's kernel keeps the last). On finite inputs the pooled values equal
``layers.max_pool``'s, and so does the gradient, which goes to the winning position only.
Unpooling writes each pooled value back to that position and zero everywhere else.

No scatter: the "indices" are kept as a one-hot *window mask* ``[B, H, W, C]`` (1 at the
winning position of every window, 0 elsewhere), so unpooling is a nearest ×2 repeat times the
mask -- elementwise work that vectorises on every backend. :func:`torch_indices` turns a mask
into PyTorch's flat indices ``h · W + w`` (into each input plane) for comparisons and weight
conversion.

Odd sizes are refused (``UserError``): PyTorch would silently drop the last row/column when
pooling and the SegNet decoder would then produce a map one pixel smaller than the encoder's,
which the reference code cannot handle either. SegNet models need H and W divisible by 32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError


def _check_even(x_BxHxWxC: jax.Array, what: str) -> None:
    _, h, w, _ = x_BxHxWxC.shape
    if h % 2 or w % 2:
        raise UserError(f"{what}: 2×2 max-pooling needs even height and width, got {h}×{w}; "
                        "SegNet-family models need an input size divisible by 32 (e.g. "
                        "288×384): set config.input_size accordingly")


def _windows(x_BxHxWxC: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` → ``[B, H/2, W/2, C, 4]``, the last axis in row-major window order."""
    b, h, w, c = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


def _unwindows(x_BxhxwxCx4: jax.Array) -> jax.Array:
    """Inverse of :func:`_windows`."""
    b, h2, w2, c, _ = x_BxhxwxCx4.shape
    x = x_BxhxwxCx4.reshape(b, h2, w2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h2, 2 * w2, c)


def max_pool_with_mask(x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2×2 stride-2 max-pool: ``(pooled [B, H/2, W/2, C], mask [B, H, W, C])``.

    ``mask`` (dtype of ``x``, no gradient) is 1 at the first maximum of each window (PyTorch's
    tie rule) and 0 elsewhere. Gradients flow to the winning position only, as PyTorch's.
    """
    _check_even(x_BxHxWxC, "max_pool_with_mask")
    win = _windows(x_BxHxWxC)
    first = jnp.argmax(win, axis=-1)  # jnp.argmax returns the first maximum
    onehot = jax.nn.one_hot(first, 4, dtype=x_BxHxWxC.dtype)
    onehot = jax.lax.stop_gradient(onehot)
    pooled = jnp.sum(win * onehot, axis=-1)
    return pooled, _unwindows(onehot)


def max_unpool(x_BxhxwxC: jax.Array, mask_BxHxWxC: jax.Array) -> jax.Array:
    """``nn.MaxUnpool2d(2, 2)``: each value of ``x`` goes to the position its window's mask
    marks, zeros elsewhere. ``x`` ``[B, H/2, W/2, C]`` (any tensor of the pooled shape, e.g. a
    decoder feature) → ``[B, H, W, C]``."""
    b, h, w, c = mask_BxHxWxC.shape
    if x_BxhxwxC.shape != (b, h // 2, w // 2, c):
        raise ValueError(f"max_unpool: values {x_BxhxwxC.shape} do not match the pooled shape "
                         f"of mask {mask_BxHxWxC.shape}")
    up = jnp.repeat(jnp.repeat(x_BxhxwxC, 2, axis=1), 2, axis=2)
    return up * mask_BxHxWxC.astype(up.dtype)


def torch_indices(mask_BxHxWxC: jax.Array) -> jax.Array:
    """PyTorch's ``return_indices`` output ``[B, H/2, W/2, C]`` int32: the flat index
    ``h · W + w`` of each window's maximum in its input plane."""
    b, h, w, c = mask_BxHxWxC.shape
    rows = jnp.arange(h)[:, None] * w + jnp.arange(w)[None, :]
    flat = jnp.broadcast_to(rows[None, :, :, None], (b, h, w, c)).astype(jnp.int32)
    win_idx = _windows(flat)
    return jnp.sum(win_idx * _windows(mask_BxHxWxC).astype(jnp.int32), axis=-1)
