"""Shared parts of MTAN's "Dense" and "Cross-stitch" SegNet baselines (Liu et al. 2019).

* :class:`DenseShared` -- Dense's shared SegNet: encoder blocks ``enc{i}``
  (:class:`~mtl_jax.models.encoders.segnet.ConvStack`, 2 layers at levels 0-1, 3 above) with
  mask-keeping max-pooling, decoder blocks ``dec{k}`` with unpooling. Output list:
  ``[image, pooled_0..pooled_4, up_4..up_0]`` -- what every task network reads (the image,
  the shared pooled encoder maps and the shared unpooled decoder inputs). The last shared
  decoder block (``dec0``, 64 → 64 → C with C = ``last_channels``, the reference's
  ``class_nb``: the semantic class count, whatever the tasks' order) feeds nothing, as in the
  reference code; it is kept for the parameter count.
* :class:`CrossStitchStem` -- level 0 of every task network of the Cross-stitch baseline
  (they read the image): ``<task>_enc0``; output ``[pooled_t, mask_t for t in tasks]``.

Xavier-uniform initialisation, as those reference files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.segnet import (
    SEGNET_WIDTHS,
    ConvStack,
    stack_widths,
)
from mtl_jax.models.initializers import Initializer, xavier_uniform
from mtl_jax.models.pooling import max_pool_with_mask, max_unpool

Dtype = Any


class DenseShared(nn.Module):
    """Dense's shared SegNet (module docstring)."""

    widths: Sequence[int] = SEGNET_WIDTHS
    last_channels: int = 13
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, train: bool) -> list[jax.Array]:
        w = [int(c) for c in self.widths]
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x, pooled, masks = image, [], []
        for i in range(5):
            x = ConvStack(stack_widths(i, w[i], w[i]), name=f"enc{i}", **kw)(x, train)
            x, mask = max_pool_with_mask(x)
            pooled.append(x)
            masks.append(mask)
        ups = []
        for k in range(4, -1, -1):
            x = max_unpool(x, masks[k])
            ups.append(x)
            widths = ((w[0], int(self.last_channels)) if k == 0
                      else stack_widths(k, w[k - 1], w[k - 1]))
            x = ConvStack(widths, name=f"dec{k}", **kw)(x, train)
        return [image, *pooled, *ups]


class CrossStitchStem(nn.Module):
    """Level 0 of each task network of the Cross-stitch baseline (module docstring)."""

    tasks: Sequence[str]
    widths: Sequence[int] = SEGNET_WIDTHS
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, train: bool) -> list[jax.Array]:
        w0 = int(self.widths[0])
        out = []
        for t in self.tasks:
            x = ConvStack((w0, w0), name=f"{t}_enc0", kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype)(image, train)
            out.extend(max_pool_with_mask(x))
        return out
