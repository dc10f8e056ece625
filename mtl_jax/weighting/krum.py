"""Krum: Byzantine-tolerant gradient selection (Blanchard et al., NeurIPS 2017), as TorchJD's
aggregator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, gram_matrix, unstack


@dataclasses.dataclass(frozen=True)
class Krum(GradientWeighting):
    """"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", Blanchard et
    al., NeurIPS 2017 (Krum / Multi-Krum), in TorchJD's form.

    With ``f = n_byzantine`` and the distances ``d_ij = ||g_i - g_j||`` (from the Gram
    matrix), every task gets the score ``s_i = sum`` of its ``T - f - 2`` smallest distances
    to the other tasks; the ``n_selected`` tasks with the lowest scores are averaged
    (weight ``1 / n_selected`` each, 0 for the others; ties go to the earlier task).
    TorchJD sums distances, the paper squared distances; this follows TorchJD. Needs
    ``T >= f + 3`` and ``T >= n_selected`` (UserError at init otherwise).
    TorchJD requires ``n_byzantine``; the default here is 0. ``decoder_weighting = 'ones'``;
    ``rep_grad`` is read by the train step. Diagnostics ``score/<task>`` (relative to the
    RMS gradient norm).
    """

    name: ClassVar[str] = "krum"

    n_byzantine: int = 0
    n_selected: int = 1

    def init(self, tasks: Sequence[str]):
        num = len(tasks)
        if self.n_byzantine < 0 or self.n_selected < 1:
            raise UserError("weighting 'krum': need n_byzantine >= 0 and n_selected >= 1")
        if num < self.n_byzantine + 3 or num < self.n_selected:
            raise UserError(f"weighting 'krum' with n_byzantine={self.n_byzantine}, n_selected="
                            f"{self.n_selected} needs at least "
                            f"{max(self.n_byzantine + 3, self.n_selected)} tasks; got {num}")
        return {}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        gram = gram_matrix(self.task_grads(grads))
        sq = jnp.diagonal(gram)
        rms = jnp.sqrt(jnp.maximum(jnp.mean(sq), 1e-30))
        dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)) / rms
        closest = num_tasks - self.n_byzantine - 2
        # Row i sorted: its own distance (0) first, then the nearest others.
        scores = jnp.sum(jnp.sort(dist, axis=1)[:, 1:closest + 1], axis=1)
        chosen = jnp.argsort(scores, stable=True)[:self.n_selected]
        weights = jnp.zeros((num_tasks,), jnp.float32).at[chosen].add(1.0 / self.n_selected)
        return WeightingOutput(unstack(tasks, weights), state,
                               {f"score/{t}": scores[i] for i, t in enumerate(tasks)})
