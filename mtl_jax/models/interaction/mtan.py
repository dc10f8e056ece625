"""MTAN's task attention over a shared SegNet (Liu et al., CVPR 2019; docs/models/segnet.md).

For every task, encoder level j (``att_enc_j``): mask = sigmoid(BN(1×1 conv(ReLU(BN(1×1 conv(
in)))))) with ``in = u_j`` at level 0 and ``concat(u_j, previous)`` above; attended = mask ⊙ p_j;
previous = 2×2 max-pool(``shared_enc{j}``(attended)), where ``shared_enc{j}`` is a
conv3×3 + BN + ReLU *shared by all tasks*. Decoder level k (from 4 down to 0,
``att_dec_k``): x = ``shared_dec{k}``(bilinear ×2 (aligned corners, as MTAN's code)(previous));
mask from ``concat(up_k, x)``; attended = mask ⊙ d_k. The task's feature is the last attended
map ``[B, H, W, widths[0]]``.

Parameters: ``<task>/att_enc_{j}``, ``<task>/att_dec_{k}`` (task-specific) and
``shared_enc{j}``, ``shared_dec{k}`` (shared across tasks). Interaction contract of
:class:`~mtl_jax.models.multitask.MultiTaskModel`: ``(features, train) -> ({task: [feature]},
{})`` with ``features`` the 20 maps of ``SegNet(outputs='all')``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.segnet import ConvLayer, SegNetMaps
from mtl_jax.models.initializers import Initializer, xavier_normal
from mtl_jax.models.layers import batch_norm, conv, max_pool, resize_bilinear

Dtype = Any


class AttentionMask(nn.Module):
    """1×1 conv → BN → ReLU → 1×1 conv → BN → sigmoid (MTAN's ``att_layer``); convs with bias."""

    mid: int
    out: int
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(use_bias=True, kernel_init=self.kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = conv(self.mid, 1, name="conv0", **kw)(x)
        x = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name="bn0")(x))
        x = conv(self.out, 1, name="conv1", **kw)(x.astype(self.dtype))
        x = nn.sigmoid(batch_norm(train, param_dtype=self.param_dtype, name="bn1")(x))
        return x.astype(self.dtype)


class MTANTaskAttention(nn.Module):
    """One task's attention masks (``att_enc_0..4``, ``att_dec_0..4``; ``dec_k`` for decoder
    level k). Holds parameters only; :class:`MTANAttention` runs them."""

    widths: Sequence[int]
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        w = [int(c) for c in self.widths]
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        self.att_enc = [AttentionMask(w[j], w[j], **kw) for j in range(5)]
        self.att_dec = [AttentionMask(w[k - 1] if k else w[0], w[k - 1] if k else w[0], **kw)
                        for k in range(5)]


class MTANAttention(nn.Module):
    """Every task's attention path over the shared SegNet (module docstring)."""

    tasks: Sequence[str]
    widths: Sequence[int]
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool
                 ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array]]:
        maps = SegNetMaps.from_list(features)
        w = [int(c) for c in self.widths]
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        shared_enc = [ConvLayer(w[j + 1] if j < 4 else w[4], name=f"shared_enc{j}", **kw)
                      for j in range(5)]
        shared_dec = [ConvLayer(w[k - 1] if 0 < k < 4 else w[k], name=f"shared_dec{k}", **kw)
                      for k in range(5)]
        out = {}
        for task in self.tasks:
            row = MTANTaskAttention(self.widths, name=task, **kw)
            prev = None
            for j in range(5):
                first = maps.first[j]
                inp = first if j == 0 else jnp.concatenate([first, prev], axis=-1)
                attended = row.att_enc[j](inp, train) * maps.encoded[j]
                prev = max_pool(shared_enc[j](attended, train), (2, 2), (2, 2))
            for j, k in enumerate(range(4, -1, -1)):
                _, h, wd, _ = prev.shape
                x = resize_bilinear(prev, (2 * h, 2 * wd), align_corners=True)
                x = shared_dec[k](x, train)
                # maps.unpooled / maps.decoded are in decoding order: index j is level k = 4 - j
                mask = row.att_dec[k](jnp.concatenate([maps.unpooled[j], x], axis=-1), train)
                prev = mask * maps.decoded[j]
            out[task] = [prev]
        return out, {}
