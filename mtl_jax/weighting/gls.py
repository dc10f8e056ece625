"""GLS: geometric loss strategy (Chennupati et al., CVPR-W 2019)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class GLS(Weighting):
    """"MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning", Chennupati et al., CVPR Workshops 2019.

    Objective: the geometric mean of the losses ``G = (prod_t L_t)^(1/T)``, whose gradient is
    ``sum_t (G / (T L_t)) grad L_t``: the weights are ``w_t = G / (T L_t)`` (losses clamped
    below at ``min_loss`` = 1e-8), so ``sum_t w_t L_t = G``. No state, no hyper-parameter
    (LibMTL has none either).
    """

    name: ClassVar[str] = "gls"

    min_loss: float = 1e-8

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        values = jnp.maximum(stack_losses(losses), self.min_loss)
        geometric = jnp.exp(jnp.mean(jnp.log(values)))
        weights = geometric / (len(tasks) * values)
        return WeightingOutput(unstack(tasks, weights), state, {"geometric_mean": geometric})
