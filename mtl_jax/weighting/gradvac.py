"""GradVac: gradient vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    check_choice,
    combination_norm,
    gram_matrix,
    gram_norms,
    off_diagonal_mean,
    task_permutations,
    unstack,
)

_EMA_UPDATES = ("always", "on_adjust")


@dataclasses.dataclass(frozen=True)
class GradVac(GradientWeighting):
    """"Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models", Wang et al., ICLR 2021, Algorithm 1 (whole-model granularity, as
    LibMTL's default ``GradVac_group_type=0``).

    State: ``rho [T, T]``, the EMA targets ``phi_hat_ij`` of the cosine similarities (0 at
    the start). For every task i, start from ``g_i' = g_i`` and visit the other tasks j in a
    random order (one permutation per i from this step's ``rng``, as PCGrad); with
    ``phi = cos(g_i', g_j)`` (``g_i' . g_j / (||g_i'|| ||g_j|| + 1e-8)``), when
    ``phi < phi_hat_ij``:

        ``g_i' <- g_i' + g_j ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
        / (||g_j|| sqrt(1 - phi_hat^2) + 1e-8)``

    (which raises the cosine to ``phi_hat``), and the target moves
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. With all targets 0 this is exactly
    PCGrad's projection. The shared update is ``sum_i g_i'``; all of it is done in
    coefficient space on the T x T Gram matrix, the weights are the column sums of the
    coefficients.

    ``ema_update``: ``'always'`` (default: every visited pair moves its target, as the paper's
    Algorithm 1 and LibMTL's current ``GradVac``, whose outputs it matches to 5e-8) or
    ``'on_adjust'`` (only the pairs that were adjusted move their target, as LibMTL's code
    read in older revisions, e.g. commit 13f5fc7).
    ``beta`` = 0.5 (LibMTL's default). ``decoder_weighting = 'ones'``. ``rep_grad`` is read
    by the train step (LibMTL refuses it for GradVac; here it is allowed, the targets then
    track cosines of representation gradients). Diagnostic ``mean_target``: the mean
    off-diagonal target after this call.
    """

    name: ClassVar[str] = "gradvac"

    beta: float = 0.5
    ema_update: str = "always"

    def __post_init__(self):
        check_choice(self.name, "ema_update", self.ema_update, _EMA_UPDATES)
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"weighting 'gradvac': beta must be in [0, 1], got {self.beta!r}")

    def init(self, tasks: Sequence[str]):
        return {"rho": jnp.zeros((len(tasks), len(tasks)), jnp.float32)}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del decoder_grads
        tasks = list(losses)
        grads = self.task_grads(grads)
        num_tasks = grads.shape[0]
        gram = gram_matrix(grads)
        norms = gram_norms(gram)
        rho = jnp.asarray(state["rho"], jnp.float32)
        orders = task_permutations(rng, step, num_tasks)

        def vaccinate(i, order_i, targets):
            coeffs = jax.nn.one_hot(i, num_tasks, dtype=jnp.float32)
            for pos in range(num_tasks):  # T is static and small: unrolled.
                j = order_i[pos]
                other = j != i
                norm_i = combination_norm(gram, coeffs)
                phi = (coeffs @ gram[:, j]) / (norm_i * norms[j] + 1e-8)
                target = targets[j]
                adjust = other & (phi < target)
                sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi ** 2, 0.0))
                sin_target = jnp.sqrt(jnp.maximum(1.0 - target ** 2, 0.0))
                shift = norm_i * (target * sin_phi - phi * sin_target) / (
                    norms[j] * sin_target + 1e-8)
                coeffs = coeffs + jnp.where(adjust, shift, 0.0) * jax.nn.one_hot(
                    j, num_tasks, dtype=jnp.float32)
                moves = adjust if self.ema_update == "on_adjust" else other
                targets = targets.at[j].set(
                    jnp.where(moves, (1.0 - self.beta) * target + self.beta * phi, target))
            return coeffs, targets

        coeffs, new_rho = jax.vmap(vaccinate)(jnp.arange(num_tasks), orders, rho)
        weights = coeffs.sum(axis=0)
        return WeightingOutput(unstack(tasks, weights), {"rho": new_rho},
                               {"mean_target": off_diagonal_mean(new_rho)})
