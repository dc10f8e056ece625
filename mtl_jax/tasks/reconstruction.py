"""Image reconstruction (auto-encoding the input): L1 loss, PSNR metric."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import visualize
from mtl_jax.tasks.base import Batch, SumMetric, Task, count, example_mask, masked_sum, safe_div

# PSNR of a perfect reconstruction (MSE = 0) is reported as this many dB instead of infinity.
MAX_PSNR_DB = 100.0


@flax.struct.dataclass
class ReconstructionStats(SumMetric):
    """Squared-error sum over a split: ``count`` values (pixels x 3 channels) and ``sum_sq``.

    ``compute()``: ``psnr`` = 10 log10(1 / MSE) dB with MSE = sum_sq / count (images in
    [0, 1]); capped at 100 dB for MSE = 0; 0 when nothing was counted.
    """

    count: jax.Array
    sum_sq: jax.Array

    field_specs: ClassVar = {"count": ((), jnp.int32), "sum_sq": ((), jnp.float32)}

    def compute(self) -> dict[str, jax.Array]:
        mse = safe_div(self.sum_sq, self.count.astype(jnp.float32))
        psnr = -10.0 * jnp.log10(jnp.maximum(mse, 10.0 ** (-MAX_PSNR_DB / 10.0)))
        return {"psnr": jnp.where(self.count > 0, psnr, 0.0)}


@dataclasses.dataclass(frozen=True)
class Reconstruction(Task):
    """Reconstruct ``batch['image']`` (float32 ``[B,H,W,3]`` in [0, 1]).

    Prediction: ``[B,H,W,3]``. Loss: mean |p - image| over all values of the real examples.
    Metric: PSNR of the prediction clipped to [0, 1] (``postprocess``), MSE accumulated per
    value over the split.
    """

    name: ClassVar[str] = "reconstruction"
    letter: ClassVar[str] = "r"
    label_key: ClassVar[str] = "image"
    resize_methods: ClassVar = {"image": "linear"}
    directions: ClassVar = {"psnr": True}
    metric_cls: ClassVar = ReconstructionStats

    @property
    def channels(self) -> int:
        return 3

    def _valid(self, batch: Batch, shape: tuple[int, ...]) -> jax.Array:
        mask_B = example_mask(batch, shape[0]) > 0
        return jnp.broadcast_to(mask_B.reshape((-1,) + (1,) * (len(shape) - 1)), shape)

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Mean absolute error over the values of real examples; float32 scalar."""
        pred = jnp.asarray(pred, jnp.float32)
        image = jnp.asarray(batch[self.label_key], jnp.float32)
        valid = self._valid(batch, pred.shape)
        return safe_div(masked_sum(jnp.abs(pred - image), valid), jnp.sum(valid))

    @classmethod
    def prediction_picture(cls, pred, label=None):
        """The image itself."""
        return visualize.to_uint8_image(pred)

    def trivial_prediction(self, examples):
        """The mean training colour, everywhere."""
        pixels = np.concatenate([np.reshape(e[self.label_key], (-1, 3)) for e in examples])
        return pixels.mean(0)

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Image ``[B,H,W,3]`` float32 clipped to [0, 1]."""
        return jnp.clip(jnp.asarray(pred, jnp.float32), 0.0, 1.0)

    def metrics(self, pred: jax.Array, batch: Batch) -> ReconstructionStats:
        """Squared-error sums of one batch."""
        pred = self.postprocess(pred)
        image = jnp.asarray(batch[self.label_key], jnp.float32)
        valid = self._valid(batch, pred.shape)
        return ReconstructionStats(
            count=count(valid), sum_sq=masked_sum((pred - image) ** 2, valid)
        )
