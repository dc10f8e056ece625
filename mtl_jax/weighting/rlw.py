"""Random Loss Weighting (Lin, Ye, Xu, Shi, Zhang & Kwok, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput, check_choice, unstack

_DISTRIBUTIONS = ("normal", "uniform")


@dataclasses.dataclass(frozen=True)
class RandomLossWeighting(Weighting):
    """RLW: every step draws ``lambda_tilde ~ p`` independently per task and uses the weights
    ``lambda = softmax(lambda_tilde)`` (positive, summing to 1; no rescaling by ``T``), the
    paper's normalisation ``f = softmax``. ``distribution``: ``'normal'`` (standard normal, the
    paper's default and best-performing choice) or ``'uniform'`` (``U(0, 1)``).

    The draw uses the step's ``rng`` (required), so it is reproducible and needs no state.
    """

    name: ClassVar[str] = "rlw"

    distribution: str = "normal"

    def __post_init__(self):
        check_choice(self.name, "distribution", self.distribution, _DISTRIBUTIONS)

    def init(self, tasks: Sequence[str]):
        return {}

    def __call__(self, losses, state, step, *, rng=None, **inputs) -> WeightingOutput:
        if rng is None:
            raise ValueError("weighting 'rlw' needs the step's rng")
        tasks = list(losses)
        shape = (len(tasks),)
        if self.distribution == "normal":
            draw = jax.random.normal(rng, shape, jnp.float32)
        else:
            draw = jax.random.uniform(rng, shape, jnp.float32)
        return WeightingOutput(unstack(tasks, jax.nn.softmax(draw)), state)
