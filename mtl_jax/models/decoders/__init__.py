"""Decoder registry ``DECODERS``: name → module class.

Slot ``'pyramid'`` (the decoders of the composed architecture, ``config.model.decoder``):
``decoder(out_channels=C, dtype=..., param_dtype=..., **decoder_kwargs)``, called as
``decoder(features, output_size, train) -> (prediction_BxHxWxC float32, aux: dict)`` with
``features`` the encoder's list ``[stem, layer1, layer2, layer3, layer4]``. Aux keys
``'side/<k>'`` are side outputs (extra predictions at the output size that the task loss also
supervises: the multi-scale objective; ``three_ways`` with ``resize_sides=False`` leaves the
prediction and each side output at its stage's own resolution, for a loss that resizes them
itself, e.g. the self-supervised depth loss). Staged decoders (``three_ways``) also expose
``stage_order``, ``stage`` and ``side`` for exchange blocks between stages
(:class:`~mtl_jax.models.interface.StagedDecoder`).

Slot ``'segnet'``: MTAN's SegNet-family heads, same call, reading a SegNet-family encoder's
or interaction's maps: ``segnet`` (:class:`~mtl_jax.models.decoders.segnet.SegNetHead`, the
task head on the last full-resolution map) and ``segnet_dense`` (the Dense baseline's
per-task network, :class:`~mtl_jax.models.decoders.segnet_dense.DenseTaskNet`).
"""

from __future__ import annotations

from mtl_jax.models.decoders.aspp import ASPP, DeepLabHead
from mtl_jax.models.decoders.attention_unet import AttentionUNetDecoder
from mtl_jax.models.decoders.segnet import SegNetHead
from mtl_jax.models.decoders.segnet_dense import DenseTaskNet
from mtl_jax.models.decoders.three_ways import ThreeWaysDecoder
from mtl_jax.models.decoders.unet import UNetDecoder
from mtl_jax.models.interaction.padnet import PADNetHead
from mtl_jax.models.registry import Registry

DECODERS = Registry("decoder", {
    "pyramid": "(five-map pyramid, output size, train) -> (prediction, aux)",
    "segnet": "(SegNet-family maps, output size, train) -> (prediction, aux)",
})
DECODERS.register("pyramid", "unet", UNetDecoder)
DECODERS.register("pyramid", "three_ways", ThreeWaysDecoder)
DECODERS.register("pyramid", "deeplab", DeepLabHead)
DECODERS.register("pyramid", "padnet", PADNetHead)
DECODERS.register("pyramid", "adamt_attention", AttentionUNetDecoder)
DECODERS.register("segnet", "segnet", SegNetHead)
DECODERS.register("segnet", "segnet_dense", DenseTaskNet)

__all__ = ["ASPP", "DECODERS", "AttentionUNetDecoder", "DeepLabHead", "DenseTaskNet",
           "PADNetHead", "SegNetHead", "ThreeWaysDecoder", "UNetDecoder"]
