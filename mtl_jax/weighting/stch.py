"""STCH: smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import Weighting, WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class STCH(Weighting):
    """"Smooth Tchebycheff Scalarization for Multi-Objective Optimization", Lin, Zhang, Liu,
    Zhang & Kwong, ICML 2024, in LibMTL's MTL form.

    Epochs are ``steps_per_epoch`` consecutive calls (filled by the trainer from the dataset
    size, as for ``dwa``); ``e`` is the current epoch (from 0).

    * ``e < warmup_epoch``: objective ``sum_t log(L_t + 1e-20)``, weights
      ``1 / (L_t + 1e-20)``.
    * ``e == warmup_epoch``: the same, and the losses of the epoch are averaged into the
      nadir vector ``z_t``.
    * later: ``l_t = log(L_t / z_t + 1e-20)``, objective
      ``T mu log sum_t exp(l_t / mu)`` (a smooth max of the log-normalised losses), weights
      ``w_t = T softmax(l / mu)_t / (z_t (L_t / z_t + 1e-20))``.

    Defaults as LibMTL: ``mu`` 1.0, ``warmup_epoch`` 4. State: ``{'count': int32 calls,
    'loss_sum': [T], 'loss_count': int32}`` (the nadir is ``loss_sum / loss_count``).
    Diagnostics ``nadir/<task>`` (0 until the nadir epoch has started).
    """

    name: ClassVar[str] = "stch"

    mu: float = 1.0
    warmup_epoch: int = 4
    steps_per_epoch: int = 0

    def init(self, tasks: Sequence[str]):
        if self.steps_per_epoch <= 0:
            raise UserError("weighting 'stch' needs steps_per_epoch > 0 (the trainer fills it "
                            "from the dataset size)")
        if self.mu <= 0 or self.warmup_epoch < 0:
            raise UserError("weighting 'stch': need mu > 0 and warmup_epoch >= 0")
        return {"count": jnp.zeros((), jnp.int32),
                "loss_sum": jnp.zeros((len(tasks),), jnp.float32),
                "loss_count": jnp.zeros((), jnp.int32)}

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        values = stack_losses(losses)
        count = jnp.asarray(state["count"], jnp.int32)
        epoch = count // self.steps_per_epoch
        warm = epoch < self.warmup_epoch
        averaging = epoch == self.warmup_epoch
        loss_sum = jnp.asarray(state["loss_sum"], jnp.float32)
        loss_count = jnp.asarray(state["loss_count"], jnp.int32)
        loss_sum = jnp.where(averaging, loss_sum + values, loss_sum)
        loss_count = jnp.where(averaging, loss_count + 1, loss_count)
        nadir = loss_sum / jnp.maximum(loss_count, 1).astype(jnp.float32)

        safe_nadir = jnp.where(nadir > 0, nadir, 1.0)
        normalised = values / safe_nadir + 1e-20
        logits = jnp.log(normalised) / self.mu
        smooth = len(tasks) * jax.nn.softmax(logits) / (safe_nadir * normalised)
        log_weights = 1.0 / (values + 1e-20)
        weights = jnp.where(warm | averaging, log_weights, smooth)
        new_state = {"count": count + 1, "loss_sum": loss_sum,
                     "loss_count": loss_count.astype(jnp.int32)}
        diagnostics = {f"nadir/{t}": nadir[i] for i, t in enumerate(tasks)}
        return WeightingOutput(unstack(tasks, weights), new_state, diagnostics)
