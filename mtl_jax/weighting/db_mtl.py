"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting import history
from mtl_jax.weighting.base import WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class DBMTL(history.GradientHistory):
    """"Dual-Balancing for Multi-Task Learning", Lin, Ye, Zhang, Kwok et al., 2023
    (DB-MTL), in LibMTL's form.

    Loss-scale balancing: every task is trained on ``log(L_t + eps)``, whose gradient is
    ``g_t / (L_t + eps)``. Gradient-magnitude balancing: a buffer ``b [T, N]`` (0 at the
    start) tracks these gradients, ``b <- h + (beta / k^beta_sigma) (b - h)`` (``k`` = call
    count from 1, ``h_t = g_t / (L_t + eps)``), and the shared update is
    ``sum_t alpha_t b_t`` with ``alpha_t = max_s ||b_s|| / (||b_t|| + 1e-8)`` -- every task's
    buffered gradient scaled to the largest norm. It is returned as ``shared_grad`` (``b``
    holds past gradients). Decoders get the gradients of the log losses
    (``decoder_weights = 1 / (L_t + eps)``).

    Defaults as LibMTL: ``beta`` 0.9, ``beta_sigma`` 0, ``eps`` 1e-8. The weights
    ``alpha_t / (L_t + eps)`` (the coefficients of this step's ``g_t`` when ``beta`` = 0)
    label the step. ``b`` costs ``T x`` the shared parameters in the state. No
    ``rep_grad`` (UserError), as in LibMTL. Diagnostics ``alpha/<task>``.
    """

    name: ClassVar[str] = "db_mtl"
    decoder_weighting: ClassVar[str] = "weights"

    beta: float = 0.9
    beta_sigma: float = 0.0
    eps: float = 1e-8

    def init(self, tasks: Sequence[str], grad_dim: int = 0):
        return {"buffer": history.history_zeros(self.name, len(tasks), grad_dim),
                "count": jnp.zeros((), jnp.int32)}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        grads, buffer = self.read_history(state, "buffer", grads)
        count = history.next_count(state)
        inv_loss = 1.0 / (stack_losses(losses) + self.eps)
        log_grads = grads * inv_loss[:, None]
        decay = self.beta / count.astype(jnp.float32) ** self.beta_sigma
        buffer = log_grads + decay * (buffer - log_grads)
        norms = history.row_norms(buffer)
        alpha = jnp.max(norms) / (norms + 1e-8)
        shared = jnp.dot(alpha, buffer, precision=jax.lax.Precision.HIGHEST)
        diagnostics = {f"alpha/{t}": alpha[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, alpha * inv_loss),
                               {"buffer": buffer, "count": count}, diagnostics,
                               shared_grad=shared, decoder_weights=unstack(tasks, inv_loss))
