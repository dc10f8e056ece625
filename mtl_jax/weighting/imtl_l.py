"""IMTL-L: impartial multi-task learning, loss balance (Liu et al., ICLR 2021)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import OwnOptimizerWeighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class IMTLL(OwnOptimizerWeighting):
    """"Towards Impartial Multi-task Learning", Liu et al., ICLR 2021 -- IMTL-L.

    Every task loss is scaled as ``e^{s_t} L_t - s_t`` with a learnable ``s_t`` (0 at the
    start): the network sees the weights ``w_t = e^{s_t}``, and ``s`` descends
    ``d/ds_t = e^{s_t} L_t - 1`` (stationary where the scaled loss ``e^s L`` is 1 for every
    task). As for ``uw``, the step treats weights as constants, so the strategy owns ``s``
    and its optimiser state and takes one step per call from that analytic gradient
    (``optax.adam(learning_rate)`` or ``optax.sgd``); the weights of a call use ``s``
    before its update. LibMTL keeps ``s`` in a plain tensor that its optimiser never sees
    (``s`` stays 0, i.e. equal weights); here ``s`` is trained, as in the paper.

    Fields: ``learning_rate`` (1e-4, LibMTL's default model learning rate), ``optimizer``.
    State ``{'scale': [T], 'opt_state'}``. Diagnostics ``scale/<task>`` (``s`` used).
    """

    name: ClassVar[str] = "imtl_l"

    learning_rate: float = 1e-4
    optimizer: str = "adam"

    def init(self, tasks: Sequence[str]):
        scale = jnp.zeros((len(tasks),), jnp.float32)
        return {"scale": scale, "opt_state": self._tx().init(scale)}

    def step_scale(self, state, losses) -> tuple[jax.Array, dict]:
        """``(s, new_state)``: the scales before this call, and the state after one optimiser
        step on ``e^s L - 1``."""
        scale = jnp.asarray(state["scale"], jnp.float32)
        grad = jnp.exp(scale) * stack_losses(losses) - 1.0
        new_scale, opt_state = self.step_params(scale, grad, state["opt_state"])
        return scale, {"scale": new_scale, "opt_state": opt_state}

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        scale, new_state = self.step_scale(state, losses)
        diagnostics = {f"scale/{t}": scale[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, jnp.exp(scale)), new_state, diagnostics)
