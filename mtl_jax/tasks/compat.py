"""Metrics as the reference codes compute them, reported next to ours (``config.eval.compat``).

Our metrics (the tasks' ``metrics``) accumulate sums over every valid pixel of the split
(docs/metrics.md). Some papers' numbers come from code that averages differently; to compare
with them, ``config.eval.compat`` names extra modes whose statistics the eval step computes as
well (only when configured, so the default eval step is unchanged) and that are reported under
``eval/<task>/compat_<mode>/<metric>``. They never enter Δm.

Modes (``COMPAT_MODES``), per task (a task a mode does not cover reports nothing for it):

``'per_image'`` -- DenseMTL's and XTasC-Net's averaging: each metric computed on one image,
  then averaged over the images of the split that have at least one valid pixel.
  * depth (DenseMTL ``metrics/depth.py``, without its optional median scaling): ``abs_err``,
    ``abs_rel``, ``sq_rel``, ``delta1..3`` per image; ``rmse`` = sqrt(mean over images of the
    per-image MSE) (DenseMTL takes the root after averaging). Same evaluation range as ours
    (prediction clamped, ground truth outside excluded).
  * semseg (XTasC-Net): ``miou`` = mean over images of the image's mIoU over the classes
    present in its ground truth or prediction; ``pixel_acc`` per image, averaged.

``'mtan'`` -- MTAN's released code (``utils.py`` of lorenmt/mtan): per-batch values averaged
  over the eval batches (so the numbers depend on the eval batch size; MTAN's is 1 or 2).
  * depth: ``abs_err``, ``abs_rel`` over the batch's pixels with ground truth ≠ 0 (no range).
  * normals: ``mean_angle``, ``median_angle`` (the exact median of the batch, so the split's
    value is a mean of batch medians), ``within_11.25/22.5/30`` (percent); a ground-truth normal
    is invalid when its **components sum to 0**, and the ground truth is not renormalised.
  * semseg: one confusion matrix over the split (as ours), but ``miou`` is the plain mean of
    the per-class IoUs: NaN when a class is absent from both ground truth and prediction.

Statistics are sums and counts (:class:`GroupMean`: per-group values summed, number of
groups), so they merge across batches and devices like every other metric.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp

from mtl_jax.tasks.base import Batch, SumMetric, Task, count, masked_sum, pixel_mask, safe_div
from mtl_jax.tasks.depth import RATIO_EPS
from mtl_jax.tasks.normals import WITHIN_DEG
from mtl_jax.tasks.semseg import ConfusionMatrix

COMPAT_MODES = ("per_image", "mtan")


@flax.struct.dataclass
class GroupMean(SumMetric):
    """Mean over groups (images or batches) of per-group metric values.

    Fields: ``sums`` float32 ``[K]`` (per-group values of the K metrics ``names``, summed over
    groups) and ``groups`` int32 (number of groups). ``compute()``: ``{name: sums / groups}``,
    the square root of it for the names in ``sqrt_names``; 0 when there is no group.
    Build the class for given names with :func:`group_mean_cls`.
    """

    sums: jax.Array
    groups: jax.Array
    names: ClassVar[tuple[str, ...]] = ()
    sqrt_names: ClassVar[tuple[str, ...]] = ()

    def compute(self) -> dict[str, jax.Array]:
        n = self.groups.astype(jnp.float32)
        out = {}
        for i, name in enumerate(self.names):
            v = safe_div(self.sums[i], n)
            out[name] = jnp.sqrt(v) if name in self.sqrt_names else v
        return out


@functools.cache
def group_mean_cls(names: tuple[str, ...], sqrt_names: tuple[str, ...] = ()
                   ) -> type[GroupMean]:
    """The :class:`GroupMean` subclass for ``names`` (cached: one class per name tuple)."""

    @flax.struct.dataclass
    class _GroupMean(GroupMean):
        field_specs: ClassVar = {"sums": ((len(names),), jnp.float32), "groups": ((), jnp.int32)}

    _GroupMean.names = tuple(names)
    _GroupMean.sqrt_names = tuple(sqrt_names)
    _GroupMean.__name__ = _GroupMean.__qualname__ = "GroupMean_" + "_".join(names)
    return _GroupMean


def _group_means(cls: type[GroupMean], values: dict[str, jax.Array], has: jax.Array
                 ) -> GroupMean:
    """Stats of groups ``[G]`` (``values[name]`` ``[G]``, ``has`` bool ``[G]``: groups with a
    valid pixel; the others contribute nothing)."""
    sums = jnp.stack([jnp.sum(jnp.where(has, values[n], 0.0)) for n in cls.names])
    return cls(sums=sums.astype(jnp.float32), groups=count(has))


def _per_image_mean(x_BxHxW: jax.Array, valid: jax.Array) -> jax.Array:
    return safe_div(jnp.sum(jnp.where(valid, x_BxHxW, 0.0), axis=(1, 2)),
                    jnp.sum(valid, axis=(1, 2)).astype(jnp.float32))


# ----------------------------------------------------------------------------- depth
DEPTH_PER_IMAGE = group_mean_cls(
    ("abs_err", "abs_rel", "sq_rel", "rmse", "delta1", "delta2", "delta3"), ("rmse",))
DEPTH_MTAN = group_mean_cls(("abs_err", "abs_rel"))


def depth_per_image(task: Any, pred: jax.Array, batch: Batch) -> GroupMean:
    pred_BxHxW, gt, valid = task.eval_depths(pred, batch)
    err = jnp.abs(pred_BxHxW - gt)
    pos = jnp.maximum(pred_BxHxW, RATIO_EPS)
    ratio = jnp.maximum(pos / gt, gt / pos)
    values = {
        "abs_err": _per_image_mean(err, valid),
        "abs_rel": _per_image_mean(err / gt, valid),
        "sq_rel": _per_image_mean(err * err / gt, valid),
        "rmse": _per_image_mean(err * err, valid),  # mean over images of the MSE, then sqrt
        **{f"delta{k}": _per_image_mean((ratio < 1.25**k).astype(jnp.float32), valid)
           for k in (1, 2, 3)},
    }
    return _group_means(DEPTH_PER_IMAGE, values, valid.any(axis=(1, 2)))


def depth_mtan(task: Any, pred: jax.Array, batch: Batch) -> GroupMean:
    pred_BxHxW = task.postprocess(pred)[..., 0]
    gt_BxHxW = jnp.asarray(batch[task.label_key], jnp.float32)[..., 0]
    valid = pixel_mask(batch, gt_BxHxW != 0)
    gt = jnp.where(valid, gt_BxHxW, 1.0)
    err = jnp.abs(pred_BxHxW - gt)
    n = jnp.sum(valid).astype(jnp.float32)
    values = {"abs_err": safe_div(masked_sum(err, valid), n)[None],
              "abs_rel": safe_div(masked_sum(err / gt, valid), n)[None]}
    return _group_means(DEPTH_MTAN, values, valid.any()[None])


# ----------------------------------------------------------------------------- normals
NORMALS_MTAN = group_mean_cls(
    ("mean_angle", "median_angle", *(f"within_{t:g}" for t in WITHIN_DEG)))


def masked_median(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Exact median of ``x[valid]`` (NumPy's: the mean of the two middle values for an even
    count); 0 when nothing is valid. Sorts the whole array once."""
    flat = jnp.sort(jnp.where(valid, x, jnp.inf).reshape(-1))
    k = jnp.sum(valid)
    lo = flat[jnp.maximum((k - 1) // 2, 0)]
    hi = flat[jnp.maximum(k // 2, 0)]
    return jnp.where(k > 0, (lo + hi) / 2.0, 0.0)


def normals_mtan(task: Any, pred: jax.Array, batch: Batch) -> GroupMean:
    gt = jnp.asarray(batch[task.label_key], jnp.float32)
    valid = pixel_mask(batch, jnp.sum(gt, axis=-1) != 0)
    cos = jnp.sum(task.postprocess(pred) * gt, axis=-1)
    angle = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
    n = jnp.sum(valid).astype(jnp.float32)
    values = {"mean_angle": safe_div(masked_sum(angle, valid), n),
              "median_angle": masked_median(angle, valid)}
    for t in WITHIN_DEG:
        values[f"within_{t:g}"] = 100.0 * safe_div(count(valid & (angle < t)).astype(
            jnp.float32), n)
    return _group_means(NORMALS_MTAN, {k: v[None] for k, v in values.items()},
                        valid.any()[None])


# ----------------------------------------------------------------------------- semseg
SEMSEG_PER_IMAGE = group_mean_cls(("miou", "pixel_acc"))


def semseg_per_image(task: Any, pred: jax.Array, batch: Batch) -> GroupMean:
    labels, valid = task._labels(batch)
    classes = task.postprocess(pred)
    c = task.num_classes
    gt_1h = jax.nn.one_hot(labels, c, dtype=jnp.float32) * valid[..., None]
    pred_1h = jax.nn.one_hot(classes, c, dtype=jnp.float32) * valid[..., None]
    tp_BxC = jnp.sum(gt_1h * pred_1h, axis=(1, 2))
    gt_BxC, pred_BxC = jnp.sum(gt_1h, axis=(1, 2)), jnp.sum(pred_1h, axis=(1, 2))
    present = (gt_BxC + pred_BxC) > 0
    iou = safe_div(tp_BxC, gt_BxC + pred_BxC - tp_BxC)
    miou_B = safe_div(jnp.sum(jnp.where(present, iou, 0.0), axis=1),
                      jnp.sum(present, axis=1).astype(jnp.float32))
    acc_B = safe_div(jnp.sum(tp_BxC, axis=1), jnp.sum(gt_BxC, axis=1))
    return _group_means(SEMSEG_PER_IMAGE, {"miou": miou_B, "pixel_acc": acc_B},
                        valid.any(axis=(1, 2)))


@flax.struct.dataclass
class PlainMeanConfusion(ConfusionMatrix):
    """MTAN's reading of a split's confusion matrix: ``miou`` = plain mean of the per-class
    IoUs (NaN as soon as one class is absent from both ground truth and prediction),
    ``pixel_acc`` as ours."""

    def compute(self) -> dict[str, jax.Array]:
        cm = self.matrix.astype(jnp.float32)
        tp = jnp.diagonal(cm)
        union = cm.sum(axis=1) + cm.sum(axis=0) - tp
        return {"miou": jnp.mean(tp / union), "pixel_acc": safe_div(jnp.sum(tp), jnp.sum(cm))}


@functools.cache
def plain_mean_confusion_cls(num_classes: int) -> type[PlainMeanConfusion]:
    @flax.struct.dataclass
    class _Plain(PlainMeanConfusion):
        field_specs: ClassVar = {"matrix": ((num_classes, num_classes), jnp.int32)}

    _Plain.__name__ = _Plain.__qualname__ = f"PlainMeanConfusion{num_classes}"
    return _Plain


def semseg_mtan(task: Any, pred: jax.Array, batch: Batch) -> PlainMeanConfusion:
    return plain_mean_confusion_cls(task.num_classes)(matrix=task.metrics(pred, batch).matrix)


#: mode -> task name -> fn(task, pred, batch) -> statistics.
COMPAT: dict[str, dict[str, Callable[[Any, jax.Array, Batch], SumMetric]]] = {
    "per_image": {"depth": depth_per_image, "semseg": semseg_per_image},
    "mtan": {"depth": depth_mtan, "normals": normals_mtan, "semseg": semseg_mtan},
}


def parse_compat(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``config.eval.compat`` (``''``, ``'mtan'``, ``'per_image,mtan'`` or a sequence) ->
    the tuple of modes; ValueError naming the valid ones for an unknown mode."""
    if not value:
        return ()
    modes = [m.strip() for m in value.split(",")] if isinstance(value, str) else list(value)
    modes = [m for m in modes if m]
    bad = [m for m in modes if m not in COMPAT]
    if bad:
        raise ValueError(f"unknown eval.compat mode(s) {bad}; valid: {list(COMPAT_MODES)}")
    return tuple(dict.fromkeys(modes))


def compat_metrics(tasks: dict[str, Task], preds: dict[str, jax.Array], batch: Batch,
                   modes: Sequence[str]) -> dict[str, SumMetric]:
    """``{'<task>/compat_<mode>': statistics}`` for every mode and task it covers
    (jit-compatible)."""
    out = {}
    for mode in modes:
        for name, task in tasks.items():
            fn = COMPAT[mode].get(task.name)
            if fn is not None:
                out[f"{name}/compat_{mode}"] = fn(task, preds[name], batch)
    return out
