"""IMTL-G: impartial multi-task learning, gradient balance (Liu et al., ICLR 2021)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput, gram_matrix, unstack


@dataclasses.dataclass(frozen=True)
class IMTL(Weighting):
    """"Towards Impartial Multi-task Learning", Liu et al., ICLR 2021 -- IMTL-G only.

    Finds the combination ``g = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1`` whose
    projections onto every unit task gradient ``u_t = g_t / ||g_t||`` are equal. With
    ``D = [g_1 - g_t]_{t=2..T}`` and ``U = [u_1 - u_t]_{t=2..T}`` (rows):
    ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum_{t>=2} alpha_t``.

    Every vector here is a combination of the rows of ``grads`` (``D = A_D grads``,
    ``U = A_U grads``), so ``D U^T = A_D K A_U^T`` and ``g_1 U^T = e_1^T K A_U^T`` with K the
    T x T Gram matrix. The linear system ``M x = y`` (``M = (D U^T)^T``) is solved as ridge
    least squares ``x = (M^T M + lambda I)^{-1} M^T y`` with ``lambda = eps * trace(M^T M) /
    (T - 1)`` (plus a tiny absolute floor), which is exact for a well-conditioned system and
    stays finite when it is singular (parallel or zero gradients; a zero gradient gets
    ``u_t = 0``). The weights are the ``alpha_t`` (they may be negative, as in the paper).

    ``decoder_weighting = 'ones'``: the task-specific parameters get the plain ``grad L_t``
    (the paper's IMTL-G). IMTL-L (learnable loss scales ``e^s L - s``) and the hybrid IMTL
    are **not** implemented. ``rep_grad`` is read by the train step (the paper applies
    IMTL-G to the shared representation); the strategy ignores it. Diagnostic
    ``projection``: the common value ``g . u_t`` (mean over t) divided by the RMS gradient norm
    ``sqrt(mean_t ||g_t||^2)``.
    """

    name: ClassVar[str] = "imtl"
    requires: ClassVar[str] = "task_grads"
    decoder_weighting: ClassVar[str] = "ones"

    rep_grad: bool = False
    eps: float = 1e-6

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        # alpha does not depend on the gradients' scale: normalise it away (float32 range).
        scale = jnp.trace(gram) / num_tasks
        gram = gram / jnp.where(scale > 0, scale, 1.0)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)

        if num_tasks == 1:
            alpha = jnp.ones((1,), jnp.float32)
        else:
            eye = jnp.eye(num_tasks, dtype=jnp.float32)
            # Rows t = 2..T of the coefficient matrices of D and U over the task gradients.
            coef_d = eye[0][None, :] - eye[1:]
            unit = eye * inv_norms[None, :]  # row t: coefficients of u_t
            coef_u = unit[0][None, :] - unit[1:]
            d_ut = coef_d @ gram @ coef_u.T  # D U^T, [T-1, T-1]
            g1_ut = gram[0] @ coef_u.T  # g_1 U^T, [T-1]
            m = d_ut.T
            normal = m.T @ m
            ridge = self.eps * jnp.trace(normal) / (num_tasks - 1) + 1e-30
            rest = jnp.linalg.solve(normal + ridge * jnp.eye(num_tasks - 1), m.T @ g1_ut)
            alpha = jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])

        projection = jnp.mean((gram @ alpha) * inv_norms)
        return WeightingOutput(unstack(tasks, alpha), state, {"projection": projection})
