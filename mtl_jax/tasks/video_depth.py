"""Depth learned from video without depth labels (DenseMTL's "SDE" setting, Monodepth2's loss).

The head predicts a disparity in [0, 1] (a sigmoid); :func:`disp_to_depth` turns it into depth
in ``[min_depth, max_depth]`` (0.1..100 in the released configuration). The photometric loss
that trains it needs the neighbouring frames and the pose network's output, so it lives in the
self-supervised run (:mod:`mtl_jax.sde`), not in :meth:`VideoDepth.loss`.

Depth labels, when a dataset has them, are used for evaluation only, as the reference does:
per image, the prediction is scaled by ``median(gt) / median(pred)`` over the valid pixels
(Monodepth2's median scaling; torch's ``median`` is the lower middle value for an even count,
and so is ours), clamped to ``[eval_min_depth, eval_max_depth]`` (1e-3..80 m), and scored on
the pixels whose ground truth lies strictly inside that range with the metrics of
:class:`~mtl_jax.tasks.depth.DepthStats` (sums over pixels; docs/metrics.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import visualize
from mtl_jax.errors import UserError
from mtl_jax.tasks.base import Batch, Task, pixel_mask
from mtl_jax.tasks.depth import Depth, DepthStats, depth_stats


def disp_to_depth(disp: jax.Array, min_depth: float, max_depth: float) -> jax.Array:
    """Monodepth2's conversion of a sigmoid disparity ``disp`` in [0, 1] to depth:
    ``1 / (1/max_depth + (1/min_depth - 1/max_depth) * disp)``, in ``[min_depth, max_depth]``."""
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    return 1.0 / (min_disp + (max_disp - min_disp) * disp)


def lower_median(values_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
    """Per row, the lower median of ``values`` where ``mask`` (torch's ``median``: the
    ``(n-1)//2``-th smallest); 1 for a row without any masked value."""
    n = jnp.sum(mask_BxN, axis=1)
    ordered = jnp.sort(jnp.where(mask_BxN, values_BxN, jnp.inf), axis=1)
    idx = jnp.maximum(n - 1, 0) // 2
    med = jnp.take_along_axis(ordered, idx[:, None], axis=1)[:, 0]
    return jnp.where(n > 0, med, 1.0)


@dataclasses.dataclass(frozen=True)
class VideoDepth(Task):
    """Self-supervised depth (see the module docstring).

    Prediction: the sigmoid disparity ``[B, h, w, 1]``; metrics resize it to the label size
    (bilinear, half-pixel centres, as the reference's ``nn.Upsample``) when it is smaller (side
    outputs). Label (evaluation only): ``batch['depth']`` ``[B, H, W, 1]`` in metres, <= 0
    invalid. ``postprocess`` gives the unscaled depth ``disp_to_depth(pred)``.
    """

    min_depth: float = 0.1
    max_depth: float = 100.0
    eval_min_depth: float = 1e-3
    eval_max_depth: float = 80.0
    median_scaling: bool = True

    label_loss: ClassVar[bool] = False
    name: ClassVar[str] = "disp"
    letter: ClassVar[str] = "v"
    label_key: ClassVar[str] = "depth"
    resize_methods: ClassVar = {"depth": "nearest"}
    directions: ClassVar = Depth.directions
    metric_cls: ClassVar = DepthStats

    def __post_init__(self):
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"disp needs 0 < min_depth < max_depth, got {self.min_depth}, "
                             f"{self.max_depth}")
        if not 0 <= self.eval_min_depth < self.eval_max_depth:
            raise ValueError(f"disp needs 0 <= eval_min_depth < eval_max_depth, got "
                             f"{self.eval_min_depth}, {self.eval_max_depth}")

    @property
    def channels(self) -> int:
        return 1

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        del pred, batch
        raise UserError("task 'disp' learns depth from video: its photometric loss needs the "
                        "neighbouring frames and a pose network, which the self-supervised run "
                        "provides; train it with config.sde set (configs/densemtl_sde.py)")

    def postprocess(self, pred: jax.Array) -> jax.Array:
        return disp_to_depth(jnp.asarray(pred, jnp.float32), self.min_depth, self.max_depth)

    def eval_depths(self, pred: jax.Array, batch: Batch
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Median-scaled, clamped prediction, ground truth (1 where invalid) and the valid
        mask, all ``[B, H, W]``."""
        gt = jnp.asarray(batch[self.label_key], jnp.float32)[..., 0]
        b, h, w = gt.shape
        pred = jnp.asarray(pred, jnp.float32)
        if pred.shape[1:3] != (h, w):
            pred = jax.image.resize(pred, (b, h, w, pred.shape[-1]), "linear", antialias=False)
        depth = self.postprocess(pred)[..., 0]
        valid = pixel_mask(batch, (gt > self.eval_min_depth) & (gt < self.eval_max_depth))
        if self.median_scaling:
            flat_valid = valid.reshape(b, -1)
            ratio = (lower_median(gt.reshape(b, -1), flat_valid)
                     / lower_median(depth.reshape(b, -1), flat_valid))
            depth = depth * ratio[:, None, None]
        depth = jnp.clip(depth, self.eval_min_depth, self.eval_max_depth)
        return depth, jnp.where(valid, gt, 1.0), valid

    def metrics(self, pred: jax.Array, batch: Batch) -> DepthStats:
        return depth_stats(*self.eval_depths(pred, batch))

    @classmethod
    def label_picture(cls, label):
        return visualize.colorize_depth(label)

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """The prediction's own colour range: its scale is unknown (self-supervised)."""
        del label
        return visualize.colorize_depth(pred)

    def trivial_prediction(self, examples):
        """A constant disparity (0.5): after median scaling, every image's ground-truth median
        everywhere, whatever the constant."""
        del examples
        return np.array([0.5], np.float32)
