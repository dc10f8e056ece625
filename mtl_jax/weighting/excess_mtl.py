"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting import history
from mtl_jax.weighting.base import WeightingOutput, unstack


@dataclasses.dataclass(frozen=True)
class ExcessMTL(history.GradientHistory):
    """"Robust Multi-Task Learning with Excess Risks", He, Zhou, Zhao & Bacon, ICML 2024,
    in LibMTL's (the authors') form.

    Excess risk of task t estimated from a diagonal (AdaGrad) approximation of its Hessian:
    with ``s_t <- s_t + g_t^2`` (state ``[T, N]``, 0 at the start) and
    ``h_t = sqrt(s_t + 1e-7)``, ``e_t = sum(g_t^2 / h_t)``. The first call stores ``e`` as
    the reference ``e0`` and keeps the weights; every later call multiplies
    ``lambda_t <- lambda_t exp(robust_step_size * e_t / e0_t)`` and renormalises to
    ``sum_t lambda_t = T`` (exponentiated-gradient ascent on the excess risks). The weights
    ``lambda`` (1 at the start) of this call weight the whole loss (decoders too,
    ``decoder_weighting = 'weights'``).

    ``robust_step_size`` = 0.01 (LibMTL's default). ``s`` costs ``T x`` the shared
    parameters in the state. LibMTL also accepts ``rep_grad`` (summing the representation
    gradients over the batch); here the accumulated second moments must refer to the same
    coordinates at every step, so ``rep_grad`` is refused. Diagnostics ``excess/<task>``:
    ``e_t / e0_t``.
    """

    name: ClassVar[str] = "excess_mtl"
    decoder_weighting: ClassVar[str] = "weights"

    robust_step_size: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        if self.robust_step_size < 0:
            raise UserError("weighting 'excess_mtl': robust_step_size must be >= 0")

    def init(self, tasks: Sequence[str], grad_dim: int = 0):
        num = len(tasks)
        return {"grad_sq_sum": history.history_zeros(self.name, num, grad_dim),
                "weights": jnp.ones((num,), jnp.float32),
                "initial_excess": jnp.ones((num,), jnp.float32),
                "has_initial": jnp.zeros((), jnp.bool_)}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads, sq_sum = self.read_history(state, "grad_sq_sum", grads)
        sq_sum = sq_sum + jnp.square(grads)
        excess = jnp.sum(jnp.square(grads) / jnp.sqrt(sq_sum + 1e-7), axis=1)
        has_initial = jnp.asarray(state["has_initial"], jnp.bool_)
        initial = jnp.where(has_initial, state["initial_excess"], excess)
        ratio = jnp.where(initial > 0, excess / jnp.where(initial > 0, initial, 1.0), 0.0)
        weights = jnp.asarray(state["weights"], jnp.float32)
        stepped = weights * jnp.exp(self.robust_step_size * ratio)
        stepped = num_tasks * stepped / jnp.sum(stepped)
        weights = jnp.where(has_initial, stepped, weights)
        new_state = {"grad_sq_sum": sq_sum, "weights": weights, "initial_excess": initial,
                     "has_initial": jnp.ones((), jnp.bool_)}
        diagnostics = {f"excess/{t}": ratio[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, weights), new_state, diagnostics)
