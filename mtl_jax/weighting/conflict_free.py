"""ConFIG: conflict-free gradient (Liu, Chu, Thuerey et al., ICLR 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, unstack


@dataclasses.dataclass(frozen=True)
class ConFIG(GradientWeighting):
    """"ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", Liu,
    Chu, Thuerey et al., eq. 2, as TorchJD's ``ConFIG`` (config name ``conflict_free``).

    With unit gradients ``u_t = g_t / ||g_t||`` (0 for a zero gradient) stacked in ``U``
    (``[T, N]``): the direction ``b = pinv(U) 1`` (the minimum-norm vector with
    ``u_t . b = 1`` for every task: equal cosines), normalised, ``b^ = b / ||b||``, and scaled
    to the summed projections ``(sum_t g_t . b^) b^``. The weights are the coefficients of the
    result on the ``g_t`` (all zero when every gradient is).

    The pseudo-inverse is that of ``U`` itself, through its singular values, as the reference
    (``torch.linalg.pinv``): a QR factorisation ``Uᵀ = Q R`` (``Q`` ``[N, T]``, backward stable)
    and the SVD of the small ``R`` give ``U``'s singular values and left singular vectors
    without forming ``U Uᵀ``, whose eigenvalues would square the condition number (with
    near-duplicate tasks, ``σ_min / σ_max = 6e-4``, float32 then loses the small direction:
    16 % off the reference with a 1e-6 cutoff on the eigenvalues, 4 % with any cutoff).
    Singular values below ``rcond · σ_max`` are dropped. ``rcond=None`` takes torch's default
    cutoff, ``max(T, N) · eps(float32)``; that one grows with the number of parameters
    (``N = 10⁶`` drops every direction under 12 % of the largest, ``N > 8.4·10⁶`` all of
    them), so the default here is the fixed ``1e-6``, which equals torch's for ``N ≈ 8``.

    ``decoder_weighting = 'ones'``; ``rep_grad`` is read by the train step. Diagnostic
    ``cosine``: the common cosine of ``b^`` with the task gradients (mean over tasks with
    non-zero gradient).
    """

    name: ClassVar[str] = "conflict_free"

    rcond: float | None = 1e-6

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        g = self.task_grads(grads)
        t, n = g.shape
        norms = jnp.sqrt(jnp.sum(jnp.square(g), axis=1))
        nonzero = norms > 0
        inv_norms = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
        units = g * inv_norms[:, None]
        # Uᵀ = Q R, R = B S Aᵀ  =>  U = A S (Q B)ᵀ: U's singular values S, left vectors A.
        r = jnp.linalg.qr(units.T, mode="r")[:t]
        left, sigma, _ = jnp.linalg.svd(r.T, full_matrices=False)
        rtol = (max(t, n) * float(jnp.finfo(jnp.float32).eps) if self.rcond is None
                else self.rcond)
        kept = sigma > rtol * sigma[0]
        inv_sigma = jnp.where(kept, 1.0 / jnp.where(kept, sigma, 1.0), 0.0)
        at_one = left.T @ jnp.ones((t,), jnp.float32)  # Aᵀ 1
        # b = pinv(U) 1 = (Q B) S⁺ Aᵀ 1 = Uᵀ c with c = A S⁺² Aᵀ 1; ||b|| = ||S⁺ Aᵀ 1||.
        coeffs = left @ (inv_sigma ** 2 * at_one)
        length_b = jnp.sqrt(jnp.sum(jnp.square(inv_sigma * at_one)))
        has_b = length_b > 0
        inv_length = jnp.where(has_b, 1.0 / jnp.where(has_b, length_b, 1.0), 0.0)
        # u_t . b^ = (U pinv(U) 1)_t / ||b||, with U pinv(U) = A_kept A_keptᵀ.
        cosines = (left @ (jnp.where(kept, 1.0, 0.0) * at_one)) * inv_length
        projections = norms * cosines  # g_t . b^
        weights = jnp.sum(projections) * inv_norms * coeffs * inv_length
        cosine = jnp.sum(jnp.where(nonzero, cosines, 0.0)) / jnp.maximum(jnp.sum(nonzero), 1)
        return WeightingOutput(unstack(tasks, weights), state, {"cosine": cosine})
