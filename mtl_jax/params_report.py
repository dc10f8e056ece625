"""Parameter counts of the model a config describes (shapes only: nothing is allocated)."""

from __future__ import annotations

import jax
import numpy as np

from mtl_jax.experiment import build_tasks
from mtl_jax.models import build_model, count_params


def param_counts(config) -> dict[str, int]:
    """``{part: count, ..., 'total': count}`` for ``config.model`` with ``config.tasks``."""
    tasks = build_tasks(config)
    model = build_model(config.model, {name: task.channels for name, task in tasks.items()})
    h, w = config.input_size
    shapes = jax.eval_shape(
        lambda r: model.init({"params": r, "dropout": r}, np.zeros((1, h, w, 3), np.float32),
                             train=False)["params"], jax.random.key(0))
    return count_params(shapes)
