"""MGDA: the minimum-norm point in the convex hull of the task gradients (Sener & Koltun,
NeurIPS 2018)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    check_choice,
    combination_norm,
    gram_matrix,
    gram_norms,
    stack_losses,
    unstack,
)

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _segment_min_norm(aa: jax.Array, ab: jax.Array, bb: jax.Array) -> jax.Array:
    """gamma in [0, 1] minimising ``||gamma a + (1 - gamma) b||^2``, from the three dot
    products. Identical end points (zero denominator) give 0.5."""
    denom = aa - 2.0 * ab + bb
    ok = denom > 1e-12 * (aa + bb) + 1e-30
    return jnp.where(ok, jnp.clip((bb - ab) / jnp.where(ok, denom, 1.0), 0.0, 1.0), 0.5)


def min_norm_coefficients(gram: jax.Array, iterations: int) -> jax.Array:
    """``alpha = argmin_{alpha in simplex} alpha^T gram alpha`` for a T x T Gram matrix.

    T = 1: ``[1]``. T = 2: the exact closed form. T > 2: start from the best pair (each pair
    solved in closed form, the one with the smallest norm kept, as Sener & Koltun do) and run
    ``iterations`` Frank-Wolfe steps with exact line search: move towards the vertex ``e_t``
    with the smallest ``(gram @ alpha)_t`` by the step that minimises the norm on the segment.
    """
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return jnp.ones((1,), jnp.float32)
    if num_tasks == 2:
        a = _segment_min_norm(gram[0, 0], gram[0, 1], gram[1, 1])
        return jnp.stack([a, 1.0 - a])

    diag = jnp.diagonal(gram)
    # Closed-form solution of every pair (i, j): weight gamma on i, 1 - gamma on j.
    gamma = _segment_min_norm(diag[:, None], gram, diag[None, :])
    pair_norm = (gamma ** 2 * diag[:, None] + 2.0 * gamma * (1.0 - gamma) * gram
                 + (1.0 - gamma) ** 2 * diag[None, :])
    pair_norm = jnp.where(jnp.eye(num_tasks, dtype=bool), jnp.inf, pair_norm)
    best = jnp.argmin(pair_norm)
    i, j = best // num_tasks, best % num_tasks
    alpha = (gamma.reshape(-1)[best] * jax.nn.one_hot(i, num_tasks)
             + (1.0 - gamma.reshape(-1)[best]) * jax.nn.one_hot(j, num_tasks))

    def frank_wolfe_step(_, alpha):
        g_alpha = gram @ alpha
        t = jnp.argmin(g_alpha)
        # Segment from the current point v (weight gamma) to the vertex g_t (1 - gamma).
        step_gamma = _segment_min_norm(alpha @ g_alpha, g_alpha[t], gram[t, t])
        return step_gamma * alpha + (1.0 - step_gamma) * jax.nn.one_hot(t, num_tasks)

    return jax.lax.fori_loop(0, iterations, frank_wolfe_step, alpha.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class MGDA(GradientWeighting):
    """"Multi-Task Learning as Multi-Objective Optimization", Sener & Koltun, NeurIPS 2018.

    The update direction is the minimum-norm element of the convex hull of the (normalised)
    task gradients: ``alpha = argmin_{alpha in simplex} ||sum_t alpha_t g_t / n_t||^2``,
    solved on the T x T Gram matrix (exact for T = 2, ``iterations`` Frank-Wolfe steps with
    exact line search from the best pair for T > 2; see ``min_norm_coefficients``).

    ``normalization`` sets ``n_t`` (the gradient-normaliser options of the authors' code):
    ``'none'`` (1, the default), ``'l2'`` (``||g_t||``), ``'loss'`` (``L_t``), ``'loss+'``
    (``L_t ||g_t||``). A normaliser that is not positive (zero gradient or zero loss) is
    replaced by 1. The shared parameters then get ``sum_t alpha_t g_t / n_t``, so the returned
    weights are ``w_t = alpha_t / n_t`` (times T when ``scale_to_tasks``, which LibMTL users
    expect: weights summing to T under ``'none'``). Note: the authors' released code uses
    ``alpha_t`` itself as the loss scale whatever the normalisation; ours makes the shared
    update exactly the min-norm point of the normalised gradients.

    ``decoder_weighting = 'weights'``: as in the paper, each task loss is scaled by its weight
    for all parameters, so decoder t gets ``w_t * grad L_t``. The "MGDA-UB" variant of the
    paper is ``rep_grad=True`` (gradients w.r.t. the shared representation; the step reads
    the flag, the strategy ignores it). Diagnostic ``min_norm``: ``||sum_t alpha_t g_t/n_t||``.
    """

    name: ClassVar[str] = "mgda"
    decoder_weighting: ClassVar[str] = "weights"

    normalization: str = "none"
    iterations: int = 50
    scale_to_tasks: bool = False

    def __post_init__(self):
        check_choice(self.name, "normalization", self.normalization, _NORMALIZATIONS)

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        grad_norms = gram_norms(gram)
        loss_values = stack_losses(losses)
        normalizer = {
            "none": jnp.ones_like(grad_norms),
            "l2": grad_norms,
            "loss": loss_values,
            "loss+": loss_values * grad_norms,
        }[self.normalization]
        normalizer = jnp.where(normalizer > 1e-12, normalizer, 1.0)

        scaled_gram = gram / (normalizer[:, None] * normalizer[None, :])
        alpha = min_norm_coefficients(scaled_gram, self.iterations)
        weights = alpha / normalizer
        if self.scale_to_tasks:
            weights = weights * len(tasks)
        min_norm = combination_norm(scaled_gram, alpha)
        return WeightingOutput(unstack(tasks, weights), state, {"min_norm": min_norm})
