"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, gram_matrix, unstack

#: Backtracking step lengths tried by every Newton iteration (largest first).
_HALVINGS = 12


def solve_fairgrad(gram: jax.Array, alpha: float, iterations: int,
                   ridge: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """``w > 0`` with ``gram w = w^(-1/alpha)`` (element-wise power): FairGrad's system.

    It is the stationarity condition of the strictly convex
    ``f(w) = w^T A w / 2 - sum_t phi(w_t)``, ``phi'(w) = w^(-p)``, ``p = 1/alpha``
    (``phi = log`` for ``p = 1``, else ``w^(1-p) / (1-p)``), minimised here by ``iterations``
    damped Newton steps from ``w_t = A_tt^(-1/(1+p))`` (the solution for a diagonal ``A``):
    every step stays inside ``w > 0`` (at most 0.99 of the way to the boundary) and halves
    its length up to 12 times until the Armijo condition holds.

    The solution scales as ``c^(-alpha/(1+alpha))`` with ``gram -> c gram``, so it is solved
    for ``A = gram / c + ridge I`` (``c`` = mean squared gradient norm; the ridge keeps a
    rank-deficient Gram matrix -- parallel gradients -- from sending ``w`` to infinity:
    there the system has no solution and ``w`` becomes large, of order
    ``ridge^(-alpha/(1+alpha))``; it must stay far below the smallest squared gradient norm
    relative to the mean, or it biases the weights of tasks with small gradients) and
    scaled back. All-zero gradients give ``w = 1/T``. Returns ``w`` and the
    relative residual ``max_t |A w - w^(-p)|_t / max_t w_t^(-p)``.
    """
    gram = jnp.asarray(gram, jnp.float32)
    num_tasks = gram.shape[0]
    scale = jnp.trace(gram) / num_tasks
    ok = scale > 1e-30
    a = gram / jnp.where(ok, scale, 1.0) + ridge * jnp.eye(num_tasks, dtype=jnp.float32)
    p = 1.0 / alpha

    def potential(w):
        if p == 1.0:
            return jnp.sum(jnp.log(w))
        return jnp.sum(w ** (1.0 - p)) / (1.0 - p)

    def objective(w):
        return 0.5 * w @ a @ w - potential(w)

    def newton(_, w):
        grad = a @ w - w ** (-p)
        hess = a + p * jnp.diag(w ** (-p - 1.0))
        direction = -jnp.linalg.solve(hess, grad)
        to_boundary = jnp.where(direction < 0, -w / jnp.where(direction < 0, direction, -1.0),
                                jnp.inf)
        longest = jnp.minimum(1.0, 0.99 * jnp.min(to_boundary))
        lengths = longest * 0.5 ** jnp.arange(_HALVINGS, dtype=jnp.float32)
        f0, slope = objective(w), grad @ direction
        values = jax.vmap(lambda t: objective(w + t * direction))(lengths)
        accept = (values <= f0 + 1e-4 * lengths * slope) & jnp.isfinite(values)
        first = jnp.argmax(accept)
        length = jnp.where(jnp.any(accept), lengths[first], 0.0)
        stepped = w + length * direction
        return jnp.where(jnp.all(jnp.isfinite(stepped)) & jnp.all(stepped > 0), stepped, w)

    w0 = jnp.diagonal(a) ** (-1.0 / (1.0 + p))
    w = jax.lax.fori_loop(0, iterations, newton, w0)
    rhs = w ** (-p)
    residual = jnp.max(jnp.abs(a @ w - rhs)) / jnp.max(rhs)
    unit = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    weights = jnp.where(ok, w * jnp.where(ok, scale, 1.0) ** (-alpha / (1.0 + alpha)), unit)
    return weights, jnp.where(ok, residual, 0.0)


@dataclasses.dataclass(frozen=True)
class FairGrad(GradientWeighting):
    """"Fair Resource Allocation in Multi-Task Learning", Ban & Ji, ICML 2024 (FairGrad).

    The update ``d = G^T w`` gives task t the improvement ``g_t . d``; FairGrad asks for
    alpha-fair utilities, i.e. ``G G^T w = w^(-1/alpha)`` with ``w > 0`` (``alpha`` = 1:
    proportional fairness, ``alpha -> inf``: max-min). LibMTL solves it with
    ``scipy.optimize.least_squares`` from ``w = 1/T``; here :func:`solve_fairgrad` solves the
    equivalent convex minimisation by ``iterations`` damped Newton steps on the T x T Gram
    matrix. The weights ``w`` weight the whole loss, decoders included (LibMTL:
    ``sum(w * losses).backward()``; ``decoder_weighting = 'weights'``). ``alpha`` = 1.0
    (LibMTL's default); ``iterations`` = 20 Newton steps; ``ridge`` = 1e-8 (see
    :func:`solve_fairgrad`). ``rep_grad`` is read by the train step (LibMTL refuses it for
    FairGrad; the system is the same). Diagnostic ``residual`` (relative, ~1e-6 solved).
    """

    name: ClassVar[str] = "fairgrad"
    decoder_weighting: ClassVar[str] = "weights"

    alpha: float = 1.0
    iterations: int = 20
    ridge: float = 1e-8

    def __post_init__(self):
        if self.alpha <= 0 or int(self.iterations) < 1 or self.ridge < 0:
            raise UserError(f"weighting 'fairgrad': need alpha > 0 (got {self.alpha!r}), "
                            f"iterations >= 1 (got {self.iterations!r}) and ridge >= 0")

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        weights, residual = solve_fairgrad(gram_matrix(self.task_grads(grads)),
                                           float(self.alpha), int(self.iterations),
                                           float(self.ridge))
        return WeightingOutput(unstack(tasks, weights), state, {"residual": residual})
