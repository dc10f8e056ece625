"""Decoder registry: name → module class.

Contract: ``decoder(out_channels=C, dtype=..., param_dtype=..., **decoder_kwargs)``, called as
``decoder(features, output_size, train) -> (prediction_BxHxWxC float32, aux: dict)`` with
``features`` the encoder's list ``[stem, layer1, layer2, layer3, layer4]``.
"""

from __future__ import annotations

import flax.linen as nn

from mtl_jax.models.decoders.unet import UNetDecoder

DECODERS: dict[str, type[nn.Module]] = {
    "unet": UNetDecoder,
}

__all__ = ["DECODERS", "UNetDecoder"]
