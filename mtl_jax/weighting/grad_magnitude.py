"""Gradient-magnitude weighting (AdaMT-Net: Jha, Kumar, Banerjee & Chaudhuri, "AdaMT-Net: An
Adaptive Weight Learning Based Multi-Task Learning Model for Scene Understanding", CVPR
Workshops 2020, eq. 5-6)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput, check_choice, unstack

_NORMS = ("mean_abs", "l2")


def _magnitude(tree, norm: str) -> jax.Array:
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if norm == "mean_abs":
        size = sum(x.size for x in leaves)
        return sum(jnp.sum(jnp.abs(x)) for x in leaves) / max(size, 1)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


@dataclasses.dataclass(frozen=True)
class GradMagnitude(Weighting):
    """AdaMT-Net eq. 5: ``W_t = gbar_t / sum_k gbar_k``, with ``gbar_t`` the average gradient
    magnitude of ``L_t`` w.r.t. the parameters of decoder ``t``; total loss ``sum_t W_t L_t``
    (eq. 6). A task whose decoder still receives large gradients gets more weight.

    ``norm``: ``'mean_abs'`` (the paper: the mean of ``|dL_t/dtheta|`` over every scalar
    parameter of decoder ``t``) or ``'l2'`` (the global L2 norm of that gradient).
    ``scale`` multiplies all weights (default 1: the paper's convex combination, weights sum
    to 1). If every ``gbar_t`` is 0 the weights are equal (``scale / T``). The weights come
    from gradient values, so they are constants for differentiation. Stateless; diagnostics
    ``gbar/<task>``.
    """

    name: ClassVar[str] = "grad_magnitude"
    requires: ClassVar[str] = "decoder_grads"

    norm: str = "mean_abs"
    scale: float = 1.0

    def __post_init__(self):
        check_choice(self.name, "norm", self.norm, _NORMS)

    def init(self, tasks: Sequence[str]):
        return {}

    def __call__(self, losses, state, step, *, decoder_grads=None, **inputs) -> WeightingOutput:
        if decoder_grads is None:
            raise ValueError("weighting 'grad_magnitude' needs decoder_grads")
        tasks = list(losses)
        gbar = jnp.stack([_magnitude(decoder_grads[t], self.norm) for t in tasks])
        total = jnp.sum(gbar)
        safe_total = jnp.where(total > 0, total, 1.0)
        weights = jnp.where(total > 0, gbar / safe_total, 1.0 / len(tasks)) * self.scale
        diagnostics = {f"gbar/{t}": gbar[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, weights), state, diagnostics)
