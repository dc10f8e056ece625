"""Semantic segmentation: per-pixel cross-entropy, confusion-matrix metrics."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import visualize
from mtl_jax.tasks.base import (
    Batch,
    SumMetric,
    Task,
    check_label_values,
    constant_logits,
    count,
    pixel_mask,
    safe_div,
)


@flax.struct.dataclass
class ConfusionMatrix(SumMetric):
    """Confusion matrix accumulated over a split: ``matrix[gt, pred]`` int32 ``[C, C]``.

    ``compute()`` gives ``miou`` (mean IoU over the classes present in the ground truth or in
    the prediction; classes absent from both are skipped; 0 when no class is present),
    ``pixel_acc`` (correct / valid pixels) and, when ``per_class_iou``, ``iou/<c>`` for every
    class (NaN for a class absent from both ground truth and prediction: undefined).
    Build the class for a given C with ``confusion_matrix_cls``.
    """

    matrix: jax.Array
    per_class_iou: ClassVar[bool] = False

    def compute(self) -> dict[str, jax.Array]:
        cm = self.matrix.astype(jnp.float32)
        tp = jnp.diagonal(cm)
        gt_c, pred_c = cm.sum(axis=1), cm.sum(axis=0)
        union = gt_c + pred_c - tp
        present = (gt_c + pred_c) > 0
        iou = safe_div(tp, union)
        out = {
            "miou": safe_div(jnp.sum(jnp.where(present, iou, 0.0)), jnp.sum(present)),
            "pixel_acc": safe_div(jnp.sum(tp), jnp.sum(cm)),
        }
        if self.per_class_iou:
            for c in range(cm.shape[0]):
                out[f"iou/{c}"] = jnp.where(present[c], iou[c], jnp.nan)
        return out


@functools.cache
def confusion_matrix_cls(num_classes: int, per_class_iou: bool = False) -> type[ConfusionMatrix]:
    """The ``ConfusionMatrix`` subclass for ``num_classes`` classes (cached: one class per C)."""

    @flax.struct.dataclass
    class _ConfusionMatrixC(ConfusionMatrix):
        field_specs: ClassVar = {"matrix": ((num_classes, num_classes), jnp.int32)}

    _ConfusionMatrixC.per_class_iou = per_class_iou
    _ConfusionMatrixC.__name__ = f"ConfusionMatrix{num_classes}"
    _ConfusionMatrixC.__qualname__ = _ConfusionMatrixC.__name__
    return _ConfusionMatrixC


@dataclasses.dataclass(frozen=True)
class SemSeg(Task):
    """Semantic segmentation over ``num_classes`` classes.

    Prediction: logits ``[B,H,W,C]``. Target: ``batch['semseg']`` int32 ``[B,H,W]``,
    ``ignore_index`` (-1 by the batch contract) = ignore. Any other label outside ``[0, C)`` is
    also ignored inside jit (it never reaches the confusion matrix); ``check_labels`` reports
    such labels on the host.

    Loss: cross-entropy averaged over valid pixels of the batch; with ``class_weights`` the
    weighted mean ``sum(w_y * ce) / sum(w_y)``.
    """

    num_classes: int
    class_weights: Sequence[float] | None = None
    ignore_index: int = -1
    per_class_iou: bool = False

    name: ClassVar[str] = "semseg"
    letter: ClassVar[str] = "s"
    label_key: ClassVar[str] = "semseg"
    resize_methods: ClassVar = {"semseg": "nearest"}

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if len(weights) != self.num_classes:
                raise ValueError(
                    f"class_weights has {len(weights)} entries, num_classes={self.num_classes}"
                )
            object.__setattr__(self, "class_weights", weights)

    @property
    def channels(self) -> int:
        return self.num_classes

    @property
    def directions(self) -> dict[str, bool]:  # type: ignore[override]
        out = {"miou": True, "pixel_acc": True}
        if self.per_class_iou:
            out.update({f"iou/{c}": True for c in range(self.num_classes)})
        return out

    @property
    def metric_cls(self) -> type[ConfusionMatrix]:  # type: ignore[override]
        return confusion_matrix_cls(self.num_classes, self.per_class_iou)

    def _labels(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Labels clipped into ``[0, C)`` and the valid-pixel mask ``[B,H,W]``."""
        labels_BxHxW = jnp.asarray(batch[self.label_key], jnp.int32)
        in_range = (labels_BxHxW >= 0) & (labels_BxHxW < self.num_classes)
        in_range = in_range & (labels_BxHxW != self.ignore_index)
        valid = pixel_mask(batch, in_range)
        return jnp.clip(labels_BxHxW, 0, self.num_classes - 1), valid

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Cross-entropy of logits ``[B,H,W,C]``, mean over valid pixels (float32 scalar)."""
        logits_BxHxWxC = jnp.asarray(pred, jnp.float32)
        labels, valid = self._labels(batch)
        logp = jax.nn.log_softmax(logits_BxHxWxC, axis=-1)
        ce_BxHxW = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        weight_BxHxW = valid.astype(jnp.float32)
        if self.class_weights is not None:
            weight_BxHxW = weight_BxHxW * jnp.asarray(self.class_weights, jnp.float32)[labels]
        num = jnp.sum(jnp.where(valid, ce_BxHxW * weight_BxHxW, 0.0))
        return safe_div(num, jnp.sum(weight_BxHxW))

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """Colour per class (void black)."""
        return visualize.colorize_semseg(pred)

    def trivial_prediction(self, examples):
        """The majority class of the training pixels (labels >= 0), everywhere."""
        labels = np.concatenate([np.ravel(e[self.label_key]) for e in examples])
        counts = np.bincount(labels[labels >= 0], minlength=self.channels)
        return constant_logits(self.channels, int(np.argmax(counts)))

    @classmethod
    def discriminator_input(cls, raw):
        """ADVENT's weighted self-information ``-p log2 p / log2 C`` per class channel (each
        value in [0, 1 / (e ln C)]; their sum over channels is the normalised entropy)."""
        logits = jnp.asarray(raw, jnp.float32)
        p = jax.nn.softmax(logits, axis=-1)
        return -p * jax.nn.log_softmax(logits, axis=-1) / jnp.log(float(logits.shape[-1]))

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Class ids int32 ``[B,H,W]`` (argmax of the logits)."""
        return jnp.argmax(jnp.asarray(pred, jnp.float32), axis=-1).astype(jnp.int32)

    def metrics(self, pred: jax.Array, batch: Batch) -> ConfusionMatrix:
        """Confusion matrix of one batch (rows = ground truth, columns = prediction)."""
        labels, valid = self._labels(batch)
        c = self.num_classes
        index = (labels * c + self.postprocess(pred)).reshape(-1)
        counts = jnp.zeros((c * c,), jnp.int32).at[index].add(valid.reshape(-1).astype(jnp.int32))
        return self.metric_cls(matrix=counts.reshape(c, c))

    def check_labels(self, batch: Batch) -> None:
        """Raise ValueError naming any label not in ``[0, num_classes)`` nor ``ignore_index``."""
        check_label_values(self.name, batch[self.label_key], self.num_classes, self.ignore_index)

    def count_bad_labels(self, batch: Batch) -> jax.Array:
        """Pixels of real examples whose label is outside ``[0, C)`` and not ``ignore_index``."""
        labels_BxHxW = jnp.asarray(batch[self.label_key], jnp.int32)
        bad = (labels_BxHxW < 0) | (labels_BxHxW >= self.num_classes)
        return count(pixel_mask(batch, bad & (labels_BxHxW != self.ignore_index)))
