"""Surface normals: 1 - cosine loss, angle-error metrics with an exact-enough median."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import visualize
from mtl_jax.tasks.base import Batch, SumMetric, Task, count, masked_sum, pixel_mask, safe_div

# Angle histogram for the median: HIST_BINS bins of HIST_BIN_DEG degrees over [0, 180].
HIST_BIN_DEG = 0.05
HIST_BINS = 3600
WITHIN_DEG = (11.25, 22.5, 30.0)
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / |x|`` along ``axis`` in float32; a zero vector stays zero (finite gradients)."""
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


@flax.struct.dataclass
class NormalStats(SumMetric):
    """Angle-error statistics over a split, per valid pixel.

    Fields: ``count``; ``sum_angle`` (degrees); ``sum_sq_angle`` (degrees²); ``count_within``
    int32 ``[3]`` (angle < 11.25, 22.5, 30 degrees); ``hist`` int32 ``[3600]``: bin k counts
    angles in [0.05 k, 0.05 (k+1)) degrees (180 falls in the last bin).

    ``compute()``: ``mean_angle``, ``median_angle``, ``rmse_angle`` (degrees) and ``within_11.25``,
    ``within_22.5``, ``within_30`` (percent). The median is the angle at which the cumulative
    histogram reaches half the count, interpolated linearly inside its 0.05-degree bin: it is
    within 0.05 degrees of the exact median of all valid pixels of the split.
    """

    count: jax.Array
    sum_angle: jax.Array
    sum_sq_angle: jax.Array
    count_within: jax.Array
    hist: jax.Array

    field_specs: ClassVar = {
        "count": ((), jnp.int32),
        "sum_angle": ((), jnp.float32),
        "sum_sq_angle": ((), jnp.float32),
        "count_within": ((len(WITHIN_DEG),), jnp.int32),
        "hist": ((HIST_BINS,), jnp.int32),
    }

    def compute(self) -> dict[str, jax.Array]:
        n = self.count.astype(jnp.float32)
        cum = jnp.cumsum(self.hist)
        half = n / 2.0
        k = jnp.argmax(cum.astype(jnp.float32) >= half)
        below = (cum[k] - self.hist[k]).astype(jnp.float32)
        frac = safe_div(half - below, self.hist[k].astype(jnp.float32))
        median = jnp.where(n > 0, (k.astype(jnp.float32) + frac) * HIST_BIN_DEG, 0.0)
        out = {"mean_angle": safe_div(self.sum_angle, n), "median_angle": median,
               "rmse_angle": jnp.sqrt(safe_div(self.sum_sq_angle, n))}
        for i, thr in enumerate(WITHIN_DEG):
            out[f"within_{thr:g}"] = 100.0 * safe_div(self.count_within[i].astype(jnp.float32), n)
        return out


@dataclasses.dataclass(frozen=True)
class Normals(Task):
    """Surface normal estimation.

    Prediction: raw head output ``[B,H,W,3]`` (normalised by ``postprocess``). Target:
    ``batch['normals']`` float32 ``[B,H,W,3]`` unit vectors, all-zero = invalid.
    Loss: 1 - cos(pred, gt) averaged over valid pixels, both vectors L2-normalised along the
    channel (last) axis. Angle for the metrics: arccos(clip(dot, -1, 1)) in degrees.
    """

    name: ClassVar[str] = "normals"
    letter: ClassVar[str] = "n"
    label_key: ClassVar[str] = "normals"
    # Linear resizing shortens vectors; the loss and metrics renormalise the target.
    resize_methods: ClassVar = {"normals": "linear"}
    directions: ClassVar = {
        "mean_angle": False,
        "median_angle": False,
        "rmse_angle": False,
        **{f"within_{thr:g}": True for thr in WITHIN_DEG},
    }
    metric_cls: ClassVar = NormalStats

    @property
    def channels(self) -> int:
        return 3

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """``(n + 1) / 2`` as RGB (all-zero, invalid, black)."""
        return visualize.colorize_normals(pred)

    def trivial_prediction(self, examples):
        """The mean valid training normal, normalised, everywhere."""
        normals = np.concatenate([np.reshape(e[self.label_key], (-1, 3)) for e in examples])
        mean = normals[np.any(normals != 0, axis=1)].mean(0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)

    @classmethod
    def discriminator_input(cls, raw):
        """The output scaled to unit length per pixel."""
        x = jnp.asarray(raw, jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Unit normals ``[B,H,W,3]`` float32 (a zero prediction stays zero)."""
        return l2_normalize(pred, axis=-1)

    def _cosine(self, pred: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """cos(pred, gt) ``[B,H,W]`` (float32) and the valid mask ``[B,H,W]``."""
        gt_BxHxWx3 = jnp.asarray(batch[self.label_key], jnp.float32)
        valid = pixel_mask(batch, jnp.sum(gt_BxHxWx3 * gt_BxHxWx3, axis=-1) > 0)
        cos_BxHxW = jnp.sum(self.postprocess(pred) * l2_normalize(gt_BxHxWx3), axis=-1)
        return cos_BxHxW, valid

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Mean of 1 - cos over valid pixels; float32 scalar."""
        cos_BxHxW, valid = self._cosine(pred, batch)
        return safe_div(masked_sum(1.0 - cos_BxHxW, valid), jnp.sum(valid))

    def metrics(self, pred: jax.Array, batch: Batch) -> NormalStats:
        """Angle statistics of one batch."""
        cos_BxHxW, valid = self._cosine(pred, batch)
        angle = jnp.degrees(jnp.arccos(jnp.clip(cos_BxHxW, -1.0, 1.0)))
        bins = jnp.clip(jnp.floor(angle / HIST_BIN_DEG).astype(jnp.int32), 0, HIST_BINS - 1)
        hist = (
            jnp.zeros((HIST_BINS,), jnp.int32)
            .at[bins.reshape(-1)]
            .add(valid.reshape(-1).astype(jnp.int32))
        )
        within = jnp.stack([count(valid & (angle < thr)) for thr in WITHIN_DEG])
        return NormalStats(
            count=count(valid),
            sum_angle=masked_sum(angle, valid),
            sum_sq_angle=masked_sum(angle * angle, valid),
            count_within=within,
            hist=hist,
        )
