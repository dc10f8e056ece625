"""Decoder registry: name → module class.

Contract: ``decoder(out_channels=C, dtype=..., param_dtype=..., **decoder_kwargs)``, called as
``decoder(features, output_size, train) -> (prediction_BxHxWxC float32, aux: dict)`` with
``features`` the encoder's list ``[stem, layer1, layer2, layer3, layer4]``. Aux keys
``'side/<k>'`` are side outputs (extra predictions at the output size that the task loss also
supervises: the multi-scale objective). Staged decoders (``three_ways``) also expose
``stage_order``, ``stage`` and ``side`` for exchange blocks between stages.
"""

from __future__ import annotations

import flax.linen as nn

from mtl_jax.models.decoders.aspp import ASPP, DeepLabHead
from mtl_jax.models.decoders.attention_unet import AttentionUNetDecoder
from mtl_jax.models.decoders.three_ways import ThreeWaysDecoder
from mtl_jax.models.decoders.unet import UNetDecoder
from mtl_jax.models.interaction.padnet import PADNetHead

DECODERS: dict[str, type[nn.Module]] = {
    "unet": UNetDecoder,
    "three_ways": ThreeWaysDecoder,
    "deeplab": DeepLabHead,
    "padnet": PADNetHead,
    "adamt_attention": AttentionUNetDecoder,
}

__all__ = ["ASPP", "DECODERS", "AttentionUNetDecoder", "DeepLabHead", "PADNetHead",
           "ThreeWaysDecoder", "UNetDecoder"]
