"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp
import optax

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class GradNorm(GradientWeighting):
    """"GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks", Chen et al., ICML 2018, Algorithm 1.

    Learnable weights ``w_t`` (initially 1). Each step, with ``grads`` row t the gradient of
    ``L_t`` w.r.t. the chosen shared layer W:

    * ``G_t = w_t ||grad_W L_t||``, ``G_bar = mean_t G_t``;
    * ``L~_t = L_t / L_t(0)`` (``L(0)``: the losses of the first call, stored in the state),
      ``r_t = L~_t / mean_t L~_t``;
    * ``L_grad = sum_t |G_t - stop_gradient(G_bar r_t^alpha)|`` (the target is a constant);
    * ``w <- Adam(learning_rate)`` step on ``dL_grad/dw`` (its own optax state), then
      ``w <- max(w, min_weight)`` and ``w <- T w / sum(w)`` so the weights sum to T.

    The returned weights are those **before** this step's update (``w(t)``, as in the paper's
    Algorithm 1, which updates the network with the loss weighted by ``w(t)`` and then moves
    to ``w(t+1)``); the state carries ``w(t+1)``. ``decoder_weighting = 'weights'``: the
    whole loss is ``sum_t w_t L_t``.

    ``grad_param_prefix`` restricts the rows of ``grads`` to the shared parameters under
    that path prefix (the train step reads it; ``''`` = the whole shared part). The paper and
    XTasC apply GradNorm to the last shared layer (XTasC: the last conv of the encoder); the
    experiment config chooses that prefix. ``rep_grad`` is read by the train step (gradients
    w.r.t. the shared representation instead); the strategy ignores it. ``alpha`` = 1.5 is
    the paper's NYUv2 value (XTasC uses 0.16). Diagnostic ``gradnorm_loss``: ``L_grad``.
    """

    name: ClassVar[str] = "gradnorm"
    decoder_weighting: ClassVar[str] = "weights"

    alpha: float = 1.5
    learning_rate: float = 0.025
    min_weight: float = 1e-3
    grad_param_prefix: str = ""

    def __post_init__(self):
        if self.learning_rate <= 0 or self.min_weight <= 0:
            raise UserError("weighting 'gradnorm': learning_rate and min_weight must be > 0")

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    def init(self, tasks: Sequence[str]):
        weights = jnp.ones((len(tasks),), jnp.float32)
        return {
            "weights": weights,
            "opt_state": self._optimizer().init(weights),
            "initial_losses": jnp.ones((len(tasks),), jnp.float32),
            "has_initial_losses": jnp.zeros((), jnp.int32),
        }

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads = self.task_grads(grads)
        loss_values = stack_losses(losses)
        grad_norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=1))

        first = state["has_initial_losses"] == 0
        initial = jnp.where(first, loss_values, state["initial_losses"])
        safe_initial = jnp.where(jnp.abs(initial) > 1e-12, initial, 1.0)
        ratio = loss_values / safe_initial
        mean_ratio = jnp.mean(ratio)
        relative = ratio / jnp.where(jnp.abs(mean_ratio) > 1e-12, mean_ratio, 1.0)
        # Losses are non-negative; the clamp keeps r^alpha real if one is not.
        relative = jnp.maximum(relative, 0.0)

        weights = state["weights"]
        weighted = weights * grad_norms
        target = jnp.mean(weighted) * relative ** self.alpha  # a constant for the update
        gap = weighted - target
        loss = jnp.sum(jnp.abs(gap))
        # dL_grad/dw_t = sign(G_t - target_t) ||grad_W L_t||, with sign(0) = 0 (at an exact
        # balance, e.g. equal norms at the first step, the weights stay put).
        grad_w = jnp.sign(gap) * grad_norms
        updates, opt_state = self._optimizer().update(grad_w, state["opt_state"], weights)
        new_weights = jnp.maximum(optax.apply_updates(weights, updates), self.min_weight)
        new_weights = num_tasks * new_weights / jnp.sum(new_weights)

        new_state = {
            "weights": new_weights,
            "opt_state": opt_state,
            "initial_losses": initial,
            "has_initial_losses": jnp.ones((), jnp.int32),
        }
        return WeightingOutput(unstack(tasks, weights), new_state, {"gradnorm_loss": loss})
