"""The architecture ``'adamt'``: AdaMT-Net (Jha, Kumar, Banerjee & Chaudhuri, CVPR-W 2020;
docs/models/adamt.md) and its ablations, as fields of one network.

A shared dense U-Net encoder (``ENCODERS['adamt_dense']``,
:class:`~mtl_jax.models.encoders.dense_unet.DenseUNetEncoder`) and one attention U-Net decoder
per task (``DECODERS['adamt_attention']``,
:class:`~mtl_jax.models.decoders.attention_unet.AttentionUNetDecoder`), composed as a
:class:`~mtl_jax.models.multitask.MultiTaskModel`: parameters ``encoder`` and
``decoders/<task>`` only, so ``decode_task`` runs one decoder alone and gradient-magnitude
weighting (the paper's eq. 5) takes one VJP per decoder in the one forward pass.

``build_adamt(model_cfg, {task: channels})`` reads these ``config.model`` keys (all optional;
defaults = the paper):

* ``dense`` (True): DenseNet-style encoder connections; ``attention`` (True): decoder
  attention masks. The paper's ablations: plain U-Net = ``dense=False, attention=False``;
  dense encoder without decoder attention = ``dense=True, attention=False``; AdaMT-Net =
  both True. ST-Net (its single-task baseline) = this network with one task.
* ``widths`` ((64, 128, 256, 512)): encoder block widths; the decoder mirrors them.
  ``bottleneck_features`` (1024).
* ``dropout_rate`` (0.2), ``dense_pool`` (``'max'`` | ``'avg'``), ``bottleneck_kernel``
  (1 | 3): the encoder's choices where the paper is vague (see the encoder's docstring).
* ``upsample`` (``'bilinear'`` | ``'transpose'``): the decoder's ×2 up-sampling.
* ``dtype``, ``param_dtype``, ``pixel_mean``, ``pixel_std`` (:mod:`~mtl_jax.models.options`).

Other keys are ignored; bad values raise ``ValueError``. Aux: ``'<task>/attention/block{l}'``
masks ``[B, h_l, w_l, C_l]`` in [0, 1] (l = 1 the deepest block) when ``attention`` is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.decoders.attention_unet import UPSAMPLES
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.encoders.dense_unet import DENSE_POOLS
from mtl_jax.models.multitask import MultiTaskModel
from mtl_jax.models.options import pixel_stats, precision

PAPER_WIDTHS = (64, 128, 256, 512)
PAPER_BOTTLENECK = 1024

#: ``variant`` name of ``configs/adamt.py`` -> (dense, attention); ``st`` is ``adamt`` with
#: one task.
VARIANTS = {
    "adamt": (True, True),
    "unet": (False, False),
    "dense_noatt": (True, False),
    "st": (True, True),
}


def build_adamt(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """AdaMT-Net (or an ablation) for ``{task: output channels}`` (module doc)."""
    widths = tuple(int(w) for w in model_cfg.get("widths", PAPER_WIDTHS))
    dense_pool = model_cfg.get("dense_pool", "max")
    upsample = model_cfg.get("upsample", "bilinear")
    if dense_pool not in DENSE_POOLS:
        raise ValueError(f"model.dense_pool must be one of {DENSE_POOLS}, got {dense_pool!r}")
    if upsample not in UPSAMPLES:
        raise ValueError(f"model.upsample must be one of {UPSAMPLES}, got {upsample!r}")
    if not widths or min(widths) < 1:
        raise ValueError(f"model.widths must be positive channel counts, got {widths}")
    prec = precision(model_cfg)
    encoder = ENCODERS["adamt_dense"](
        widths=widths,
        bottleneck_features=int(model_cfg.get("bottleneck_features", PAPER_BOTTLENECK)),
        dense=bool(model_cfg.get("dense", True)),
        dropout_rate=float(model_cfg.get("dropout_rate", 0.2)),
        dense_pool=dense_pool,
        bottleneck_kernel=int(model_cfg.get("bottleneck_kernel", 1)),
        **prec)
    encoder._check()
    attention = bool(model_cfg.get("attention", True))
    make_decoder = DECODERS["adamt_attention"]
    decoders = {task: make_decoder(widths=widths[::-1], attention=attention, upsample=upsample,
                                   out_channels=int(channels), **prec)
                for task, channels in tasks.items()}
    return MultiTaskModel(encoder=encoder, decoders=decoders, dtype=prec["dtype"],
                          **pixel_stats(model_cfg))
