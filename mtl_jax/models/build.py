"""``build_model(model_cfg, {task: channels})``: the model a ``config.model`` dict describes.

The composition root of the models: it looks ``config.model.architecture`` (default
``'multitask'``) up in :data:`~mtl_jax.models.architectures.ARCHITECTURES` and calls that
builder; it knows no architecture itself. The model it returns follows
:class:`~mtl_jax.models.interface.MultiTaskNet`: ``tasks``; ``__call__(image, train) ->
(preds, aux)`` with ``preds = {task: [B, H, W, C] float32}`` at the input size;
``encode``/``decode``/``decode_task``. Parameters: ``encoder`` (shared), ``decoders/<task>``
(task-specific), other top-level keys for modules that couple the tasks
(``exchange_stage<k>``, ``padnet``, ``transfer/<a>_to_<b>``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from mtl_jax.models.architectures import ARCHITECTURES


def build_model(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> nn.Module:
    """Build the model ``model_cfg`` describes for ``{task: output channels}`` (module doc)."""
    if not tasks:
        raise ValueError("build_model needs at least one task")
    name = model_cfg.get("architecture", "multitask") or "multitask"
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {name!r}; valid: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](model_cfg, dict(tasks))
