"""The interface of a loss-weighting strategy, computed inside the jitted train step.

A strategy is a small frozen dataclass (hashable, closed over by ``jax.jit``) with:

* ``requires``: what the step must compute for it. ``'losses'`` (weights from the per-task
  losses only, e.g. ``ew``, ``fixed``, ``dwa``) is what the step provides today; gradient-based
  strategies declare the per-task gradients they need (w.r.t. the decoders, a shared layer,
  the shared parameters or the shared representation) and receive them as keyword arguments.
* ``init(tasks) -> state``: a pytree (possibly empty) saved in ``TrainState.weighting_state``
  and checkpointed with it.
* ``__call__(losses, state, step, **inputs) -> WeightingOutput``: per-task weights (treated as
  constants: the step stops gradients through them), the new state and scalar diagnostics.
  ``losses`` are the per-task float32 scalars of the current batch.

The step computes ``total = sum_t weight_t * loss_t`` and logs every weight as
``train/weight/<task>`` every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class WeightingOutput:
    """What a strategy returns inside the step."""

    weights: dict[str, jax.Array]
    state: PyTree
    diagnostics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Weighting:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    requires: ClassVar[str] = "losses"

    def init(self, tasks: Sequence[str]) -> PyTree:
        del tasks
        return {}

    def __call__(self, losses: Mapping[str, jax.Array], state: PyTree, step: jax.Array,
                 **inputs: Any) -> WeightingOutput:
        raise NotImplementedError
