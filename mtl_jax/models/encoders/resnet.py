"""ResNet-18/34/50/101 encoders in torchvision layout, returning five feature maps.

Layout (torchvision v1.5): conv1 7×7/2 bias-free + BN + ReLU ("stem", stride 2), 3×3/2
max-pool, then four stages ``layer1..layer4`` of BasicBlocks (18/34) or Bottlenecks (50/101),
with the stride on the 3×3 conv and a 1×1 conv + BN "downsample" on the shortcut when the
shape changes. No fc layer. Parameter names follow torchvision so converted ImageNet weights
map one to one: ``conv1``, ``bn1``, ``layer{s}_{b}/{conv1,bn1,conv2,bn2[,conv3,bn3]}`` and
``layer{s}_{b}/downsample_conv`` / ``downsample_bn`` (torchvision ``downsample.0`` / ``.1``).

Initialisation as torchvision's default: convs kaiming-normal (fan_out, ReLU gain), BN scale 1
and bias 0; ``zero_init_residual=True`` starts the last BN of every block at scale 0 (torchvision
option, off by default).

Dilation as torchvision's ``replace_stride_with_dilation`` (layer2..layer4): the stage's stride
becomes 1 and the running dilation is multiplied by 2; the first block of a dilated stage keeps
the previous dilation, the following blocks use the new one. torchvision refuses dilation in
BasicBlock; here both 3×3 convs of a BasicBlock use the block's dilation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.layers import add_relu, batch_norm, conv, max_pool

Dtype = Any


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual; output channels = ``planes``."""

    planes: int
    strides: int = 1
    dilation: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = conv(self.planes, 3, strides=self.strides, dilation=self.dilation, name="conv1", **kw)(
            x_BxHxWxC
        )
        y = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name="bn1")(y))
        y = conv(self.planes, 3, dilation=self.dilation, name="conv2", **kw)(y.astype(self.dtype))
        y = batch_norm(train, scale_init=last_scale, param_dtype=self.param_dtype, name="bn2")(y)
        shortcut = _shortcut(self, x_BxHxWxC, self.planes, train)
        return add_relu(y, shortcut).astype(self.dtype)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 with a residual; output channels = 4·``planes``."""

    planes: int
    strides: int = 1
    dilation: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        out_channels = self.planes * self.expansion
        y = conv(self.planes, 1, name="conv1", **kw)(x_BxHxWxC)
        y = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name="bn1")(y))
        y = conv(self.planes, 3, strides=self.strides, dilation=self.dilation, name="conv2", **kw)(
            y.astype(self.dtype)
        )
        y = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name="bn2")(y))
        y = conv(out_channels, 1, name="conv3", **kw)(y.astype(self.dtype))
        y = batch_norm(train, scale_init=last_scale, param_dtype=self.param_dtype, name="bn3")(y)
        shortcut = _shortcut(self, x_BxHxWxC, out_channels, train)
        return add_relu(y, shortcut).astype(self.dtype)


def _shortcut(
    block: BasicBlock | Bottleneck, x_BxHxWxC: jax.Array, out_channels: int, train: bool
) -> jax.Array:
    """Identity, or 1×1 conv (block stride) + BN when the block changes shape (float32, or
    float64 in a float64 model)."""
    if not block.downsample:
        return x_BxHxWxC.astype(jnp.promote_types(x_BxHxWxC.dtype, jnp.float32))
    # Called inside the block's compact __call__, so these modules become its children.
    y = conv(
        out_channels,
        1,
        strides=block.strides,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        name="downsample_conv",
    )(x_BxHxWxC)
    return batch_norm(train, param_dtype=block.param_dtype, name="downsample_bn")(y)


class ResNet(nn.Module):
    """ResNet encoder; ``__call__`` maps an image batch to five feature maps.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34.
      block: ``BasicBlock`` or ``Bottleneck``.
      width: stem channels and base stage width (torchvision: 64); small values make tiny
        models for CPU tests.
      replace_stride_with_dilation: for layer2, layer3, layer4.
      zero_init_residual: start the last BN scale of each block at 0.
    """

    stage_sizes: Sequence[int]
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock
    width: int = 64
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> list[int]:
        """Channels of the five features: [stem, layer1, layer2, layer3, layer4]."""
        return resnet_out_channels(self.block, self.width)

    @property
    def strides(self) -> list[int]:
        """Output stride of each of the five features (input size / feature size)."""
        strides, current = [2, 4], 4
        for dilate in self.replace_stride_with_dilation:
            current *= 1 if dilate else 2
            strides.append(current)
        return strides

    @nn.compact
    def __call__(self, image_BxHxWx3: jax.Array, train: bool) -> list[jax.Array]:
        """``[B, H, W, 3]`` (standardised) → ``[stem_B×H/2×W/2×w, layer1 (s4), layer2 (s8),
        layer3 (s16), layer4 (s32; s16 or s8 when dilated)]`` in ``dtype``.

        Sizes follow torch's rule ``(n - 1) // 2 + 1`` per stride-2 step, so odd sizes work.
        """
        if len(self.replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs 3 booleans (layer2..layer4)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.width, 7, strides=2, name="conv1", **kw)(image_BxHxWx3)
        x = nn.relu(batch_norm(train, param_dtype=self.param_dtype, name="bn1")(x))
        stem_Bx2xC = x.astype(self.dtype)
        features = [stem_Bx2xC]
        x = max_pool(stem_Bx2xC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        in_channels, dilation = self.width, 1
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = self.width * 2**stage
            strides = 1 if stage == 0 else 2
            previous_dilation = dilation
            if stage > 0 and self.replace_stride_with_dilation[stage - 1]:
                dilation *= strides
                strides = 1
            out_channels = planes * self.block.expansion
            for index in range(num_blocks):
                first = index == 0
                x = self.block(
                    planes,
                    strides=strides if first else 1,
                    dilation=previous_dilation if first else dilation,
                    downsample=first and (strides != 1 or in_channels != out_channels),
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{stage + 1}_{index}",
                    **kw,
                )(x, train)
            in_channels = out_channels
            features.append(x)
        return features


def resnet_out_channels(block: type[BasicBlock] | type[Bottleneck], width: int = 64) -> list[int]:
    """Channels of [stem, layer1, layer2, layer3, layer4] for a block type and base width."""
    return [width] + [width * 2**stage * block.expansion for stage in range(4)]


_DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def _make(depth: int, **kwargs: Any) -> ResNet:
    block, stage_sizes = _DEPTHS[depth]
    if "replace_stride_with_dilation" in kwargs:
        kwargs["replace_stride_with_dilation"] = tuple(kwargs["replace_stride_with_dilation"])
    return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); kwargs are ``ResNet`` attributes."""
    return _make(18, **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); kwargs are ``ResNet`` attributes."""
    return _make(34, **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); kwargs are ``ResNet`` attributes."""
    return _make(50, **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3); kwargs are ``ResNet`` attributes."""
    return _make(101, **kwargs)
