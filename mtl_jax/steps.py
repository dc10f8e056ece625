"""Pure train and eval steps, and the train state.

``train_step(state, batch, *, model, tasks, weighting, tx, ...) -> (state, metrics)`` is a
module-level pure function; :func:`mtl_jax.train.make_steps` binds the keyword-only
dependencies with ``functools.partial`` and compiles it with ``jax.jit`` and explicit
shardings (the batch split over mesh axis ``data``, the state replicated) and donation of the
state.

Non-finite losses never reach the parameters: when any task loss, the total or the gradient
norm is not finite, the step keeps params, batch statistics, optimiser and weighting state as
they were (the step counter still advances) and reports ``nonfinite/<task>`` flags; the host
then stops with an error naming the step and the task, or goes on when
``config.skip_nonfinite`` is set. So a checkpoint never holds NaN parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtl_jax.weighting import Weighting

PyTree = Any
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a resume needs, in one pytree."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    weighting_state: PyTree
    rng: jax.Array


def init_state(rng: jax.Array, image_shape: tuple[int, ...], *, model,
               tx: optax.GradientTransformation, weighting: Weighting, task_names) -> TrainState:
    """A fresh state (pure; jit it with ``out_shardings`` for a sharded init)."""
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init({"params": init_rng, "dropout": init_rng},
                           jnp.zeros(image_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        weighting_state=weighting.init(tuple(task_names)),
        rng=state_rng,
    )


def _part_norms(tree: PyTree, prefix: str) -> dict[str, jax.Array]:
    out = {prefix: optax.global_norm(tree)}
    for part, sub in tree.items():
        if part == "decoders":
            for task, dec in sub.items():
                out[f"{prefix}/decoders/{task}"] = optax.global_norm(dec)
        else:
            out[f"{prefix}/{part}"] = optax.global_norm(sub)
    return out


def forward_losses(params: PyTree, batch_stats: PyTree, batch: Batch, rng: jax.Array, *,
                   model, tasks: Mapping[str, Any], train: bool = True):
    """Model forward + per-task losses. Returns ``(losses, preds, aux, new_batch_stats)``."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (preds, aux), mutated = model.apply(variables, batch["image"], train=True,
                                            mutable=["batch_stats"], rngs={"dropout": rng})
        new_stats = mutated.get("batch_stats", batch_stats)
    else:
        preds, aux = model.apply(variables, batch["image"], train=False)
        new_stats = batch_stats
    losses = {name: task.loss(preds[name], batch) for name, task in tasks.items()}
    return losses, preds, aux, new_stats


def train_step(state: TrainState, batch: Batch, *, model, tasks: Mapping[str, Any],
               weighting: Weighting, tx: optax.GradientTransformation
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch; returns the new state and scalar metrics."""
    rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
        losses, _, aux, new_stats = forward_losses(params, state.batch_stats, batch, rng,
                                                   model=model, tasks=tasks)
        out = weighting(jax.lax.stop_gradient(losses), state.weighting_state, state.step)
        weights = jax.lax.stop_gradient(out.weights)
        total = sum(weights[t] * losses[t] for t in tasks)
        return total, (losses, out, new_stats, aux)

    (total, (losses, wout, new_stats, _)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    finite_task = {t: jnp.isfinite(losses[t]) for t in tasks}
    grad_norms = _part_norms(grads, "grad_norm")
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norms["grad_norm"])
    for f in finite_task.values():
        finite &= f

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(new_params, state.params),
        batch_stats=keep_if_finite(new_stats, state.batch_stats),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        weighting_state=keep_if_finite(wout.state, state.weighting_state),
    )
    metrics = {"loss/total": total, "nonfinite": ~finite}
    for t in tasks:
        metrics[f"loss/{t}"] = losses[t]
        metrics[f"weight/{t}"] = wout.weights[t]
        metrics[f"nonfinite/{t}"] = ~finite_task[t]
    metrics.update(grad_norms)
    metrics.update(_part_norms(state.params, "param_norm"))
    metrics["update_norm"] = optax.global_norm(updates)
    for k, v in wout.diagnostics.items():
        metrics[f"weighting/{k}"] = v
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model, tasks: Mapping[str, Any]
              ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Metric statistics (``{task: SumMetric}``) and per-task losses of one eval batch."""
    losses, preds, _, _ = forward_losses(state.params, state.batch_stats, batch, state.rng,
                                         model=model, tasks=tasks, train=False)
    stats = {name: task.metrics(preds[name], batch) for name, task in tasks.items()}
    return stats, losses


def predict_step(state: TrainState, image: jax.Array, *, model, tasks: Mapping[str, Any]
                 ) -> dict[str, jax.Array]:
    """Post-processed predictions (``{task: array}``) for pictures and inference."""
    preds, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, image,
                           train=False)
    return {name: task.postprocess(preds[name]) for name, task in tasks.items()}
