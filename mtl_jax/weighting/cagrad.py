"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    combination_norm,
    gram_matrix,
    gram_scale,
    unstack,
)


def project_to_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` ``[T]`` onto the probability simplex (sort-based)."""
    num = v.shape[0]
    desc = jnp.sort(v)[::-1]
    cumsum = jnp.cumsum(desc)
    k = jnp.arange(1, num + 1, dtype=v.dtype)
    support = jnp.sum(desc - (cumsum - 1.0) / k > 0)  # >= 1 always
    theta = (cumsum[support - 1] - 1.0) / support.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def solve_cagrad_dual(gram: jax.Array, c: float, iterations: int) -> jax.Array:
    """``w = argmin_{w in simplex} w^T gram b + c sqrt(b^T gram b) sqrt(w^T gram w)``,
    ``b = 1/T``: the dual of CAGrad, by ``iterations`` accelerated projected-gradient steps.

    The objective is invariant (up to a positive factor) to the scale of ``gram``, so it is
    normalised by ``trace/T`` first. Step size ``1 / (lambda_max (1 + r / ||g_y||))``: the
    curvature bound of the objective at the current point (``r = c ||g0||``), so the norm
    term, whose curvature grows as ``g_w`` shrinks, cannot make the iteration diverge.
    Momentum ``k / (k + 3)`` (Nesterov/FISTA), extrapolated points projected back.
    """
    num_tasks = gram.shape[0]
    unit_gram = gram / gram_scale(gram)
    mean = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    g_mean = unit_gram @ mean
    radius = c * jnp.sqrt(jnp.maximum(mean @ g_mean, 0.0))
    lipschitz = jnp.maximum(jnp.linalg.eigvalsh(unit_gram)[-1], 1e-6)

    def body(k, carry):
        w, y = carry
        g_y = unit_gram @ y
        norm_y = jnp.sqrt(jnp.maximum(y @ g_y, 1e-12))
        grad = g_mean + radius * g_y / norm_y
        step = 1.0 / (lipschitz * (1.0 + radius / norm_y))
        w_next = project_to_simplex(y - step * grad)
        momentum = k / (k + 3.0)
        y_next = project_to_simplex(w_next + momentum * (w_next - w))
        return w_next, y_next

    w, _ = jax.lax.fori_loop(0, iterations, body, (mean, mean))
    return w


@dataclasses.dataclass(frozen=True)
class CAGrad(GradientWeighting):
    """"Conflict-Averse Gradient Descent for Multi-task Learning", Liu et al., NeurIPS 2021.

    With ``g0`` the mean task gradient, CAGrad picks ``d`` maximising the worst task
    improvement ``min_t g_t . d`` within the ball ``||d - g0|| <= c ||g0||``. Through its
    dual: ``w = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||`` with ``g_w = sum_t w_t
    g_t`` and ``phi = c^2 ||g0||^2`` (solved on the T x T Gram matrix, see
    ``solve_cagrad_dual``; ``iterations`` steps), then
    ``d = g0 + (sqrt(phi) / ||g_w||) g_w``, i.e. the weights
    ``w'_t = 1/T + (c ||g0|| / ||g_w||) w_t`` (the second term is dropped when ``g_w`` is 0).

    ``rescale`` (the variants of the authors' code): 0 returns ``d``; 1 (default, as there)
    ``d / (1 + c^2)``; 2 ``d / (1 + c)``. ``c = 0`` gives the mean gradient (weights 1/T), so
    the update is 1/T the size of equal weighting's. ``decoder_weighting = 'ones'``.
    ``rep_grad`` is read by the train step; the strategy ignores it. Diagnostic
    ``worst_improvement``: ``min_t g_t . d``.
    """

    name: ClassVar[str] = "cagrad"

    c: float = 0.4
    iterations: int = 50
    rescale: int = 1

    def __post_init__(self):
        if self.rescale not in (0, 1, 2):
            raise UserError(f"weighting 'cagrad': rescale must be 0, 1 or 2, got {self.rescale!r}")
        if self.c < 0:
            raise UserError(f"weighting 'cagrad': c must be >= 0, got {self.c!r}")

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        w = solve_cagrad_dual(gram, self.c, self.iterations)

        mean = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
        g0_norm = combination_norm(gram, mean)
        gw_norm = combination_norm(gram, w)
        # g_w is 0 only when 0 is in the hull; then d = g0 (lambda would be undefined).
        tiny = 1e-6 * jnp.sqrt(jnp.maximum(jnp.trace(gram) / num_tasks, 0.0)) + 1e-30
        lam = jnp.where(gw_norm > tiny, self.c * g0_norm / jnp.maximum(gw_norm, tiny), 0.0)
        weights = mean + lam * w
        weights = weights / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        worst = jnp.min(gram @ weights)
        return WeightingOutput(unstack(tasks, weights), state, {"worst_improvement": worst})
