"""MTAN's SegNet baselines and PAD-Net on SegNet as architectures (docs/models/segnet.md).

* ``'segnet_split'`` -- single-task SegNet (one task) and hard sharing "Split": the whole
  SegNet shared (``encoder``), one :class:`~mtl_jax.models.decoders.segnet.SegNetHead` per task
  (``decoders/<task>``). ``model.variant``: ``standard`` | ``deep`` (every layer doubled) |
  ``wide`` (widths 64-128-256-512-1024). Separable heads: gradient-based weighting takes the
  fast decomposed path.
* ``'segnet_dense'`` -- "Dense": a shared SegNet plus one full SegNet per task reading the
  shared maps (:mod:`~mtl_jax.models.decoders.segnet_dense`); separable too.
  ``model.class_nb``: the output channels of the shared network's last block, which feeds
  nothing (MTAN's ``class_nb``, the semantic class count whatever the task set and order);
  default the ``semseg`` task's channels.
* ``'segnet_cross_stitch'`` -- one SegNet per task with cross-stitch units
  (:mod:`~mtl_jax.models.interaction.cross_stitch`); ``encoder`` = the tasks' level-0 blocks
  (the only layers that see the image), ``cross_stitch`` = the rest and the units.
* ``'segnet_padnet'`` -- PAD-Net: shared SegNet encoder, one SegNet decoder per task,
  multi-modal distillation (``padnet``), heads; ``model.initial_heads`` adds supervised
  initial predictions (side outputs).

Parameter counts (NYUv2, 13 classes; reference files count MTAN's 3 ``logsigma`` scalars, i.e.
our count with ``weighting=uw``): STL semseg 24,981,069; Split 25,055,188 / 50,807,764 /
43,934,164; Dense 123,743,995 (in any task order); Cross-stitch 74,941,807; PAD-Net 45,938,641
(no scalars).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.architectures.segnet_options import common, widths_of
from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.encoders.segnet import WIDE_WIDTHS
from mtl_jax.models.initializers import xavier_uniform
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.multitask import MultiTaskModel

#: ``model.variant`` of ``'segnet_split'``.
SPLIT_VARIANTS = ("standard", "deep", "wide")


def build_split(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """STL (one task) / Split ``model.variant`` for ``{task: channels}``."""
    variant = model_cfg.get("variant", "standard") or "standard"
    if variant not in SPLIT_VARIANTS:
        raise ValueError(f"unknown model.variant {variant!r}; valid: {list(SPLIT_VARIANTS)}")
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg, WIDE_WIDTHS if variant == "wide" else (64, 128, 256, 512,
                                                                          512))
    encoder = ENCODERS["segnet"](widths=widths, repeats=2 if variant == "deep" else 1,
                                 outputs="final", **prec)
    return MultiTaskModel(encoder=encoder,
                          decoders={t: DECODERS["segnet"](int(c), **prec)
                                    for t, c in tasks.items()},
                          **extra)


def build_dense(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """MTAN's "Dense" baseline for ``{task: channels}``."""
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg)
    class_nb = model_cfg.get("class_nb", None) or tasks.get("semseg", None)
    if not class_nb:
        raise ValueError("segnet_dense: the shared network's last block has MTAN's class_nb "
                         "output channels (the semantic class count); without a semseg task "
                         "set model.class_nb")
    return MultiTaskModel(
        encoder=ENCODERS["segnet_dense"](widths, last_channels=int(class_nb), **prec),
        decoders={t: DECODERS["segnet_dense"](int(c), widths, **prec) for t, c in tasks.items()},
        **extra)


def build_cross_stitch(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]
                       ) -> MultiTaskModel:
    """MTAN's Cross-stitch baseline for ``{task: channels}``."""
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg)
    return MultiTaskModel(
        encoder=ENCODERS["segnet_cross_stitch"](tuple(tasks), widths, **prec),
        interaction=INTERACTIONS.lookup("cross_stitch", "segnet")(tuple(tasks), widths,
                                                                  name="cross_stitch", **prec),
        decoders={t: DECODERS["segnet"](int(c), kernel_init=xavier_uniform, **prec)
                  for t, c in tasks.items()}, **extra)


def build_padnet(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """PAD-Net on SegNet for ``{task: channels}`` (≥ 2 tasks)."""
    if len(tasks) < 2:
        raise ValueError("segnet_padnet distils between tasks: it needs at least 2 tasks")
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg)
    return MultiTaskModel(
        encoder=ENCODERS["segnet"](widths=widths, outputs="encoder", **prec),
        interaction=INTERACTIONS.lookup("segnet_padnet", "segnet")(
            tuple((t, int(c)) for t, c in tasks.items()), widths,
            initial_heads=bool(model_cfg.get("initial_heads", False)), name="padnet", **prec),
        decoders={t: DECODERS["segnet"](int(c), **prec) for t, c in tasks.items()}, **extra)
