"""FAMO (Liu, Liang, Chen, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from mtl_jax.weighting.base import Weighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class FAMO(Weighting):
    """FAMO, Algorithm 1: logits ``xi`` (``xi_0 = 0``), task distribution ``z = softmax(xi)``.

    Shared update direction (Algorithm 1, ``d_t``): ``sum_t c_t grad L_t`` with
    ``c_t = (z_t / L_t) / sum_k (z_k / L_k)`` -- the gradient of ``sum_t z_t log L_t``
    rescaled so the coefficients sum to 1 (the paper's ``c_t`` normaliser, as in the authors'
    code). The returned weights are exactly these ``c_t`` (so they sum to 1); losses are
    clamped below at ``min_loss`` before the division and the log.

    Logit update: with ``delta = log L(theta_t) - log L(theta_{t+1})`` (the per-task
    improvement of the log-loss caused by the step that used ``z_t``), the gradient of ``xi`` is
    ``J_softmax(xi_t)^T delta = z * (delta - <z, delta>)`` and
    ``xi <- Adam(lr=learning_rate)`` applied to ``grad + weight_decay * xi`` (torch Adam's
    coupled weight decay, as in the authors' code: ``optax.add_decayed_weights`` then
    ``optax.adam``). Descending this gradient lowers the logits of the tasks that improved most,
    i.e. favours the tasks that lag behind.

    Timing: a call sees only the current losses, so the state keeps the previous call's losses
    and the logit update for the previous step happens at the beginning of the next call, from
    ``(L_prev, L_now)`` and the ``xi`` that produced the previous weights -- the paper's order,
    one call late. The weights of this call then use the updated ``xi``. Unlike the authors'
    code, which re-evaluates the losses on the same batch after the step (an extra forward
    pass), ``L(theta_{t+1})`` here is measured on the next batch. The first call has no
    previous losses and leaves ``xi`` at 0.

    Fields: ``learning_rate`` (beta = 0.025), ``weight_decay`` (gamma = 0.001), ``min_loss``
    (1e-8). State: ``{'logits': [T], 'opt_state': optax state, 'prev_losses': [T],
    'has_prev': bool}``. Diagnostics: ``logit/<task>`` (the logits after this call's update).
    """

    name: ClassVar[str] = "famo"

    learning_rate: float = 0.025
    weight_decay: float = 0.001
    min_loss: float = 1e-8

    def _tx(self) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.weight_decay),
                           optax.adam(self.learning_rate))

    def init(self, tasks: Sequence[str]):
        logits = jnp.zeros((len(tasks),), jnp.float32)
        return {"logits": logits, "opt_state": self._tx().init(logits),
                "prev_losses": jnp.ones((len(tasks),), jnp.float32),
                "has_prev": jnp.zeros((), jnp.bool_)}

    def logit_grad(self, logits: jax.Array, prev_losses: jax.Array,
                   losses: jax.Array) -> jax.Array:
        """``J_softmax(logits)^T (log prev_losses - log losses)`` (losses clamped)."""
        delta = (jnp.log(jnp.maximum(prev_losses, self.min_loss))
                 - jnp.log(jnp.maximum(losses, self.min_loss)))
        z = jax.nn.softmax(logits)
        return z * (delta - jnp.dot(z, delta))

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        values = stack_losses(losses)
        logits = jnp.asarray(state["logits"], jnp.float32)
        has_prev = jnp.asarray(state["has_prev"], jnp.bool_)

        grad = self.logit_grad(logits, jnp.asarray(state["prev_losses"], jnp.float32), values)
        updates, stepped_opt = self._tx().update(grad, state["opt_state"], logits)
        stepped_logits = optax.apply_updates(logits, updates)
        keep = lambda new, old: jnp.where(has_prev, new, old)
        logits = keep(stepped_logits, logits)
        opt_state = jax.tree.map(keep, stepped_opt, state["opt_state"])

        z = jax.nn.softmax(logits)
        scaled = z / jnp.maximum(values, self.min_loss)
        weights = scaled / jnp.sum(scaled)
        new_state = {"logits": logits, "opt_state": opt_state, "prev_losses": values,
                     "has_prev": jnp.ones((), jnp.bool_)}
        diagnostics = {f"logit/{t}": logits[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, weights), new_state, diagnostics)
