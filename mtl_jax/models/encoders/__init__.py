"""Encoder registry ``ENCODERS``: name → constructor taking keyword attributes.

Slot ``'pyramid'``: the encoder maps a standardised image ``[B, H, W, 3]`` to a list of five
feature maps ``[stem s2, layer1 s4, layer2 s8, layer3 s16, layer4 s32]`` (see ``resnet.py``);
``adamt_dense`` (AdaMT-Net's dense U-Net encoder, ``dense_unet.py``) gives the U-Net bridges
and the bottleneck at strides 1, 2, 4, 8, 16 (decoders that resize to each skip's size accept
both). These are the encoders of the composed architecture (``config.model.encoder``).

Slot ``'segnet'``: MTAN's SegNet family, whose outputs only the SegNet decoders and
interactions read: ``segnet`` (:class:`~mtl_jax.models.encoders.segnet.SegNet`, output
chosen by ``outputs``), ``segnet_dense`` (the Dense baseline's shared network) and
``segnet_cross_stitch`` (the Cross-stitch baseline's per-task level 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mtl_jax.models.encoders.dense_unet import DenseUNetEncoder, dense_unet
from mtl_jax.models.encoders.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from mtl_jax.models.encoders.segnet import SegNet
from mtl_jax.models.encoders.segnet_dense import CrossStitchStem, DenseShared
from mtl_jax.models.encoders.simple import SimpleConvEncoder, simple
from mtl_jax.models.registry import Registry

ENCODERS = Registry("encoder", {
    "pyramid": "image -> [five feature maps, finest first] (ResNet-like)",
    "segnet": "image -> the maps a SegNet-family decoder or interaction reads",
})
for _name, _build in (("resnet18", resnet18), ("resnet34", resnet34), ("resnet50", resnet50),
                      ("resnet101", resnet101), ("simple", simple),
                      ("adamt_dense", dense_unet)):
    ENCODERS.register("pyramid", _name, _build)
ENCODERS.register("segnet", "segnet", SegNet)
ENCODERS.register("segnet", "segnet_dense", DenseShared)
ENCODERS.register("segnet", "segnet_cross_stitch", CrossStitchStem)


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Encoder ``name`` from ``ENCODERS``; ValueError listing the valid names otherwise."""
    return ENCODERS.build(name, **kwargs)


def encoder_out_channels(name: str, **kwargs: Any) -> list[int]:
    """Channels of the five features of encoder ``name`` built with ``kwargs``.

    Only shape-relevant kwargs matter (e.g. ``width``); nothing is initialised.
    """
    return list(build_encoder(name, **kwargs).out_channels)


#: Path (inside the encoder's parameters) of each encoder's last conv: the "last shared layer"
#: that GradNorm and similar methods read per-task gradients from.
LAST_SHARED_LAYER = {
    "resnet18": "layer4_1/conv2",
    "resnet34": "layer4_2/conv2",
    "resnet50": "layer4_2/conv3",
    "resnet101": "layer4_2/conv3",
    "simple": "conv4",
    "adamt_dense": "bottleneck/conv",
}

__all__ = [
    "ENCODERS",
    "DenseUNetEncoder",
    "LAST_SHARED_LAYER",
    "CrossStitchStem",
    "DenseShared",
    "ResNet",
    "SegNet",
    "SimpleConvEncoder",
    "build_encoder",
    "encoder_out_channels",
]
