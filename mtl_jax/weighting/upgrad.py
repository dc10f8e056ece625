"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    check_choice,
    gram_matrix,
    off_diagonal_mean,
    unstack,
)

_TINY = 1e-30
#: A bound is released only when its multiplier is below -_KKT_TOL (units of the
#: trace-normalised Gram matrix), so round-off cannot make the active set cycle.
_KKT_TOL = 1e-6


def _active_set_qp(m: jax.Array, lower: jax.Array, iterations: int) -> jax.Array:
    """``argmin_{v >= lower} v^T m v / 2`` for one ``lower [T]``; ``m`` positive definite."""
    num_tasks = m.shape[0]
    eye = jnp.eye(num_tasks, dtype=m.dtype)
    index = jnp.arange(num_tasks)

    def step(_, carry):
        v, free = carry
        # Minimiser over the current face (free coordinates unconstrained, the others at
        # their bound): the symmetric positive definite system m_FF v_F = -m_FB lower_B.
        both_free = free[:, None] & free[None, :]
        system = jnp.where(both_free, m, eye)
        fixed = jnp.where(free, 0.0, lower)
        rhs = jnp.where(free, -(m @ fixed), lower)
        target = jnp.linalg.solve(system, rhs)
        # Walk towards it until a free coordinate hits its bound.
        towards = v - target
        blocking = free & (target < lower)
        ratios = jnp.where(blocking, (v - lower) / jnp.where(blocking, towards, 1.0), jnp.inf)
        hit = jnp.argmin(ratios)
        blocked = ratios[hit] < 1.0
        moved = v - jnp.clip(ratios[hit], 0.0, 1.0) * towards
        moved = jnp.where(blocked & (index == hit), lower[hit], moved)
        # At the face's minimiser: release the bound with the most negative multiplier.
        multipliers = jnp.where(free, jnp.inf, m @ moved)
        release = jnp.argmin(multipliers)
        can_release = ~blocked & (multipliers[release] < -_KKT_TOL)
        new_free = jnp.where(blocked, free & (index != hit),
                             free | (can_release & (index == release)))
        new_v = jnp.maximum(jnp.where(blocked, moved, target), lower)
        # A singular face system (only possible with reg_eps = 0): stop where we are.
        ok = jnp.all(jnp.isfinite(target))
        return jnp.where(ok, new_v, v), jnp.where(ok, new_free, free)

    v, _ = jax.lax.fori_loop(0, iterations, step, (lower, jnp.zeros((num_tasks,), bool)))
    return v


