"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019; also used by ATI-Net)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import Weighting, WeightingOutput, stack_losses, unstack


def _dwa_weights(recent: jax.Array, older: jax.Array, temperature: float) -> jax.Array:
    """``K * softmax(w / T)`` with ``w_t = recent_t / older_t`` (ratio 1 where ``older_t = 0``)."""
    safe_older = jnp.where(older > 0, older, 1.0)
    ratio = jnp.where(older > 0, recent / safe_older, 1.0)
    return recent.shape[0] * jax.nn.softmax(ratio / temperature)


@dataclasses.dataclass(frozen=True)
class DynamicWeightAverage(Weighting):
    """DWA: ``lambda_t = K exp(w_t / T) / sum_k exp(w_k / T)`` for ``K`` tasks, with
    ``w_t = Lbar_t(e-1) / Lbar_t(e-2)`` the ratio of the mean training losses of the two previous
    epochs, ``lambda_t = 1`` during the first two epochs, ``T = temperature = 2``.

    Epoch mode (``window == 0``; ``steps_per_epoch > 0``, filled by the trainer from the dataset
    size): an epoch is ``steps_per_epoch`` consecutive calls. The weights of a call depend only
    on the completed epochs, so they are computed before this step's losses are added to the
    running sum of the current epoch; when the epoch is complete its mean becomes
    ``Lbar(e-1)`` and the previous one ``Lbar(e-2)``.
    State: ``{'sum': [T], 'count': int32, 'mean_1': [T], 'mean_2': [T], 'epochs': int32}``
    (current-epoch loss sum and number of steps, last and second-to-last epoch means, number of
    completed epochs).

    Step-window variant (``window = W > 0``, takes precedence over ``steps_per_epoch``):
    ``Lbar(e-1)`` is the mean of the losses of the last ``W`` calls and ``Lbar(e-2)`` that of the
    ``W`` calls before those (a sliding window, updated every step); ``lambda = 1`` until ``2W``
    calls have been seen. State: ``{'history': [2W, T] (oldest first), 'seen': int32}``.

    A zero loss mean in the denominator gives ratio 1 for that task.
    """

    name: ClassVar[str] = "dwa"

    temperature: float = 2.0
    steps_per_epoch: int = 0
    window: int = 0

    def init(self, tasks: Sequence[str]):
        if self.window < 0 or self.steps_per_epoch < 0:
            raise UserError("weighting 'dwa': window and steps_per_epoch must be >= 0")
        if self.window == 0 and self.steps_per_epoch == 0:
            raise UserError("weighting 'dwa' needs steps_per_epoch > 0 (epoch means) or "
                            "window > 0 (step-window means)")
        if self.temperature <= 0:
            raise UserError("weighting 'dwa': temperature must be > 0")
        num = len(tasks)
        if self.window > 0:
            return {"history": jnp.zeros((2 * self.window, num), jnp.float32),
                    "seen": jnp.zeros((), jnp.int32)}
        return {"sum": jnp.zeros((num,), jnp.float32), "count": jnp.zeros((), jnp.int32),
                "mean_1": jnp.zeros((num,), jnp.float32),
                "mean_2": jnp.zeros((num,), jnp.float32), "epochs": jnp.zeros((), jnp.int32)}

    def __call__(self, losses, state, step, **inputs) -> WeightingOutput:
        tasks = list(losses)
        values = stack_losses(losses)
        if self.window > 0:
            weights, new_state = self._window_call(values, state)
        else:
            weights, new_state = self._epoch_call(values, state)
        return WeightingOutput(unstack(tasks, weights), new_state)

    def _epoch_call(self, values, state):
        mean_1 = jnp.asarray(state["mean_1"], jnp.float32)
        mean_2 = jnp.asarray(state["mean_2"], jnp.float32)
        epochs = jnp.asarray(state["epochs"], jnp.int32)
        weights = jnp.where(epochs >= 2, _dwa_weights(mean_1, mean_2, self.temperature), 1.0)

        total = jnp.asarray(state["sum"], jnp.float32) + values
        count = jnp.asarray(state["count"], jnp.int32) + 1
        done = count >= self.steps_per_epoch
        epoch_mean = total / count.astype(jnp.float32)
        new_state = {
            "sum": jnp.where(done, jnp.zeros_like(total), total),
            "count": jnp.where(done, 0, count).astype(jnp.int32),
            "mean_1": jnp.where(done, epoch_mean, mean_1),
            "mean_2": jnp.where(done, mean_1, mean_2),
            "epochs": (epochs + done.astype(jnp.int32)).astype(jnp.int32),
        }
        return weights, new_state

    def _window_call(self, values, state):
        history = jnp.asarray(state["history"], jnp.float32)
        seen = jnp.asarray(state["seen"], jnp.int32)
        w = self.window
        older = jnp.mean(history[:w], axis=0)
        recent = jnp.mean(history[w:], axis=0)
        weights = jnp.where(seen >= 2 * w, _dwa_weights(recent, older, self.temperature), 1.0)
        new_state = {
            "history": jnp.concatenate([history[1:], values[None]], axis=0),
            # Saturates at 2W, so it never overflows on long runs.
            "seen": jnp.minimum(seen + 1, 2 * w).astype(jnp.int32),
        }
        return weights, new_state
