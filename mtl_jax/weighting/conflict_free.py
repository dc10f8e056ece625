"""ConFIG: conflict-free gradient (Liu, Chu, Thuerey et al., ICLR 2025)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput, gram_matrix, unstack


@dataclasses.dataclass(frozen=True)
class ConFIG(Weighting):
    """"ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", Liu,
    Chu, Thuerey et al., eq. 2, as TorchJD's ``ConFIG`` (config name ``conflict_free``).

    With unit gradients ``u_t = g_t / ||g_t||`` (0 for a zero gradient) stacked in ``U``:
    the direction ``b = pinv(U) 1`` (the minimum-norm vector with ``u_t . b = 1`` for every
    task: equal cosines), normalised, ``b^ = b / ||b||``, and scaled to the summed
    projections ``(sum_t g_t . b^) b^``. Since ``pinv(U) = U^T (U U^T)^+``, all of it is done
    on the T x T Gram matrix; the pseudo-inverse drops eigenvalues of ``U U^T`` below
    ``rcond`` (1e-6) times the largest (TorchJD takes ``pinv`` of the ``[T, N]`` matrix with
    torch's default cutoff). The weights are the coefficients of the result on the ``g_t``
    (all zero when every gradient is). ``decoder_weighting = 'ones'``; ``rep_grad`` is
    read by the train step. Diagnostic ``cosine``: the common cosine of ``b^`` with the
    task gradients (mean over tasks with non-zero gradient).
    """

    name: ClassVar[str] = "conflict_free"
    requires: ClassVar[str] = "task_grads"
    decoder_weighting: ClassVar[str] = "ones"

    rep_grad: bool = False
    rcond: float = 1e-6

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        gram = gram_matrix(self.task_grads(grads))
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
        unit_gram = inv_norms[:, None] * gram * inv_norms[None, :]
        coeffs = inv_norms * (jnp.linalg.pinv(unit_gram, rtol=self.rcond, hermitian=True)
                              @ jnp.ones_like(norms))
        length_b = jnp.sqrt(jnp.maximum(coeffs @ gram @ coeffs, 0.0))
        unit_coeffs = jnp.where(length_b > 0, coeffs / jnp.where(length_b > 0, length_b, 1.0),
                                0.0)
        projections = gram @ unit_coeffs  # g_t . b^
        weights = jnp.sum(projections) * unit_coeffs
        nonzero = norms > 0
        cosine = jnp.sum(jnp.where(nonzero, projections * inv_norms, 0.0)) / jnp.maximum(
            jnp.sum(nonzero), 1)
        return WeightingOutput(unstack(tasks, weights), state, {"cosine": cosine})
