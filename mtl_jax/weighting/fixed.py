"""Fixed weights from the config (DenseMTL's grid: S-D {S 50, D 1}; S-D-N {100, 1, 100};
S-D-N-E {100, 1, 100, 50})."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import Weighting, WeightingOutput


@dataclasses.dataclass(frozen=True)
class FixedWeighting(Weighting):
    """``weights``: ``{task: weight}`` (stored as a tuple of pairs to stay hashable)."""

    name: ClassVar[str] = "fixed"
    weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if isinstance(self.weights, dict) or hasattr(self.weights, "items"):
            object.__setattr__(self, "weights", tuple(sorted(
                (str(k), float(v)) for k, v in self.weights.items())))

    def init(self, tasks: Sequence[str]):
        given = dict(self.weights)
        missing = [t for t in tasks if t not in given]
        extra = [t for t in given if t not in tasks]
        if missing or extra:
            raise UserError(f"weighting 'fixed' needs a weight for every task {list(tasks)}; "
                            f"missing {missing}, unknown {extra}")
        return {}

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        w = dict(self.weights)
        return WeightingOutput({t: jnp.asarray(w[t], jnp.float32) for t in losses}, state)
