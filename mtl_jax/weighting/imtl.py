"""IMTL-G: impartial multi-task learning, gradient balance (Liu et al., ICLR 2021)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    gram_matrix,
    gram_norms,
    gram_scale,
    unstack,
)


@dataclasses.dataclass(frozen=True)
class IMTL(GradientWeighting):
    """"Towards Impartial Multi-task Learning", Liu et al., ICLR 2021 -- IMTL-G only.

    Finds the combination ``g = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1`` whose
    projections onto every unit task gradient ``u_t = g_t / ||g_t||`` are equal. With
    ``D = [g_1 - g_t]_{t=2..T}`` and ``U = [u_1 - u_t]_{t=2..T}`` (rows):
    ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum_{t>=2} alpha_t``.

    ``D`` and ``U`` are formed **directly from the gradient rows** (float32 ``[T-1, P]``, after
    dividing every gradient by their RMS norm, which leaves ``alpha`` unchanged) and the square
    ``(T-1) x (T-1)`` system ``M x = y`` (``M = (D U^T)^T``, ``y = U g_1``) is solved by LU
    (``jnp.linalg.solve``). Going through the Gram matrix ``K = G G^T`` or the normal equations
    ``M^T M`` instead squares the condition number: with two nearly parallel task gradients
    (``g_2 ~ 2 g_1``, relative perturbation 1e-3, 50 parameters) the combined direction
    ``sum_t alpha_t g_t`` was off by 2-13x its norm from a float64 solution with the previous
    normal-equations solver, 4-34 % with a Gram-matrix LU or SVD solve, and 0.02-0.3 % solved
    directly (tests/test_weighting_fidelity.py). When ``M`` is singular (exactly parallel or
    zero gradients; a zero gradient gets ``u_t = 0``) the LU solution is not finite and the
    minimum-norm least-squares solution (``jnp.linalg.lstsq``, SVD) is used. The weights are
    the ``alpha_t`` (they may be negative, as in the paper). Memory: ``2 (T-1) P`` floats
    besides the gradients.

    ``decoder_weighting = 'ones'``: the task-specific parameters get the plain ``grad L_t``
    (the paper's IMTL-G). IMTL-L (learnable loss scales ``e^s L - s``) and the hybrid IMTL
    are **not** implemented. ``rep_grad`` is read by the train step (the paper applies
    IMTL-G to the shared representation); the strategy ignores it. Diagnostic
    ``projection``: the common value ``g . u_t`` (mean over t) divided by the RMS gradient norm
    ``sqrt(mean_t ||g_t||^2)``.
    """

    name: ClassVar[str] = "imtl"

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        # alpha does not depend on the gradients' scale: normalise it away (float32 range).
        scale = gram_scale(gram)
        gram = gram / scale
        norms = gram_norms(gram)
        inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)

        if num_tasks == 1:
            alpha = jnp.ones((1,), jnp.float32)
        else:
            g_TxP = jnp.asarray(grads, jnp.float32) * jax.lax.rsqrt(scale)
            u_TxP = g_TxP * inv_norms[:, None]
            d_rows = g_TxP[0][None, :] - g_TxP[1:]  # D, [T-1, P]
            u_rows = u_TxP[0][None, :] - u_TxP[1:]  # U, [T-1, P]
            m = (d_rows @ u_rows.T).T
            y = u_rows @ g_TxP[0]
            rest = jnp.linalg.solve(m, y)
            fallback = jnp.linalg.lstsq(m, y)[0]
            rest = jnp.where(jnp.all(jnp.isfinite(rest)), rest, fallback)
            alpha = jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])

        projection = jnp.mean((gram @ alpha) * inv_norms)
        return WeightingOutput(unstack(tasks, alpha), state, {"projection": projection})
