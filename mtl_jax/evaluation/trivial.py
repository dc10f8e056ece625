"""Trivial predictors: what a model must beat to have learnt anything.

Each task defines its own (``Task.trivial_prediction``):

* semseg: the majority class of the training pixels, everywhere;
* depth: the mean valid training depth, everywhere (encoded in the network's output space when
  the task regresses an encoding of depth, e.g. ``encoding='inverse_cm'``);
* normals: the mean valid training normal (normalised), everywhere;
* edges: the more frequent training label (background), everywhere;
* reconstruction: the mean training colour, everywhere.

The constants are estimated on (up to) ``max_examples`` training examples and scored on the
whole validation split with the tasks' own metrics, so the numbers are directly comparable
with a model's ``eval/`` metrics. ``normals_from_depth`` decodes examples as the pipeline does
with ``config.dataset.normals_from_depth`` (normals computed from depth and intrinsics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.augment import decode
from mtl_jax.evaluation.metrics import compute_metrics, merge_metrics


def fit_constants(train_source, tasks: Mapping[str, Any], max_examples: int = 200, *,
                  normals_from_depth: bool = False) -> dict[str, np.ndarray]:
    """Per task, the constant prediction in the task's prediction format (one pixel): the raw
    head output, e.g. the encoded depth for a depth task with an encoding."""
    n = min(len(train_source), max_examples)
    exs = [decode(train_source[i], normals_from_depth=normals_from_depth) for i in range(n)]
    return {name: np.asarray(task.trivial_prediction(exs), np.float32)
            for name, task in tasks.items()}


def evaluate_constants(val_source, tasks: Mapping[str, Any], constants: Mapping[str, Any],
                       batch_size: int = 32, *, normals_from_depth: bool = False
                       ) -> dict[str, float]:
    """Metrics ``{'<task>/<metric>': value}`` of the constant predictions on ``val_source``."""
    scored = {k: t for k, t in tasks.items() if k in constants}

    # Constants are arguments, not closures: XLA would otherwise constant-fold the big
    # broadcasts at compile time.
    @jax.jit
    def stats(batch, consts):
        b, h, w = batch["image"].shape[:3]
        preds = {k: jnp.broadcast_to(consts[k], (b, h, w, consts[k].shape[0])) for k in consts}
        return {k: t.metrics(preds[k], batch) for k, t in scored.items()}

    consts = {k: jnp.asarray(constants[k], jnp.float32) for k in scored}

    acc = None
    for start in range(0, len(val_source), batch_size):
        exs = [decode(val_source[i], normals_from_depth=normals_from_depth)
               for i in range(start, min(start + batch_size, len(val_source)))]
        batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]
                 if np.ndim(exs[0][k]) >= 2 or k == "example_mask"}
        acc = merge_metrics(acc, stats(batch, consts))
    return compute_metrics(acc)


def trivial_baseline(train_source, val_source, tasks: Mapping[str, Any],
                     max_examples: int = 200, *, normals_from_depth: bool = False
                     ) -> dict[str, float]:
    """Fit the constants on training data and score them on the validation split."""
    constants = fit_constants(train_source, tasks, max_examples,
                              normals_from_depth=normals_from_depth)
    return evaluate_constants(val_source, tasks, constants,
                              normals_from_depth=normals_from_depth)
