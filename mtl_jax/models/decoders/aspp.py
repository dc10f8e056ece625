"""Atrous Spatial Pyramid Pooling (DeepLabv3) and the DeepLabv3 head (docs/models/densemtl.md).

ASPP over a feature map ``[B, h, w, Cin]``: five parallel branches, each a bias-free conv + BN +
ReLU with ``features`` channels -- a 1×1 conv, three 3×3 convs with dilations ``rates``, and
image pooling (global average → 1×1 conv → BN → ReLU, broadcast back to ``h × w``) --
concatenated, projected by a bias-free 1×1 conv + BN + ReLU, then dropout (0.5 by default, train
only). With ``Cin = 2048`` and 256 features it has 15,535,104 parameters (the ASPP of
torchvision's DeepLabv3 and of the DenseMTL decoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.layers import ConvBNAct, conv, resize_bilinear

Dtype = Any


class ASPP(nn.Module):
    """DeepLabv3 ASPP; output ``[B, h, w, features]`` in ``dtype``.

    Parameters: ``branch0`` (1×1), ``branch{1,2,3}`` (3×3 at ``rates``), ``pool`` (image
    pooling), ``project`` (each ``{conv, bn}``). Dropout needs the ``'dropout'`` rng in training.
    """

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dropout: float = 0.5
    kernel_init: Any = torch_default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxhxwxC: jax.Array, train: bool) -> jax.Array:
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x_BxhxwxC.astype(self.dtype)
        branches = [ConvBNAct(self.features, kernel_size=1, name="branch0", **kw)(x, train)]
        for index, rate in enumerate(self.rates):
            branches.append(ConvBNAct(self.features, kernel_size=3, dilation=int(rate),
                                      name=f"branch{index + 1}", **kw)(x, train))
        pooled_Bx1x1xC = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        pooled = ConvBNAct(self.features, kernel_size=1, name="pool", **kw)(
            pooled_Bx1x1xC.astype(self.dtype), train)
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = ConvBNAct(self.features, kernel_size=1, name="project", **kw)(
            jnp.concatenate(branches, axis=-1), train)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabHead(nn.Module):
    """The DeepLabv3 head of DenseMTL's STL baseline: ASPP (rates 12/24/36) on the
    deepest feature, conv3×3 + BN + ReLU, a 1×1 conv with bias to ``out_channels``, then
    bilinear upsampling to the output size (×16 on an output-stride-16 encoder).

    Decoder contract (``decoders/__init__.py``): ``(features, output_size, train) ->
    (prediction float32 [B, H, W, out_channels], {})``. Only ``features[-1]`` is read.
    """

    out_channels: int = 1
    features: int = 256
    rates: Sequence[int] = (12, 24, 36)
    dropout: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        kw = dict(kernel_init=torch_default_kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = ASPP(self.features, tuple(self.rates), self.dropout, name="aspp", **kw)(
            features[-1], train)
        x = ConvBNAct(self.features, kernel_size=3, name="conv", **kw)(x, train)
        logits = conv(self.out_channels, 1, use_bias=True, name="head", **kw)(x)
        return resize_bilinear(logits.astype(jnp.float32), output_size), {}
