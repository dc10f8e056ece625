"""TrimmedMean: coordinate-wise trimmed mean (Yin et al., ICML 2018), as TorchJD's
aggregator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, unstack


@dataclasses.dataclass(frozen=True)
class TrimmedMean(GradientWeighting):
    """"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", Yin et
    al., ICML 2018, in TorchJD's form: per coordinate, drop the ``trim_number`` largest and
    ``trim_number`` smallest of the T task-gradient entries and average the remaining
    ``T - 2 trim_number``. The result is returned as ``shared_grad`` (a per-coordinate
    selection is no combination of whole gradients). Needs ``T >= 2 trim_number + 1``
    (UserError at init). TorchJD requires ``trim_number``; the default here is 1 (for 3
    tasks: the coordinate-wise median). ``trim_number = 0`` is the mean.

    The weights label the step: ``w_t`` = the fraction of coordinates where task t's entry
    was kept, divided by ``T - 2 trim_number`` (they sum to 1; 1/T each for the mean).
    Decoders get their plain gradients (``decoder_weighting = 'ones'``); ``rep_grad`` is read
    by the train step.
    """

    name: ClassVar[str] = "trimmed_mean"

    trim_number: int = 1

    def init(self, tasks: Sequence[str]):
        if self.trim_number < 0:
            raise UserError("weighting 'trimmed_mean': trim_number must be >= 0")
        if len(tasks) < 2 * self.trim_number + 1:
            raise UserError(f"weighting 'trimmed_mean' with trim_number={self.trim_number} "
                            f"needs at least {2 * self.trim_number + 1} tasks; got "
                            f"{len(tasks)} (use trim_number=0, the mean)")
        return {}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        grads = self.task_grads(grads)
        num_tasks = grads.shape[0]
        k = int(self.trim_number)
        kept_count = num_tasks - 2 * k
        order = jnp.argsort(grads, axis=0, stable=True)  # [T, N]: task index by rank
        ranks = jnp.argsort(order, axis=0)  # rank of every entry within its coordinate
        kept = ((ranks >= k) & (ranks < num_tasks - k)).astype(jnp.float32)
        shared = jnp.sum(grads * kept, axis=0) / kept_count
        weights = jnp.mean(kept, axis=1) / kept_count
        return WeightingOutput(unstack(tasks, weights), state, shared_grad=shared)
