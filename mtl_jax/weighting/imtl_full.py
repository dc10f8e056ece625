"""IMTL: impartial multi-task learning, IMTL-L and IMTL-G combined (Liu et al., ICLR 2021)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import WeightingOutput, unstack
from mtl_jax.weighting.imtl import IMTL
from mtl_jax.weighting.imtl_l import IMTLL


@dataclasses.dataclass(frozen=True)
class IMTLFull(IMTLL):
    """"Towards Impartial Multi-task Learning", Liu et al., ICLR 2021 -- the hybrid IMTL
    (LibMTL's ``IMTL``).

    Losses are scaled as in IMTL-L (:class:`IMTLL`: ``e^{s_t} L_t - s_t``, ``s`` trained
    from ``e^s L - 1``); IMTL-G (:class:`mtl_jax.weighting.imtl.IMTL`) then balances the
    gradients of the *scaled* losses, ``g'_t = e^{s_t} g_t``, into ``sum_t alpha_t g'_t``
    (``sum alpha = 1``, equal projections on every unit ``g'_t``). So the shared parameters
    get the weights ``alpha_t e^{s_t}`` on the raw gradients, and decoder t its scaled
    gradient ``e^{s_t} grad L_t`` (returned as ``decoder_weights``, as LibMTL's per-task
    backward leaves them). Fields: those of ``imtl_l`` (IMTL-G runs with its defaults).
    ``rep_grad`` is read by the train step. Diagnostics: ``scale/<task>`` and
    ``projection`` (IMTL-G's).
    """

    name: ClassVar[str] = "imtl_full"
    requires: ClassVar[str] = "task_grads"
    decoder_weighting: ClassVar[str] = "ones"

    rep_grad: bool = False

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        tasks = list(losses)
        scale, new_state = self.step_scale(state, losses)
        factor = jnp.exp(scale)
        scaled = factor[:, None] * self.task_grads(grads)
        balance = IMTL(rep_grad=self.rep_grad)(losses, {}, step, grads=scaled)
        alpha = jnp.stack([balance.weights[t] for t in tasks])
        diagnostics = {f"scale/{t}": scale[i] for i, t in enumerate(tasks)}
        diagnostics.update(balance.diagnostics)
        return WeightingOutput(unstack(tasks, alpha * factor), new_state, diagnostics,
                               decoder_weights=unstack(tasks, factor))
