"""Semantic edges: class-weighted 2-logit cross-entropy, pixel F1 and boundary F1."""

from __future__ import annotations

import dataclasses
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


def _prf(matched_pred: jax.Array, n_pred: jax.Array, matched_gt: jax.Array, n_gt: jax.Array):
    precision = safe_div(matched_pred.astype(jnp.float32), n_pred.astype(jnp.float32))
    recall = safe_div(matched_gt.astype(jnp.float32), n_gt.astype(jnp.float32))
    return precision, recall, safe_div(2.0 * precision * recall, precision + recall)


def dilate(mask_BxHxW: jax.Array, tolerance: int) -> jax.Array:
    """Bool ``[B,H,W]``: true where ``mask`` has a true pixel in the (2t+1)x(2t+1) window."""
    if tolerance == 0:
        return mask_BxHxW
    size = 2 * tolerance + 1
    pooled = jax.lax.reduce_window(
        mask_BxHxW.astype(jnp.float32), 0.0, jax.lax.max, (1, size, size), (1, 1, 1), "SAME"
    )
    return pooled > 0


@flax.struct.dataclass
class EdgeStats(SumMetric):
    """Edge-class counts over a split.

    Pixel counts: ``tp``, ``fp``, ``fn`` of the edge class (exact pixel match).
    Boundary counts with tolerance t: ``n_pred`` predicted edge pixels and ``pred_matched`` of
    them with a ground-truth edge in their (2t+1)x(2t+1) window; ``n_gt`` ground-truth edge
    pixels and ``gt_matched`` of them with a predicted edge in their window.
    ``compute()``: pixel ``precision``, ``recall``, ``f1`` and boundary ``bprecision``,
    ``brecall``, ``bf1`` (all in [0, 1], 0 when undefined).
    """

    tp: jax.Array
    fp: jax.Array
    fn: jax.Array
    n_pred: jax.Array
    pred_matched: jax.Array
    n_gt: jax.Array
    gt_matched: jax.Array

    field_specs: ClassVar = {
        k: ((), jnp.int32)
        for k in ("tp", "fp", "fn", "n_pred", "pred_matched", "n_gt", "gt_matched")
    }

    def compute(self) -> dict[str, jax.Array]:
        p, r, f1 = _prf(self.tp, self.tp + self.fp, self.tp, self.tp + self.fn)
        bp, br, bf1 = _prf(self.pred_matched, self.n_pred, self.gt_matched, self.n_gt)
        return {
            "precision": p,
            "recall": r,
            "f1": f1,
            "bprecision": bp,
            "brecall": br,
            "bf1": bf1,
        }


@dataclasses.dataclass(frozen=True)
class Edges(Task):
    """Semantic edge detection as 2-class (background, edge) per-pixel classification.

    Prediction: logits ``[B,H,W,2]``. Target: ``batch['edges']`` int32 ``[B,H,W]`` in {0, 1},
    -1 = ignore. Loss: cross-entropy weighted by the target class (``pos_weight`` for edge,
    ``neg_weight`` for background), divided by the sum of the weights of the valid pixels.
    A pixel is predicted as edge when its edge logit exceeds its background logit. Pixels with
    label -1 count neither as predictions nor as ground truth in any metric.
    """

    pos_weight: float = 0.95
    neg_weight: float = 0.05
    tolerance: int = 1

    name: ClassVar[str] = "edges"
    letter: ClassVar[str] = "e"
    label_key: ClassVar[str] = "edges"
    discriminator_channels: ClassVar[int] = 1
    resize_methods: ClassVar = {"edges": "nearest"}
    directions: ClassVar = {
        k: True for k in ("precision", "recall", "f1", "bprecision", "brecall", "bf1")
    }
    metric_cls: ClassVar = EdgeStats

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"edges tolerance must be >= 0 pixels, got {self.tolerance}")

    @property
    def channels(self) -> int:
        return 2

    def _labels(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        labels_BxHxW = jnp.asarray(batch[self.label_key], jnp.int32)
        valid = pixel_mask(batch, (labels_BxHxW == 0) | (labels_BxHxW == 1))
        return labels_BxHxW == 1, valid

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Weighted cross-entropy of logits ``[B,H,W,2]``; float32 scalar."""
        logp = jax.nn.log_softmax(jnp.asarray(pred, jnp.float32), axis=-1)
        is_edge, valid = self._labels(batch)
        ce_BxHxW = -jnp.where(is_edge, logp[..., 1], logp[..., 0])
        weight = jnp.where(valid, jnp.where(is_edge, self.pos_weight, self.neg_weight), 0.0)
        return safe_div(jnp.sum(jnp.where(valid, weight * ce_BxHxW, 0.0)), jnp.sum(weight))

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """White edges on black (ignored label pixels dark red)."""
        return visualize.colorize_edges(pred)

    def trivial_prediction(self, examples):
        """The more frequent training label (background, in practice), everywhere."""
        labels = np.concatenate([np.ravel(e[self.label_key]) for e in examples])
        return constant_logits(2, int(np.mean(labels[labels >= 0]) > 0.5))

    @classmethod
    def discriminator_input(cls, raw):
        """The probability of the edge class, ``[B, H, W, 1]``."""
        return jax.nn.softmax(jnp.asarray(raw, jnp.float32), axis=-1)[..., 1:2]

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Edge probability ``[B,H,W]`` float32 (> 0.5 exactly when predicted as edge)."""
        return jax.nn.softmax(jnp.asarray(pred, jnp.float32), axis=-1)[..., 1]

    def metrics(self, pred: jax.Array, batch: Batch) -> EdgeStats:
        """Pixel and boundary (tolerance ``self.tolerance``) edge counts of one batch."""
        logits = jnp.asarray(pred, jnp.float32)
        is_edge, valid = self._labels(batch)
        gt = is_edge & valid
        pr = (logits[..., 1] > logits[..., 0]) & valid
        return EdgeStats(
            tp=count(pr & gt),
            fp=count(pr & ~gt),
            fn=count(~pr & gt),
            n_pred=count(pr),
            pred_matched=count(pr & dilate(gt, self.tolerance)),
            n_gt=count(gt),
            gt_matched=count(gt & dilate(pr, self.tolerance)),
        )

    def check_labels(self, batch: Batch) -> None:
        """Raise ValueError naming any ``edges`` label not in {-1, 0, 1}."""
        check_label_values(self.name, batch[self.label_key], 2)

    def count_bad_labels(self, batch: Batch) -> jax.Array:
        """Pixels of real examples whose ``edges`` label is not in {-1, 0, 1}."""
        labels_BxHxW = jnp.asarray(batch[self.label_key], jnp.int32)
        return count(pixel_mask(batch, (labels_BxHxW < -1) | (labels_BxHxW > 1)))
