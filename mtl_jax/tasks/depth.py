"""Depth estimation: L1 / berHu / per-image L1 losses, per-pixel error metrics, and the
optional inverse-depth encoding of the regression target (DenseMTL)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import visualize
from mtl_jax.tasks.base import Batch, SumMetric, Task, count, masked_sum, pixel_mask, safe_div

DEPTH_LOSSES = ("l1", "berhu", "l1_per_image")
DEPTH_ENCODINGS = ("none", "inverse_cm")
BERHU_NORMS = ("valid", "all")
# 'inverse_cm': v = INVERSE_CM_SCALE / (100 * depth_m + 1) (DenseMTL's released normalisation).
INVERSE_CM_SCALE = 65536.0
# Decoding clamps v to at least this value, i.e. depth <= (65536 / 1 - 1) / 100 = 655.35 m, so
# that a prediction <= 0 never turns into an infinite or negative-infinite depth.
INVERSE_CM_MIN = 1.0
# Predictions at or below zero are clamped to this value (metres) in the delta ratios and the
# log error only.
RATIO_EPS = 1e-6
# berHu threshold c = BERHU_FRACTION * max |residual| over the valid pixels of the batch.
BERHU_FRACTION = 0.2


def _check_encoding(encoding: str) -> None:
    if encoding not in DEPTH_ENCODINGS:
        raise ValueError(f"depth encoding must be one of {DEPTH_ENCODINGS}, got {encoding!r}")


def encode_depth(depth_m: jax.Array, encoding: str) -> jax.Array:
    """Metric depth (metres) -> the value the network regresses (float32).

    ``'none'``: ``v = depth_m``. ``'inverse_cm'`` (DenseMTL's released normalisation):
    ``v = 65536 / (depth_cm + 1)`` with ``depth_cm = 100 * depth_m``; it maps 0 m to 65536 and
    decreases monotonically (1 m -> 648.87, 10 m -> 65.47, 100 m -> 6.55). Invalid depths
    (``<= 0``) are encoded like any other value; losses mask them out.
    """
    _check_encoding(encoding)
    d = jnp.asarray(depth_m, jnp.float32)
    if encoding == "none":
        return d
    return INVERSE_CM_SCALE / (100.0 * d + 1.0)


def decode_depth(v: jax.Array, encoding: str) -> jax.Array:
    """The network's output -> metric depth in metres (float32); the exact inverse of
    :func:`encode_depth`.

    ``'none'``: ``depth_m = v``. ``'inverse_cm'``: ``depth_m = (65536 / v - 1) / 100`` with
    ``v`` first clamped to ``v >= 1`` (so ``depth_m <= 655.35``): predictions ``<= 0`` would
    otherwise decode to infinite or negative depths. Encoded depths of 0..655.35 m are
    ``>= 1`` and round-trip exactly (to float32 rounding).
    """
    _check_encoding(encoding)
    v = jnp.asarray(v, jnp.float32)
    if encoding == "none":
        return v
    return (INVERSE_CM_SCALE / jnp.maximum(v, INVERSE_CM_MIN) - 1.0) / 100.0


@flax.struct.dataclass
class DepthStats(SumMetric):
    """Per-pixel depth error sums over a split.

    Fields: ``count`` valid pixels; ``sum_abs`` of |p-g|; ``sum_absrel`` of |p-g|/g;
    ``sum_sq`` of (p-g)^2; ``sum_sqrel`` of (p-g)^2/g; ``sum_sqlog`` of (ln p - ln g)^2;
    ``count_d1/2/3`` pixels with max(p/g, g/p) < 1.25^k.
    ``compute()``: ``abs_err``, ``abs_rel``, ``sq_rel``, ``rmse`` (metres or the dataset's
    unit), ``rmse_log`` (natural log) and ``delta1``, ``delta2``, ``delta3`` (fractions in
    [0, 1]); all 0 when no pixel is valid.
    """

    count: jax.Array
    sum_abs: jax.Array
    sum_absrel: jax.Array
    sum_sq: jax.Array
    sum_sqrel: jax.Array
    sum_sqlog: jax.Array
    count_d1: jax.Array
    count_d2: jax.Array
    count_d3: jax.Array

    field_specs: ClassVar = {
        "count": ((), jnp.int32),
        "sum_abs": ((), jnp.float32),
        "sum_absrel": ((), jnp.float32),
        "sum_sq": ((), jnp.float32),
        "sum_sqrel": ((), jnp.float32),
        "sum_sqlog": ((), jnp.float32),
        "count_d1": ((), jnp.int32),
        "count_d2": ((), jnp.int32),
        "count_d3": ((), jnp.int32),
    }

    def compute(self) -> dict[str, jax.Array]:
        n = self.count.astype(jnp.float32)
        return {
            "abs_err": safe_div(self.sum_abs, n),
            "abs_rel": safe_div(self.sum_absrel, n),
            "sq_rel": safe_div(self.sum_sqrel, n),
            "rmse": jnp.sqrt(safe_div(self.sum_sq, n)),
            "rmse_log": jnp.sqrt(safe_div(self.sum_sqlog, n)),
            "delta1": safe_div(self.count_d1.astype(jnp.float32), n),
            "delta2": safe_div(self.count_d2.astype(jnp.float32), n),
            "delta3": safe_div(self.count_d3.astype(jnp.float32), n),
        }


@dataclasses.dataclass(frozen=True, init=False)
class Depth(Task):
    """Depth regression.

    Prediction: ``[B,H,W,1]`` in the target's unit, or its encoding (below). Target:
    ``batch['depth']`` float32 ``[B,H,W,1]``, 0 (or any value <= 0) = invalid.

    Encoding (constructor argument ``encoding=``): what the network regresses.
      'none': the depth itself (default).
      'inverse_cm': ``v = 65536 / (100 * depth_m + 1)`` (DenseMTL's released normalisation;
        the target must be in metres). The loss compares the prediction with the encoded
        target; ``postprocess`` (hence metrics and pictures) decodes it back to metres with
        the exact inverse ``(65536 / max(v, 1) - 1) / 100`` (see :func:`decode_depth`).

    Output scale (constructor argument ``output_scale=``, default 1): the encoded value is
      ``v = output_scale * head output``. With the 'inverse_cm' encoding targets are in the
      hundreds; a scale of e.g. 100 lets a freshly initialised head (outputs near 0) reach them
      in a short run without changing the loss's magnitude (Adam moves the head's output by
      ~lr per step whatever the scale of its target).

    Losses (constructor argument ``loss=``, stored as ``loss_type`` because ``loss`` is the
    method), with ``p = output_scale * head output`` and ``g`` the encoded target:
      'l1': mean |p-g| over all valid pixels of the batch.
      'berhu': mean berHu(p-g) over valid pixels; berHu(r) = |r| if |r| <= c else
        (r^2 + c^2) / (2c), c = 0.2 * max |r| over the valid pixels of the batch, with the
        gradient stopped through c.
      'l1_per_image': per-image mean |p-g| over its valid pixels, averaged over the images
        that have at least one valid pixel (XTasC-Net).

    berHu normalisation (constructor argument ``berhu_norm=``): 'valid' (default) divides the
      summed berHu by the number of valid pixels; 'all' by the number of pixels of the batch
      (real examples), invalid pixels contributing 0 -- DenseMTL's released loss, which is the
      'valid' loss times the batch's valid fraction.

    Evaluation range (constructor arguments ``min_depth=``, ``max_depth=``, in the target's
      unit; default 0 and ``None`` = no range): metrics count only ground truth with
      ``min_depth < g < max_depth`` (``g > 0`` always) and clamp the prediction to
      ``[min_depth, max_depth]`` first (KITTI convention, DenseMTL: 1e-3..80 m). Datasets
      declare their range (``TASK_DEFAULTS`` of the builder: VKITTI2, Synthia, Cityscapes
      1e-3..80 m, NYUv2 / NYUD-MT 1e-3..10 m); config options override it. Losses ignore the
      range (the references train on every valid pixel).
    """

    loss_type: str = "l1"
    encoding: str = "none"
    output_scale: float = 1.0
    berhu_norm: str = "valid"
    min_depth: float = 0.0
    max_depth: float | None = None

    name: ClassVar[str] = "depth"
    letter: ClassVar[str] = "d"
    label_key: ClassVar[str] = "depth"
    resize_methods: ClassVar = {"depth": "nearest"}
    directions: ClassVar = {
        "abs_err": False,
        "abs_rel": False,
        "sq_rel": False,
        "rmse": False,
        "rmse_log": False,
        "delta1": True,
        "delta2": True,
        "delta3": True,
    }
    metric_cls: ClassVar = DepthStats

    def __init__(self, loss: str = "l1", encoding: str = "none", output_scale: float = 1.0,
                 berhu_norm: str = "valid", min_depth: float = 0.0,
                 max_depth: float | None = None) -> None:
        object.__setattr__(self, "loss_type", loss)
        object.__setattr__(self, "encoding", encoding)
        object.__setattr__(self, "output_scale", float(output_scale))
        object.__setattr__(self, "berhu_norm", berhu_norm)
        object.__setattr__(self, "min_depth", float(min_depth or 0.0))
        object.__setattr__(self, "max_depth", None if max_depth is None else float(max_depth))
        if berhu_norm not in BERHU_NORMS:
            raise ValueError(f"depth berhu_norm must be one of {BERHU_NORMS}, got {berhu_norm!r}")
        if self.min_depth < 0 or (self.max_depth is not None
                                  and not self.max_depth > self.min_depth):
            raise ValueError(f"depth range needs 0 <= min_depth < max_depth, got "
                             f"min_depth={min_depth!r}, max_depth={max_depth!r}")
        if not self.output_scale > 0:
            raise ValueError(f"depth output_scale must be > 0, got {output_scale!r}")
        if self.loss_type not in DEPTH_LOSSES:
            raise ValueError(f"depth loss must be one of {DEPTH_LOSSES}, got {self.loss_type!r}")
        _check_encoding(self.encoding)

    @property
    def channels(self) -> int:
        return 1

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Metric depth (the target's unit) of a raw prediction: :func:`decode_depth` of
        ``output_scale * pred``."""
        return decode_depth(self._scaled(pred), self.encoding)

    def _scaled(self, pred: jax.Array) -> jax.Array:
        pred = jnp.asarray(pred, jnp.float32)
        return pred if self.output_scale == 1.0 else pred * self.output_scale

    def raw_prediction(self, depth: jax.Array) -> jax.Array:
        """The head output whose postprocessed value is ``depth`` (the target's unit): the
        inverse of :meth:`postprocess`, e.g. for constant-predictor baselines."""
        return encode_depth(depth, self.encoding) / self.output_scale

    @classmethod
    def label_picture(cls, label):
        """A colour ramp over the 1st-99th percentile of the valid depths (invalid black)."""
        return visualize.colorize_depth(label)

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """The label's colour range when the label is known (invalid predictions, <= 0, drawn
        at the near end); else the prediction's own."""
        if label is None:
            return visualize.colorize_depth(pred)
        valid = label > 0
        lo, hi = np.percentile(label[valid], [1, 99]) if valid.any() else (0.0, 1.0)
        return visualize.colorize_depth(np.maximum(pred, 1e-6), lo, hi)

    def trivial_prediction(self, examples):
        """The mean valid training depth, everywhere, in the head's output space (encoded)."""
        depth = np.concatenate([np.ravel(e[self.label_key]) for e in examples])
        mean_m = np.array([depth[depth > 0].mean()], np.float32)
        return np.asarray(self.raw_prediction(mean_m), np.float32)

    @classmethod
    def discriminator_input(cls, raw):
        """The raw output min-max normalised per image to [0, 1] (scale-invariant)."""
        x = jnp.asarray(raw, jnp.float32)
        lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
        return (x - lo) / jnp.maximum(hi - lo, 1e-8)

    def _residual(self, pred: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Residual p - encode(g) (0 where invalid) and valid mask, both ``[B,H,W]``
        float32/bool."""
        pred_BxHxW = self._scaled(pred)[..., 0]
        gt_BxHxW = jnp.asarray(batch[self.label_key], jnp.float32)[..., 0]
        valid = pixel_mask(batch, gt_BxHxW > 0)
        target = encode_depth(jnp.where(valid, gt_BxHxW, 1.0), self.encoding)
        return jnp.where(valid, pred_BxHxW - target, 0.0), valid

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Depth loss (see class docstring) of ``pred`` ``[B,H,W,1]``; float32 scalar."""
        r, valid = self._residual(pred, batch)
        abs_r = jnp.abs(r)
        if self.loss_type == "l1_per_image":
            per_image = safe_div(abs_r.sum(axis=(1, 2)), valid.sum(axis=(1, 2)))
            has_pixels = valid.any(axis=(1, 2))
            return safe_div(jnp.sum(per_image), jnp.sum(has_pixels))
        if self.loss_type == "berhu":
            c = jax.lax.stop_gradient(BERHU_FRACTION * jnp.max(abs_r))
            # With c == 0 every residual is 0 and the |r| branch is taken; the guard only keeps
            # the unused branch finite.
            quad = (r * r + c * c) / (2.0 * jnp.maximum(c, 1e-12))
            per_pixel = jnp.where(abs_r <= c, abs_r, quad)
            if self.berhu_norm == "all":
                real = pixel_mask(batch, jnp.ones(valid.shape, bool))
                return safe_div(masked_sum(per_pixel, valid), jnp.sum(real))
        else:
            per_pixel = abs_r
        return safe_div(masked_sum(per_pixel, valid), jnp.sum(valid))

    @property
    def has_range(self) -> bool:
        """Whether an evaluation range is set (``min_depth > 0`` or a ``max_depth``)."""
        return self.min_depth > 0 or self.max_depth is not None

    def eval_depths(self, pred: jax.Array, batch: Batch
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Prediction (clamped to the evaluation range), ground truth (1 where invalid) and the
        valid mask for the metrics, all ``[B,H,W]`` (float32, float32, bool)."""
        pred_BxHxW = self.postprocess(pred)[..., 0]
        gt_BxHxW = jnp.asarray(batch[self.label_key], jnp.float32)[..., 0]
        in_range = (gt_BxHxW > 0) & (gt_BxHxW > self.min_depth)
        if self.max_depth is not None:
            in_range = in_range & (gt_BxHxW < self.max_depth)
        if self.has_range:
            hi = jnp.inf if self.max_depth is None else self.max_depth
            pred_BxHxW = jnp.clip(pred_BxHxW, self.min_depth, hi)
        valid = pixel_mask(batch, in_range)
        return pred_BxHxW, jnp.where(valid, gt_BxHxW, 1.0), valid

    def metrics(self, pred: jax.Array, batch: Batch) -> DepthStats:
        """Per-pixel error sums of one batch (in the evaluation range, if any)."""
        return depth_stats(*self.eval_depths(pred, batch))


def depth_stats(pred_BxHxW: jax.Array, gt_safe: jax.Array, valid: jax.Array) -> DepthStats:
    """The :class:`DepthStats` sums of predicted vs ground-truth depths over ``valid`` pixels
    (``gt_safe``: the ground truth, any positive value where invalid)."""
    err = jnp.abs(pred_BxHxW - gt_safe)
    pred_pos = jnp.maximum(pred_BxHxW, RATIO_EPS)
    ratio = jnp.maximum(pred_pos / gt_safe, gt_safe / pred_pos)
    log_err = jnp.log(pred_pos) - jnp.log(gt_safe)
    return DepthStats(
        count=count(valid),
        sum_abs=masked_sum(err, valid),
        sum_absrel=masked_sum(err / gt_safe, valid),
        sum_sq=masked_sum(err * err, valid),
        sum_sqrel=masked_sum(err * err / gt_safe, valid),
        sum_sqlog=masked_sum(log_err * log_err, valid),
        count_d1=count(valid & (ratio < 1.25)),
        count_d2=count(valid & (ratio < 1.25**2)),
        count_d3=count(valid & (ratio < 1.25**3)),
    )
