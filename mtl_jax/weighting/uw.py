"""Uncertainty weighting: learnable per-task log-variances (Kendall, Gal & Cipolla, "Multi-Task
Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

Two parameterisations of the same idea:

* ``uw`` -- the form used in MTAN's code (Liu et al., CVPR 2019):
  ``sum_t exp(-s_t) * L_t / 2 + s_t / 2``, ``s_0 = -0.5``.
* ``uw_xtasc`` -- the form used by XTasC: ``sum_t 0.5 * exp(-s_t) * L_t + s_t``, ``s_0 = 0``.

In those codes ``s`` is a parameter trained by the model's optimiser through the combined
objective. Here the train step treats the weights as constants, so the strategy owns ``s`` and
its optimiser state and takes one step on ``s`` per call from the analytic gradient of the
objective given this step's loss values (the gradient the model's optimiser would have seen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import OwnOptimizerWeighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class UncertaintyWeighting(OwnOptimizerWeighting):
    """Kendall et al. 2018 in MTAN's form: objective ``sum_t exp(-s_t) L_t / 2 + s_t / 2``.

    Each call, with ``s`` the log-variances in the state and ``L`` this step's losses:

    * weights ``w_t = exp(-s_t) / 2``, computed with ``s`` *before* this call's update (as in
      the original, where the forward pass that weights the losses uses the current ``s`` and
      the optimiser moves ``s`` afterwards);
    * ``g_t = d/ds_t = -exp(-s_t) L_t / 2 + 1/2``; ``s <- optimiser(s, g)`` with
      ``optax.adam(learning_rate)`` (or ``optax.sgd``). The stationary point is
      ``s_t = log L_t`` (per-task "variance" = loss).

    Fields: ``init_log_var`` (``s_0``, -0.5 as MTAN), ``learning_rate`` (1e-4: MTAN trains ``s``
    with the model's Adam learning rate), ``optimizer`` (``'adam'`` or ``'sgd'``).
    State: ``{'log_var': float32 [T], 'opt_state': optax state}``. Diagnostics:
    ``log_var/<task>`` -- the ``s`` the weights were computed with.
    """

    name: ClassVar[str] = "uw"
    # Coefficient of s_t in the objective: 1/2 in MTAN's form, 1 in XTasC's.
    _reg: ClassVar[float] = 0.5

    init_log_var: float = -0.5
    learning_rate: float = 1e-4
    optimizer: str = "adam"

    def init(self, tasks: Sequence[str]):
        log_var = jnp.full((len(tasks),), self.init_log_var, jnp.float32)
        return {"log_var": log_var, "opt_state": self._tx().init(log_var)}

    def objective_grad(self, log_var: jax.Array, losses: jax.Array) -> jax.Array:
        """Analytic ``d/ds`` of ``sum_t 0.5 exp(-s_t) L_t + reg * s_t``."""
        return -0.5 * jnp.exp(-log_var) * losses + self._reg

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        values = stack_losses(losses)
        log_var = jnp.asarray(state["log_var"], jnp.float32)
        weights = 0.5 * jnp.exp(-log_var)
        grad = self.objective_grad(log_var, values)
        new_log_var, opt_state = self.step_params(log_var, grad, state["opt_state"])
        new_state = {"log_var": new_log_var, "opt_state": opt_state}
        diagnostics = {f"log_var/{t}": log_var[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, weights), new_state, diagnostics)


@dataclasses.dataclass(frozen=True)
class UncertaintyWeightingXTasC(UncertaintyWeighting):
    """Uncertainty weighting in XTasC's form: objective ``sum_t 0.5 exp(-s_t) L_t + s_t``.

    Same mechanics as :class:`UncertaintyWeighting` with ``s_0 = 0`` (``init_log_var``),
    weights ``w_t = 0.5 exp(-s_t)`` (``s`` before this call's update) and the gradient
    ``d/ds_t = -0.5 exp(-s_t) L_t + 1`` (stationary point ``s_t = log(L_t / 2)``).
    """

    name: ClassVar[str] = "uw_xtasc"
    _reg: ClassVar[float] = 1.0

    init_log_var: float = 0.0
