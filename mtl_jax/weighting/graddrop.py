"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, unstack


@dataclasses.dataclass(frozen=True)
class GradDrop(GradientWeighting):
    """"Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", Chen
    et al., NeurIPS 2020.

    Per coordinate k of the per-task gradients ``g_t`` (rows of ``grads``): the sign purity
    ``P_k = (1 + sum_t g_tk / (sum_t |g_tk| + 1e-7)) / 2``; with ``U_k ~ U(0, 1)`` (from this
    step's ``rng``) the mask keeps the positive entries where ``P_k > U_k`` and the negative
    ones where ``P_k < U_k``: ``M_tk = [P_k > U_k][g_tk > 0] + [P_k < U_k][g_tk < 0]``. The
    shared update is ``sum_t g_t * (leak + (1 - leak) M_t)`` (``leak`` = 0, LibMTL's default),
    returned as ``shared_grad`` -- a per-coordinate mask is no combination of whole
    gradients.

    Default ``rep_grad=True``: like LibMTL, which only allows GradDrop on the shared
    representation (the paper applies it at the activations); ``rep_grad=False`` applies
    the same rule to the gradients of the shared parameters. Difference to LibMTL: its purity
    is computed from ``sum_batch g * sign(activation)`` per feature position (one mask for the
    whole batch); here the step hands over gradients flattened over the batch, so ``P`` and
    the mask are per coordinate of that vector (per example and position), the paper's rule
    without the batch marginalisation.

    The weights (1 each) only label the step; decoders get their plain gradients
    (``decoder_weighting = 'ones'``). Diagnostics ``kept/<task>``: the fraction of task t's
    non-zero gradient entries the mask kept.
    """

    name: ClassVar[str] = "graddrop"

    rep_grad: bool = True
    leak: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.leak <= 1.0:
            raise UserError(f"weighting 'graddrop': leak must be in [0, 1], got {self.leak!r}")

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del decoder_grads
        if rng is None:
            raise ValueError("weighting 'graddrop' needs the step's rng")
        tasks = list(losses)
        grads = self.task_grads(grads)
        purity = 0.5 * (1.0 + grads.sum(0) / (jnp.abs(grads).sum(0) + 1e-7))
        draw = jax.random.uniform(rng, purity.shape, jnp.float32)
        mask = (((purity > draw)[None] & (grads > 0)) | ((purity < draw)[None] & (grads < 0)))
        mask = mask.astype(jnp.float32)
        shared = jnp.sum(grads * (self.leak + (1.0 - self.leak) * mask), axis=0)
        nonzero = grads != 0
        kept = jnp.sum(mask * nonzero, axis=1) / jnp.maximum(jnp.sum(nonzero, axis=1), 1)
        weights = jnp.ones((len(tasks),), jnp.float32)
        return WeightingOutput(unstack(tasks, weights), state,
                               {f"kept/{t}": kept[i] for i, t in enumerate(tasks)},
                               shared_grad=shared)
