"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

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

#: Below this mean squared gradient norm the gradients count as all zero (no bargaining
#: solution exists); the previous weights are kept.
_TINY = 1e-30
#: Step sizes tried (besides the damped one) while the Newton decrement is above 1.
_LINE_SEARCH = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def solve_nash(gram: jax.Array, warm: jax.Array, *, iterations: int = 20,
               reg_eps: float = 1e-4) -> jax.Array:
    """The Nash bargaining weights: ``alpha > 0`` with ``gram @ alpha = 1 / alpha``.

    ``gram``: float32 ``[T, T]`` Gram matrix of the task gradients; ``warm``: float32 ``[T]``,
    a previous solution used as the starting direction (if any entry is <= 0 or not finite:
    a cold start from ``1 / sqrt(diag)``, exact for orthogonal gradients). Returns float32
    ``[T]``, every entry positive and finite.

    The equation is the stationarity condition of the strictly convex function
    ``f(a) = a^T M a / 2 - sum_i log a_i`` on ``a > 0``, so its solution is the unique
    minimiser of ``f``, found by Newton's method:

    * ``M = gram / c + reg_eps * diag(gram / c) + reg_eps^2 * I`` with
      ``c = trace(gram) / T``. The solution scales as ``alpha = a / sqrt(c)``, so the
      iterations see O(1) numbers whatever the gradients' scale. The ridge (each task's own
      squared norm times ``reg_eps``, so it perturbs every task's condition by the same
      relative amount, plus a tiny absolute floor) makes ``f`` bounded below when a
      positive combination of the gradients vanishes (``g_1 = -g_2``, or a zero gradient),
      where the exact problem has no solution; ``alpha_t`` is then capped at about
      ``1 / (reg_eps * sqrt(c))``.
    * The start is rescaled by the optimal scalar along its ray,
      ``a0 <- a0 * sqrt(T / a0^T M a0)``, so a warm start from the previous step (whose
      gradients may have another scale) is only as wrong as its direction.
    * Each step solves the Newton system in the diagonally scaled form
      ``(A M A + I) y = a * (M a) - 1`` (``A = diag(a)``; direction ``d = a * y``), whose
      matrix has all eigenvalues >= 1, and computes the Newton decrement
      ``lambda^2 = y . (a * (M a) - 1)``. ``f`` is self-concordant (a quadratic plus log
      barriers), so the damped step ``a - d / (1 + lambda)`` stays in ``a > 0``, decreases
      ``f`` by at least ``lambda - log(1 + lambda)``, and converges quadratically once
      ``lambda < 1/2`` (``lambda+ <= 2 lambda^2``; Nesterov, "Introductory Lectures on
      Convex Optimization", sec. 4.1.5). While ``lambda > 1`` the step with the lowest ``f``
      among the damped one and ``t`` in ``{1/4, .., 8}`` is taken instead (a fixed-size,
      parallel line search; it can only decrease ``f`` more, and it lets a coordinate grow
      by more than the damped step's factor of 2 when the solution is far off).

    Convergence (tested on random Gram matrices with T = 2..6, gradient norms spread over
    e^+-4, condition numbers beyond 1e6, a zero gradient): a cold start reaches the float32
    floor ``max_t |a_t (M a)_t - 1| ~ 3e-7`` in <= 10 steps, a warm start from a 5 %
    perturbed problem in <= 3; with near-exactly opposed gradients the float32 floor is
    ~2e-3 (for ``reg_eps = 1e-4``). ``iterations = 20`` therefore leaves a wide margin.
    """
    gram = jnp.asarray(gram, jnp.float32)
    num_tasks = gram.shape[0]
    eye = jnp.eye(num_tasks, dtype=jnp.float32)
    c = gram_scale(gram, _TINY)
    m = gram / c
    m = m + reg_eps * jnp.diag(jnp.diagonal(m)) + reg_eps**2 * eye

    warm = jnp.asarray(warm, jnp.float32)
    usable = jnp.all((warm > 0) & jnp.isfinite(warm))
    a0 = jnp.where(usable, warm, jax.lax.rsqrt(jnp.diagonal(m)))
    a0 = a0 * jnp.sqrt(num_tasks / (a0 @ m @ a0))
    line_search = jnp.asarray(_LINE_SEARCH, jnp.float32)

    def objective(a):
        return 0.5 * a @ m @ a - jnp.sum(jnp.log(a))

    def newton(_, a):
        scaled_grad = a * (m @ a) - 1.0
        y = jnp.linalg.solve(a[:, None] * m * a[None, :] + eye, scaled_grad)
        decrement = jnp.sqrt(jnp.maximum(scaled_grad @ y, 0.0))
        steps = jnp.concatenate([(1.0 / (1.0 + decrement))[None], line_search])
        cands = a[None, :] * (1.0 - steps[:, None] * y[None, :])  # [steps, T]
        feasible = jnp.all(cands > 0, axis=1)
        values = jax.vmap(objective)(jnp.where(cands > 0, cands, 1.0))
        values = jnp.where(feasible & jnp.isfinite(values), values, jnp.inf)
        # Near the solution f differs between candidates by less than float32 resolves:
        # take the damped (there: almost full) Newton step.
        return cands[jnp.where(decrement > 1.0, jnp.argmin(values), 0)]

    a = jax.lax.fori_loop(0, iterations, newton, a0)
    return a / jnp.sqrt(c)


