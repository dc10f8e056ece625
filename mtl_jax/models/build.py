"""``build_model(model_cfg, {task: channels})``: the model a ``config.model`` dict describes.

``config.model.architecture`` names a builder in ``ARCHITECTURES`` (default ``'multitask'``,
the composed encoder → interaction/exchange → decoders model of
:mod:`~mtl_jax.models.composed`). A builder is ``builder(model_cfg, tasks) -> module`` with
``tasks = {task: output channels}`` in task order; it reads the keys of ``model_cfg`` it knows
(and ignores the others) and raises ``ValueError`` for bad values.

The module it returns follows the model API the steps use (see
:class:`~mtl_jax.models.multitask.MultiTaskModel`): ``tasks``; ``__call__(image, train) ->
(preds, aux)`` with ``preds = {task: [B, H, W, C] float32}`` at the input size; ``encode(image,
train) -> features`` (the shared part, parameters under ``encoder``) and ``decode(features,
output_size, train) -> (preds, aux)`` (everything after it); ``decode_task(features,
output_size, task, train)`` when the task heads are separable (it raises otherwise, and
gradient-based weighting then takes one VJP per task loss through all non-encoder parameters).
Parameters: ``encoder`` (shared), ``decoders/<task>`` (task-specific), other top-level keys for
modules that couple the tasks (``exchange_stage<k>``, ``padnet``, ``transfer/<a>_to_<b>``, ...).

Adding an architecture is one file under ``models/`` (its modules by kind under
``encoders/``, ``decoders/``, ``interaction/``) plus one line in ``ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from mtl_jax.models.adamt import build_adamt
from mtl_jax.models.atinet import build_atinet
from mtl_jax.models.composed import build_multitask
from mtl_jax.models.mtan import build_mtan
from mtl_jax.models.segnet_family import build_cross_stitch, build_dense, build_padnet, build_split
from mtl_jax.models.xtasc import build_xtasc

Builder = Callable[[Mapping[str, Any], Mapping[str, int]], nn.Module]

#: name -> builder(model_cfg, {task: channels}); ``config.model.architecture`` picks one.
ARCHITECTURES: dict[str, Builder] = {
    "multitask": build_multitask,
    "adamt": build_adamt,
    "xtasc": build_xtasc,
    "segnet_split": build_split,  # SegNet STL / Split standard|deep|wide (MTAN's baselines)
    "segnet_dense": build_dense,
    "segnet_cross_stitch": build_cross_stitch,
    "segnet_mtan": build_mtan,  # MTAN / STAN (seed 003)
    "segnet_padnet": build_padnet,
    "segnet_atinet": build_atinet,
}


def build_model(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> nn.Module:
    """Build the model ``model_cfg`` describes for ``{task: output channels}`` (module doc)."""
    if not tasks:
        raise ValueError("build_model needs at least one task")
    name = model_cfg.get("architecture", "multitask") or "multitask"
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {name!r}; valid: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](model_cfg, dict(tasks))
