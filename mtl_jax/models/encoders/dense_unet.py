"""AdaMT-Net's densely connected U-Net encoder (Jha et al., CVPR-W 2020, §3.1 and §4.2;
docs/models/adamt.md).

Four blocks of two conv3×3 + BatchNorm + ReLU at ``widths`` = 64/128/256/512 channels, each
followed by dropout and a 2×2 max-pool (stride 2), then a bottleneck of 1024 maps (the shared
feature space). DenseNet-style connections: the input of block ``i`` concatenates the image and
the (dropped-out, pooled) outputs of *all* earlier blocks, each brought to block ``i``'s
resolution; the bottleneck reads the same concatenation after the last block. With
``dense=False`` each block reads only the previous block's pooled output (a plain U-Net
encoder: the paper's "Simple U-Net" ablation), and nothing else changes.

Choices where the paper is vague (fields, documented in ``docs/models/adamt.md``):

* ``dense_pool``: how the image and earlier outputs reach the current resolution --
  ``'max'`` (default: 2×2 max-pools, the encoder's own down-sampling, so block ``i`` sees each
  earlier output exactly as the chain of max-pools delivers it) or ``'avg'`` (2×2 average
  pools, DenseNet's transition layers). A block's own output always goes through the 2×2
  max-pool the paper names.
* ``dropout_rate`` = 0.2 (DenseNet's rate without data augmentation; the paper gives none).
  Dropout acts on the path to the next block; the U-Net bridge is the block output before
  dropout.
* ``bottleneck_kernel`` = 1: the bottleneck is one conv k×k + BN + ReLU over the concatenation
  (docs/models/adamt.md: a 1×1 conv; 3 gives a 3×3 conv).

Channels at the input of each block with the paper's widths (image 3 channels): dense
3 / 67 / 195 / 451 and bottleneck 963; plain 3 / 64 / 128 / 256 and bottleneck 512
(:meth:`DenseUNetEncoder.input_channels`).

Output: the U-Net bridges (block outputs before dropout and pooling) and the bottleneck,
``[block1 s1, block2 s2, block3 s4, block4 s8, bottleneck s16]`` with ``widths`` +
``(bottleneck_features,)`` channels. Odd sizes are floored by each pool (PyTorch's
``MaxPool2d(2)``), so any input of at least 16×16 works.

Parameters: ``block{i}_conv{1,2}/{conv,bn}`` (i = 1..4) and ``bottleneck/{conv,bn}``; convs
bias-free (BatchNorm follows), Kaiming-normal (fan-out) initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.layers import ConvBNAct, max_pool

Dtype = Any

DENSE_POOLS = ("max", "avg")


def _pool2(x_BxHxWxC: jax.Array, kind: str) -> jax.Array:
    """2×2 pooling, stride 2, no padding (odd sizes floored as PyTorch's ``MaxPool2d(2)``):
    ``'max'`` is ``layers.max_pool`` (gradient to the first maximum, as PyTorch's),
    ``'avg'`` the mean of each window (``AvgPool2d(2)``)."""
    if kind == "max":
        return max_pool(x_BxHxWxC, (2, 2), (2, 2))
    b, h, w, c = x_BxHxWxC.shape
    x = x_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.mean(x, axis=(2, 4))


class DenseUNetEncoder(nn.Module):
    """AdaMT-Net's dense U-Net encoder (module docstring): image ``[B, H, W, 3]`` → ``[block1
    [B,H,W,w1], block2 [B,H/2,W/2,w2], block3 [.., H/4, ..], block4 [.., H/8, ..], bottleneck
    [B, H/16, W/16, bottleneck_features]]``."""

    widths: Sequence[int] = (64, 128, 256, 512)
    bottleneck_features: int = 1024
    dense: bool = True
    dropout_rate: float = 0.2
    dense_pool: str = "max"
    bottleneck_kernel: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> list[int]:
        """Channels of the returned features (bridges, then the bottleneck)."""
        return [int(w) for w in self.widths] + [int(self.bottleneck_features)]

    def input_channels(self, image_channels: int = 3) -> list[int]:
        """Input channels of each block's first conv and of the bottleneck (last entry): with
        dense connections the image plus all earlier block widths, else the previous width."""
        out, carried = [], image_channels
        for width in self.widths:
            out.append(carried)
            carried = carried + int(width) if self.dense else int(width)
        return out + [carried]

    def _check(self) -> None:
        if len(self.widths) < 1 or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"DenseUNetEncoder: widths must be positive, got {self.widths}")
        if self.dense_pool not in DENSE_POOLS:
            raise ValueError(f"DenseUNetEncoder: dense_pool must be one of {DENSE_POOLS}, got "
                             f"{self.dense_pool!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"DenseUNetEncoder: dropout_rate must be in [0, 1), got "
                             f"{self.dropout_rate}")
        if self.bottleneck_kernel not in (1, 3):
            raise ValueError(f"DenseUNetEncoder: bottleneck_kernel must be 1 or 3, got "
                             f"{self.bottleneck_kernel}")

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array, train: bool) -> list[jax.Array]:
        self._check()
        levels = len(self.widths)
        if min(x_BxHxWx3.shape[1:3]) < 2 ** levels:
            raise ValueError(f"DenseUNetEncoder: input {x_BxHxWx3.shape[1:3]} is smaller than "
                             f"{2 ** levels} (one pixel after {levels} 2×2 pools)")
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        carried = x_BxHxWx3.astype(self.dtype)  # what the next block reads
        bridges = []
        for i, width in enumerate(self.widths):
            y = ConvBNAct(int(width), 3, name=f"block{i + 1}_conv1", **prec)(carried, train)
            y = ConvBNAct(int(width), 3, name=f"block{i + 1}_conv2", **prec)(y, train)
            bridges.append(y)
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
            pooled = _pool2(y, "max")
            if self.dense:
                # DenseNet-style: the image and every earlier output, now one level lower.
                carried = jnp.concatenate([_pool2(carried, self.dense_pool), pooled], axis=-1)
            else:
                carried = pooled
        bottleneck = ConvBNAct(int(self.bottleneck_features), self.bottleneck_kernel,
                               name="bottleneck", **prec)(carried, train)
        return [*bridges, bottleneck]


def dense_unet(**kwargs: Any) -> DenseUNetEncoder:
    """``ENCODERS['adamt_dense']``: a :class:`DenseUNetEncoder` from keyword attributes."""
    if "widths" in kwargs:
        kwargs["widths"] = tuple(int(w) for w in kwargs["widths"])
    return DenseUNetEncoder(**kwargs)