@dataclasses.dataclass(frozen=True)
class NashMTL(GradientWeighting):
    """"Multi-Task Learning as a Bargaining Game", Navon et al., ICML 2022 (Nash-MTL).

    With ``G`` the ``[T, T]`` Gram matrix of the task gradients (``G_ij = g_i . g_j``;
    ``G^T G`` in the paper, whose ``G`` stacks the gradients as columns), the weights are the
    Nash bargaining solution: the unique ``alpha > 0`` with ``G alpha = 1 / alpha``
    elementwise, i.e. every task gets ``g_i . d = 1 / alpha_i`` from the update
    ``d = sum_t alpha_t g_t`` (the paper's characterisation of the bargaining solution,
    which it then solves for). Consequences: ``||d||^2 = T`` and, for orthogonal gradients,
    ``alpha_t = 1 / ||g_t||``. The shared parameters get ``d`` and,
    as in the paper (which scales the task losses by ``alpha``), decoder t gets
    ``alpha_t * grad L_t`` (``decoder_weighting = 'weights'``).

    Solver: the paper solves a sequence of convex problems with cvxpy (CCP, 20 iterations);
    inside the jitted step we instead minimise the equivalent strictly convex
    ``alpha^T G alpha / 2 - sum log alpha`` with ``iterations`` Newton steps, warm-started
    from the previous solution kept in the state (:func:`solve_nash` documents the method,
    its convergence and the ``reg_eps`` ridge, relative to each task's squared gradient
    norm, that keeps the problem solvable when gradients cancel exactly). The solution is
    recomputed every ``update_every`` steps and reused in between (the paper's cheaper
    variants update only every few steps); with all gradients zero (no solution exists),
    or a non-finite solution, the previous weights are kept (ones at the start).

    Options: ``max_norm`` > 0 rescales the weights so that ``||d|| <= max_norm`` (the paper's
    code clips the shared gradient norm at 1.0 for some experiments; here the same factor
    also scales the decoder weights, and with ``rep_grad`` the norm is that of the
    representation gradient). ``normalize_gram=False`` (default) is the paper **and** the
    authors' released code: that code divides ``G`` by its Frobenius norm ``n`` for the solver
    but multiplies ``n`` back into the constraint (``alpha_t n (G/n alpha)_t >= 1``), which is
    the unnormalised problem (tests/test_weighting_fidelity.py checks the invariance).
    ``normalize_gram=True`` solves ``alpha_t (G/n alpha)_t = 1`` without undoing it -- a
    variant in neither the paper nor the code: it multiplies ``alpha`` by ``n^(1/2)``, making
    the weights O(1) and the update proportional to the gradients' scale instead of
    ``||d|| = sqrt(T)``.

    ``rep_grad`` is read by the train step (gradients w.r.t. the shared representation).
    State ``{'alpha': [T]}``: the last solution (zeros = none yet). Diagnostics: ``residual``
    ``= rms_t(alpha_t (G alpha)_t - 1)``, i.e. ``G alpha - 1/alpha`` relative to ``1/alpha``
    per task (for the ``G`` actually solved, without the ridge, and the ``alpha`` used this
    step, before clipping). Converged, it is at most about ``reg_eps`` (the ridge's own
    perturbation; float32 round-off is ~3e-7); a task with a zero gradient contributes
    ``1/T`` to its square. ``combined_norm`` ``= ||sum_t w_t g_t||`` for the returned weights.
    """

    name: ClassVar[str] = "nash_mtl"
    decoder_weighting: ClassVar[str] = "weights"

    update_every: int = 1
    max_norm: float = 0.0
    iterations: int = 20
    reg_eps: float = 1e-4
    normalize_gram: bool = False

    def __post_init__(self):
        if int(self.update_every) < 1 or int(self.iterations) < 1:
            raise UserError(f"nash_mtl: update_every ({self.update_every}) and iterations "
                            f"({self.iterations}) must be >= 1")
        if self.max_norm < 0 or self.reg_eps <= 0:
            raise UserError(f"nash_mtl: need max_norm >= 0 (0 = off; got {self.max_norm}) "
                            f"and reg_eps > 0 (got {self.reg_eps})")

    def init(self, tasks):
        return {"alpha": jnp.zeros((len(tasks),), jnp.float32)}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del rng, decoder_grads
        tasks = list(losses)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        solved = gram
        if self.normalize_gram:
            fro = jnp.sqrt(jnp.sum(gram * gram))
            solved = gram / jnp.where(fro > _TINY, fro, 1.0)

        prev = jnp.asarray(state["alpha"], jnp.float32)
        prev_ok = jnp.all((prev > 0) & jnp.isfinite(prev))
        fallback = jnp.where(prev_ok, prev, jnp.ones_like(prev))
        new = solve_nash(solved, prev, iterations=self.iterations, reg_eps=self.reg_eps)
        has_signal = jnp.trace(gram) / len(tasks) > _TINY
        refresh = (jnp.asarray(step) % self.update_every == 0) & has_signal
        refresh &= jnp.all(jnp.isfinite(new))
        alpha = jnp.where(refresh, new, fallback)

        residual = jnp.sqrt(jnp.mean(jnp.square(alpha * (solved @ alpha) - 1.0)))
        weights = alpha
        norm = combination_norm(gram, weights)
        if self.max_norm > 0:
            weights = weights * jnp.minimum(1.0, self.max_norm / jnp.maximum(norm, _TINY))
            norm = jnp.minimum(norm, self.max_norm)
        diagnostics = {"residual": residual, "combined_norm": norm}
        return WeightingOutput(unstack(tasks, weights), {"alpha": alpha}, diagnostics)
