"""Equal weighting: every task loss has weight 1."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, WeightingOutput


@dataclasses.dataclass(frozen=True)
class EqualWeighting(Weighting):
    name: ClassVar[str] = "ew"

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        return WeightingOutput({t: jnp.ones((), jnp.float32) for t in losses}, state)
