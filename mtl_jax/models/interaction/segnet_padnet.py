"""PAD-Net on SegNet (the ATI-Net paper's baseline, docs/models/segnet.md).

Shared SegNet encoder (``SegNet(outputs='encoder')``) → per task a full SegNet decoder
``<task>_decoder`` (unpooling with the shared encoder's masks) giving 64-channel
initial-prediction features → PAD-Net multi-modal distillation (``distillation``; 3×3 convs with
bias, Xavier-normal) → the task heads (``decoders/<task>``, :class:`SegNetHead`).

``initial_heads=True`` adds a 1×1 conv (bias) per task on the initial features, returned as
the side output ``<task>/side/initial`` that the task loss also supervises (PAD-Net's deep
supervision). The ATI-Net authors' ``padnet.py`` has no such heads (its initial features are
unsupervised), so the default is False and the parameter count (45,938,641) is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.segnet import SEGNET_WIDTHS, SegNetEncoded, segnet_decoder_levels
from mtl_jax.models.initializers import Initializer, xavier_normal
from mtl_jax.models.interaction.padnet import PADNetDistillation
from mtl_jax.models.layers import conv

Dtype = Any


class SegNetTaskDecoder(nn.Module):
    """One task's SegNet decoder: ``(pooled bottleneck, masks) -> [B, H, W, widths[0]]``."""

    widths: Sequence[int] = SEGNET_WIDTHS
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, masks: Sequence[jax.Array], train: bool) -> jax.Array:
        _, ds = segnet_decoder_levels(z, masks, self.widths, train, kernel_init=self.kernel_init,
                                      dtype=self.dtype, param_dtype=self.param_dtype)
        return ds[-1]


class SegNetPADNet(nn.Module):
    """Interaction contract: ``([z, mask_0..mask_4], train) -> ({task: [distilled]}, aux)``."""

    task_channels: Sequence[tuple[str, int]]
    widths: Sequence[int] = SEGNET_WIDTHS
    initial_heads: bool = False
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool
                 ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array]]:
        z, masks = SegNetEncoded.from_list(features)
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        feats, aux = {}, {}
        for task, channels in self.task_channels:
            f = SegNetTaskDecoder(self.widths, name=f"{task}_decoder", **kw)(z, masks, train)
            feats[task] = f
            if self.initial_heads:
                aux[f"{task}/side/initial"] = conv(int(channels), 1, use_bias=True,
                                                   name=f"{task}_initial", **kw)(f).astype(
                                                       jnp.float32)
        distilled, _ = PADNetDistillation(tuple(feats), use_bias=True, name="distillation",
                                          **kw)(feats, train)
        return {t: [x] for t, x in distilled.items()}, aux
