"""XTasC-Net's task-transfer network (TTNet, docs/models/xtasc.md): a small U-Net that maps
one task's prediction to another task's output space (e.g. segmentation logits → depth).

Layout (``features = (64, 128, 256)``), input ``x`` ``[B, H, W, C_in]``:

* ``enc1``..``enc3``: two conv3×3 (with bias) + ReLU (with ``use_bn`` conv + BN + ReLU, the
  reference's ``batch_norm=True``) at ``features[i]`` channels, then 2×2 max-pool with stride
  2 (floor, as PyTorch) → ``e1`` (H/2, 64), ``e2`` (H/4, 128), ``e3`` (H/8, 256);
* ``dec1``: bilinear ×2 of ``e3`` to the size of ``e2`` (aligned corners), two conv3×3 + ReLU →
  128; ``dec2``: the same on ``concat(dec1, e2)`` (the upsampled map first, then the skip) to
  the size of ``e1`` → 64; ``dec3``: on ``concat(dec2, e1)`` to ``(H, W)`` → 64;
* ``head``: 1×1 conv without bias → ``out_channels``.

``log_softmax_input=True`` (seg → depth) applies a log-softmax over the channels to the input
first; depth → seg takes the raw depth. The output is the raw head output (for seg it is used as
logits), as the reference's ``TaskTransferNetWithSkipCN``.

Upsampling uses aligned corners (PyTorch ``nn.Upsample(scale_factor=2, mode='bilinear',
align_corners=True)``, the reference's convention); for sizes that are not multiples of 8 the
map is resized to the skip's size instead of exactly ×2.

Parameters: ``enc{i}_conv{k}`` / ``dec{i}_conv{k}`` (``kernel``, ``bias``; with ``use_bn`` a
``ConvBNAct`` with ``conv`` and ``bn``) and ``head/kernel``. Cityscapes 7 classes: seg → depth
1,885,568 parameters, depth → seg 1,882,496.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import xavier_normal
from mtl_jax.models.layers import ConvBNAct, conv, max_pool, resize_bilinear

Dtype = Any


class TTNet(nn.Module):
    """Task-transfer U-Net (module docstring): ``[B, H, W, C_in]`` → ``[B, H, W, out_channels]``
    float32."""

    out_channels: int
    features: Sequence[int] = (64, 128, 256)
    log_softmax_input: bool = False
    use_bn: bool = False
    align_corners: bool = True
    kernel_init: Any = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _double_conv(self, x: jax.Array, width: int, name: str, train: bool) -> jax.Array:
        for k in (1, 2):
            if self.use_bn:
                x = ConvBNAct(width, kernel_size=3, use_bias=True, kernel_init=self.kernel_init,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"{name}_conv{k}")(x, train)
            else:
                x = nn.relu(conv(width, 3, use_bias=True, kernel_init=self.kernel_init,
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"{name}_conv{k}")(x))
        return x

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
        if len(self.features) != 3:
            raise ValueError(f"TTNet features must be three widths, got {self.features}")
        f1, f2, f3 = (int(f) for f in self.features)
        x = x_BxHxWxC.astype(jnp.float32)
        if self.log_softmax_input:
            x = jax.nn.log_softmax(x, axis=-1)
        x = x.astype(self.dtype)
        size0 = x.shape[1:3]

        def down(y, width, name):
            y = self._double_conv(y, width, name, train)
            return max_pool(y, (2, 2), (2, 2))

        e1 = down(x, f1, "enc1")
        e2 = down(e1, f2, "enc2")
        e3 = down(e2, f3, "enc3")

        def up(y, size, width, name):
            y = resize_bilinear(y, size, align_corners=self.align_corners)
            return self._double_conv(y, width, name, train)

        d = up(e3, e2.shape[1:3], f2, "dec1")
        d = up(jnp.concatenate([d, e2], axis=-1), e1.shape[1:3], f1, "dec2")
        d = up(jnp.concatenate([d, e1], axis=-1), size0, f1, "dec3")
        out = conv(self.out_channels, 1, use_bias=False, kernel_init=self.kernel_init,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="head")(d)
        return out.astype(jnp.float32)
