"""A plain five-stage conv encoder: the smallest encoder with the ResNet feature contract.

Each stage is one stride-2 conv3×3 + BN + ReLU, so the features come at strides
2, 4, 8, 16, 32 like ``[stem, layer1, layer2, layer3, layer4]`` of a ResNet. It compiles in a
fraction of a ResNet's time, for CPU tests of training machinery and quick experiments where
the encoder is not what is studied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.layers import batch_norm, conv

Dtype = Any


class SimpleConvEncoder(nn.Module):
    """Five stride-2 conv3×3+BN+ReLU stages with ``widths`` channels."""

    widths: Sequence[int] = (8, 16, 32, 32, 64)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> list[int]:
        return list(self.widths)

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array, train: bool) -> list[jax.Array]:
        if len(self.widths) != 5:
            raise ValueError(f"SimpleConvEncoder needs 5 widths, got {self.widths}")
        feats, x = [], x_BxHxWx3
        for i, width in enumerate(self.widths):
            x = conv(width, 3, strides=2, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name=f"bn{i}")(x))
            x = x.astype(self.dtype)
            feats.append(x)
        return feats


def simple(**kwargs: Any) -> SimpleConvEncoder:
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return SimpleConvEncoder(**kwargs)
