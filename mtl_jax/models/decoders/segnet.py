"""The SegNet family's task head (MTAN's ``pred_task``): conv3×3 (C_in → C_in, bias) then
conv1×1 (C_in → out_channels, bias), linear (no activation in between or after). Semantic
logits, depth and raw normals alike: the normals task L2-normalises, the semseg loss applies
the log-softmax the reference code puts in the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import Initializer, xavier_normal
from mtl_jax.models.layers import conv, resize_bilinear

Dtype = Any


class SegNetHead(nn.Module):
    """Decoder contract ``(features, output_size, train) -> (pred float32 [B, H, W, C], {})``
    on ``features[-1]`` (already at the input resolution for every SegNet model)."""

    out_channels: int = 1
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del train
        x = features[-1].astype(self.dtype)
        kw = dict(use_bias=True, kernel_init=self.kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = conv(x.shape[-1], 3, name="conv", **kw)(x)
        x = conv(int(self.out_channels), 1, name="out", **kw)(x)
        return resize_bilinear(x.astype(jnp.float32), output_size), {}
