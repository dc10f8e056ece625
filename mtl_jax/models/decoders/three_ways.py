"""The "3-ways" / PAD-Net+ decoder of DenseMTL (docs/models/densemtl.md), run stage by stage.

Stages run from 4 (deepest) to 0 (full resolution) with ``channels[i]`` channels at stage i
(default ``(64, 128, 128, 256, 256)``, indexed by stage). On the encoder features
``[stem s2, layer1 s4, layer2 s8, layer3 s16, layer4 s16 (dilated) or s32]``:

* stage 4: ASPP (rates 6/12/18, ``channels[4]`` features, dropout 0.5) on layer4, nearest
  upsampling to layer3's size if it is larger (undilated encoders), concat layer3, conv block;
* stage i = 3, 2, 1: conv block to ``channels[i]``; nearest upsampling to the skip's size when
  the skip is larger; concat the skip (layer2, layer1, stem); conv block;
* stage 0: conv block to ``channels[0]``, nearest ×2 upsampling, conv block (no skip).

A conv block is a 3×3 conv with reflection padding and bias, then ELU (Monodepth2 style). Side
outputs are 1×1 convs with bias: side output k reads stage k's output (side output 0 is the final
prediction at full resolution, side output 1 the half-resolution one). With a ResNet-101 encoder
and one output channel the head has 22,061,634 parameters. A *regression* head (the reference's
``is_regression: True``, the disparity head of the self-supervised depth setting) has
Monodepth2's side outputs instead: reflection padding, 3×3 conv with bias, sigmoid (values in
(0, 1)).

Besides the one-shot decoder contract (``(features, output_size, train) -> (pred, aux)``, aux =
``{'side/<k>': side output k bilinearly resized to output_size}``, with aligned corners as the
reference (``align_corners``) for k in ``side_scales``; with ``resize_sides=False`` nothing is
resized: side output k stays at stage k's resolution, about output_size / 2^k, and the
prediction at stage 0's, the input resolution, as the self-supervised depth loss needs them),
the decoder exposes ``stage(i, x, features, train)`` and ``side(k, x)`` so that
:class:`~mtl_jax.models.exchange.ExchangeMultiTaskModel` can insert cross-task exchange
blocks between stages. Parameters: ``aspp``, ``upconv_<i>_<k>`` (stage i, first (0) or second
(1) conv block; stage 4 has ``upconv_4_1`` only), ``out_<k>`` (side output k; a 1×1 kernel, or
3×3 in a regression head).

Initialisation: PyTorch's default conv kernel init, zero biases (the released code keeps the
PyTorch defaults; biases start at 0 here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.decoders.aspp import ASPP
from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.layers import (
    conv,
    resize_bilinear,
    resize_nearest,
    upsample_nearest,
)

Dtype = Any

STAGES = (4, 3, 2, 1, 0)


class ConvBlock(nn.Module):
    """Reflection-padded 3×3 conv with bias, then ELU; output in ``dtype``."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = jnp.pad(x_BxHxWxC.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)),
                    mode="reflect")
        y = conv(self.features, 3, padding=0, use_bias=True,
                 kernel_init=torch_default_kernel_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv")(x)
        return nn.elu(y).astype(self.dtype)


class ThreeWaysDecoder(nn.Module):
    """DenseMTL task decoder (see the module docstring).

    Attributes:
      out_channels: channels of the prediction (and of every side output).
      channels: channels of stages 0..4 (index = stage).
      aspp_rates, dropout: ASPP of stage 4.
      side_scales: stages whose side output is returned besides the final one (scale 0).
      align_corners: bilinear convention of the resize of side outputs to the output size
        (``True``, the default, is the reference's: its losses resize every side output to the
        label size with ``F.interpolate(..., mode='bilinear', align_corners=True)``).
      regression: Monodepth2's side outputs (reflection pad, 3×3 conv with bias, sigmoid)
        instead of 1×1 convs (the reference's ``is_regression``).
      resize_sides: resize the prediction and side outputs to ``output_size`` (default);
        ``False`` returns each at its stage's own resolution.
    """

    out_channels: int = 1
    channels: Sequence[int] = (64, 128, 128, 256, 256)
    aspp_rates: Sequence[int] = (6, 12, 18)
    dropout: float = 0.5
    side_scales: Sequence[int] = (1,)
    align_corners: bool = True
    regression: bool = False
    resize_sides: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    stage_order = STAGES

    def setup(self) -> None:
        if len(self.channels) != 5:
            raise ValueError(f"ThreeWaysDecoder needs 5 stage channels, got {self.channels}")
        bad = sorted(set(self.side_scales) - set(STAGES[:-1]))
        if bad:
            raise ValueError(f"side_scales must be stages 1..4, got {bad}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.aspp = ASPP(self.channels[4], tuple(self.aspp_rates), self.dropout,
                         kernel_init=torch_default_kernel_init, **kw)
        blocks = {"4_1": ConvBlock(self.channels[4], **kw)}
        for stage in STAGES[1:]:
            for k in (0, 1):
                blocks[f"{stage}_{k}"] = ConvBlock(self.channels[stage], **kw)
        self.upconv = blocks  # parameter names upconv_<stage>_<k>
        kernel, pad = (3, 0) if self.regression else (1, None)
        self.out = {  # parameter names out_<scale>
            str(k): conv(self.out_channels, kernel, padding=pad, use_bias=True,
                         kernel_init=torch_default_kernel_init, **kw)
            for k in (0, *sorted(set(self.side_scales)))
        }

    def stage(self, stage: int, x: jax.Array | None, features: Sequence[jax.Array],
              train: bool) -> jax.Array:
        """Run decoder stage ``stage`` on the previous stage's output ``x`` (``None`` at
        stage 4) with the encoder ``features``; returns ``[B, h_i, w_i, channels[stage]]``."""
        if stage == 4:
            x = self.aspp(features[4], train)
            skip = features[3].astype(self.dtype)
            x = jnp.concatenate([resize_nearest(x, skip.shape[1:3]), skip], axis=-1)
            return self.upconv["4_1"](x)
        x = self.upconv[f"{stage}_0"](x)
        if stage == 0:
            x = upsample_nearest(x, 2)
        else:
            skip = features[stage - 1].astype(self.dtype)
            if skip.shape[1] > x.shape[1] or skip.shape[2] > x.shape[2]:
                x = resize_nearest(x, skip.shape[1:3])
            x = jnp.concatenate([x, skip], axis=-1)
        return self.upconv[f"{stage}_1"](x)

    def side(self, scale: int, x: jax.Array) -> jax.Array:
        """Side output ``scale`` of stage ``scale``'s output (a 1×1 conv with bias; in a
        regression head reflection pad, 3×3 conv with bias, sigmoid); float32."""
        if not self.regression:
            return self.out[str(scale)](x).astype(jnp.float32)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        return jax.nn.sigmoid(self.out[str(scale)](x).astype(jnp.float32))

    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, aux = None, {}
        for stage in STAGES:
            x = self.stage(stage, x, features, train)
            if stage in self.side_scales:
                aux[f"side/{stage}"] = self.resize_side(self.side(stage, x), output_size)
        return self.resize_side(self.side(0, x), output_size), aux

    def resize_side(self, y_BxhxwxC: jax.Array, output_size: Sequence[int]) -> jax.Array:
        """A side output resized bilinearly to ``output_size`` with this decoder's
        ``align_corners`` convention (the identity when the size already matches, or always
        with ``resize_sides=False``)."""
        if not self.resize_sides:
            return y_BxhxwxC
        return resize_bilinear(y_BxhxwxC, output_size, align_corners=self.align_corners)
