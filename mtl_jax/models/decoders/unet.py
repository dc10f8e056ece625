"""XTasC-Net U-Net decoder (docs/models/xtasc.md), one per task.

Five blocks, deepest first. Block 1 takes layer4; every block is ``convs_per_block`` ×
(conv3×3 with bias + BN + ReLU) -- the first ``convs_per_block - 1`` at ``hidden_features``
channels (default: ``features``; the reference's ``ConvBlock`` ``mid_features``), the last at
``features`` -- followed by bilinear upsampling to the
size of the next encoder feature (×2 for an undilated ResNet; exact skip size otherwise, so odd
input sizes and dilated encoders work); the next block's input is
``concat(upsampled, skip)`` with skips layer3, layer2, layer1, stem. After block 5 the map is
upsampled to the image size and a bias-free 1×1 conv gives ``out_channels``.

Upsampling convention: ``align_corners=False`` (default, half-pixel centres) or ``True``
(PyTorch's ``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)`` of the XTasC-Net
reference code; :func:`~mtl_jax.models.layers.resize_bilinear`).

A bias-free 1×1 conv commutes exactly with bilinear resizing (both are linear, and the bilinear
weights of each output pixel sum to 1), so the head is applied *before* the last upsampling:
same function, ``features / out_channels`` times less work at full resolution.

Initialisation: ``kernel_init`` (default PyTorch's Conv2d kernel init ``U(±1/√fan_in)``), biases
0; BN scale 1, bias 0.
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


class UNetDecoder(nn.Module):
    """Decoder over an encoder feature list ``[stem, layer1, layer2, layer3, layer4]``.

    With ResNet-34 features, ``features=128, convs_per_block=3``: 3,250,688 parameters for 7
    output channels, 3,249,920 for 1.

    Parameters: ``block{b}_conv{k}/{conv,bn}`` (b = 1..5 from the deepest, k = 1..n) and
    ``head`` (the final 1×1 conv).
    """

    features: int = 128
    convs_per_block: int = 3
    out_channels: int = 1
    hidden_features: int | None = None
    align_corners: bool = False
    kernel_init: Any = torch_default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Features (finest first, each ``[B, h_i, w_i, c_i]``) → ``([B, H, W, out_channels]``
        float32 at ``output_size = (H, W)``, empty aux dict``)``."""
        *skips, deepest = features
        x = deepest.astype(self.dtype)
        hidden = self.hidden_features or self.features
        last = self.convs_per_block - 1
        for index, skip in enumerate([*reversed(skips), None]):
            for conv_index in range(self.convs_per_block):
                x = ConvBNAct(
                    self.features if conv_index == last else hidden,
                    kernel_size=3,
                    use_bias=True,
                    kernel_init=self.kernel_init,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"block{index + 1}_conv{conv_index + 1}",
                )(x, train)
            if skip is not None:
                x_BxhxwxF = resize_bilinear(x, skip.shape[1:3], align_corners=self.align_corners)
                x = jnp.concatenate([x_BxhxwxF, skip.astype(self.dtype)], axis=-1)
        logits_BxhxwxC = conv(
            self.out_channels,
            1,
            use_bias=False,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x)
        pred_BxHxWxC = resize_bilinear(logits_BxhxwxC.astype(jnp.float32), output_size,
                                       align_corners=self.align_corners)
        return pred_BxHxWxC, {}