def project_weights(gram: jax.Array, lower: jax.Array, *, iterations: int = 32,
                    reg_eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """Coefficients of the projections onto the dual cone of the gradients.

    ``gram``: float32 ``[T, T]`` Gram matrix ``J J^T`` of the task gradients (the rows of
    ``J``); ``lower``: float32 ``[K, T]``. For every row ``u`` of ``lower`` this solves the
    box-constrained QP ``v* = argmin_{v >= u} v^T M v / 2`` with
    ``M = gram / c + T reg_eps I`` (``c = trace(gram) / T``), i.e. ``T`` times TorchJD's /
    LibMTL's ``gram / trace(gram) + reg_eps I``: scaling ``M`` does not change ``v*``, so this
    is their definition (the ridge relative to the **full** trace, the sum of the squared
    gradient norms), with the O(1) entries of the mean-normalised matrix. By the paper's
    Proposition, ``J^T v*`` is the projection of ``J^T u`` onto the dual cone
    ``{x : J x >= 0}`` (for ``reg_eps = 0``). Returns ``v* [K, T]`` and the largest
    violation of the optimality conditions (entry of the projected gradient of the QP, in
    units of ``M``; 0 at the exact solution).

    Solver: the primal active-set method for bound constraints (Nocedal & Wright,
    "Numerical Optimization", Alg. 16.3), ``iterations`` steps from ``v = u`` with every
    bound active. A step minimises over the current face exactly (one T x T solve); if that
    leaves the feasible set it moves to the first bound hit and fixes it, otherwise it
    releases the bound whose multiplier ``(M v)_j`` is most negative (below -1e-6). ``v``
    stays feasible and the objective never increases; for a strictly convex QP the method
    terminates at the exact solution after finitely many steps -- in tests (T = 2..10,
    ill-conditioned and rank-deficient Gram matrices) after at most ``T + 4``; the remaining
    steps change nothing. Unlike projected-gradient or coordinate-descent iterations its
    accuracy does not degrade with the condition number of ``M``.
    """
    gram = jnp.asarray(gram, jnp.float32)
    lower = jnp.asarray(lower, jnp.float32)
    num_tasks = gram.shape[0]
    c = jnp.trace(gram) / num_tasks
    ridge = num_tasks * reg_eps  # reg_eps relative to trace(gram) (TorchJD), in units of c
    m = gram / jnp.where(c > _TINY, c, 1.0) + ridge * jnp.eye(num_tasks, dtype=jnp.float32)
    v = jax.vmap(lambda u: _active_set_qp(m, u, iterations))(lower)
    grad = v @ m
    projected = jnp.where(v > lower, grad, jnp.minimum(grad, 0.0))
    return v, jnp.max(jnp.abs(projected))


@dataclasses.dataclass(frozen=True)
class UPGrad(GradientWeighting):
    """"Jacobian Descent for Multi-Objective Optimization", Quinton & Rey, 2024 (UPGrad, the
    aggregator of TorchJD).

    With ``J`` the ``[T, N]`` matrix of task gradients (``grads``), UPGrad projects every
    task gradient onto the dual cone ``{x : J x >= 0}`` -- the directions that conflict with
    no task -- and averages the projections:
    ``d = (1/T) sum_i pi_J(g_i)``. By the paper's Proposition
    ``pi_J(J^T u) = J^T v`` with ``v = argmin_{v >= u} v^T J J^T v``; with ``u = e_i`` this is
    ``pi_J(g_i) = J^T (e_i + lambda_i)``, ``lambda_i >= 0``, so the weights are

        ``w = (1/T) sum_i (e_i + lambda_i)``  (``reduction='mean'``, the paper's), or the
        sum of the projections (``reduction='sum'``, T times larger).

    Properties: ``J d >= 0`` (``d`` conflicts with no task); with no conflicting pair
    (all ``g_i . g_j >= 0``) nothing is projected and ``w = 1/T`` each.

    The T small QPs (one per task, on the Gram matrix only) are solved exactly by
    :func:`project_weights` with ``iterations`` steps of a primal active-set method (it
    needs at most about T + 4 in tests with T <= 10; the default 32 leaves a wide margin
    for the few tasks of dense MTL), with the ridge ``reg_eps`` on the trace-normalised Gram
    matrix ``J J^T / trace(J J^T)`` (TorchJD's and LibMTL's definition and default 1e-4; until
    this version it was relative to ``trace / T``, T times weaker) keeping the QP strictly
    convex, e.g. for identical or zero gradients (all zero:
    ``w = 1/T``). The ridge lets ``g_t . d`` dip below 0 by ``O(reg_eps)`` times the
    squared gradient norms. Too few iterations leave a feasible but not optimal ``v``
    (flagged by ``kkt_residual``).

    Decoders get their plain gradients (``decoder_weighting = 'ones'``). ``rep_grad`` is read
    by the train step (gradients w.r.t. the shared representation). Diagnostics:
    ``kkt_residual`` (largest projected-gradient entry of the QPs, relative units, ~1e-6
    when solved) and ``conflict_fraction`` (fraction of ordered task pairs with
    ``g_i . g_j < 0``).
    """

    name: ClassVar[str] = "upgrad"

    iterations: int = 32
    reg_eps: float = 1e-4
    reduction: str = "mean"

    def __post_init__(self):
        check_choice(self.name, "reduction", self.reduction, ("mean", "sum"))
        if int(self.iterations) < 1 or self.reg_eps < 0:
            raise UserError(f"upgrad: need iterations >= 1 (got {self.iterations}) and "
                            f"reg_eps >= 0 (got {self.reg_eps})")

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del rng, step, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        coeffs, kkt = project_weights(gram, jnp.eye(num_tasks, dtype=jnp.float32),
                                      iterations=self.iterations, reg_eps=self.reg_eps)
        weights = coeffs.sum(0) if self.reduction == "sum" else coeffs.mean(0)

        conflicts = off_diagonal_mean(gram < 0).astype(jnp.float32)
        diagnostics = {"kkt_residual": kkt, "conflict_fraction": conflicts}
        return WeightingOutput(unstack(tasks, weights), state, diagnostics)
