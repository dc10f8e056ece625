"""The SDE train state and the one step that updates the multi-task model and the pose network.

``sde_train_step(state, batch, ...) -> (state, metrics)`` is pure; :mod:`mtl_jax.sde.run`
compiles it with ``jax.jit`` (the batch split over mesh axis ``data``, the state replicated and
donated), as :func:`mtl_jax.steps.train_step`.

One step, on a batch of frame triplets (``image`` = frame t, ``image_prev``, ``image_next``,
``intrinsics``, the centre frame's labels):

1. The pose network sees each neighbour paired with the centre frame in temporal order
   (``[t-1, t]`` and ``[t, t+1]``, 6 channels), one forward pass per pair as the reference's
   ``pose_model_input: pairs`` (BatchNorm statistics advance twice per step), and predicts an
   axis-angle and a translation; the pose of frame -1 is inverted, as Monodepth2 does
   (``cam_T_cam``: centre camera -> neighbour camera).
2. The multi-task model runs on the centre frame (train mode). The supervised tasks' losses
   are their usual multi-scale objectives (:func:`mtl_jax.steps.task_objective`); the
   ``disp`` task's loss is Monodepth2's :func:`~mtl_jax.sde.photometric.monodepth_loss` over
   the disparity at scale 0 and at every side output (native resolutions).
3. The config's (loss-based) weighting combines the losses; one backward pass gives both
   networks' gradients; one global norm clips them together (the reference clips every
   parameter of its model, which holds the pose network); each network has its own
   optimiser (the pose network's learning rate is 1e-6 in the released configuration).

Depth labels and the procedural set's true poses are removed from the batch before anything
else (:data:`LABELS_NOT_USED`): the SDE loss cannot see them. A non-finite loss or gradient
keeps both networks as they were (the step counter advances), as in :mod:`mtl_jax.steps`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtl_jax import steps
from mtl_jax.models.architectures.posenet import init_pose_network, pose_pair
from mtl_jax.sde.geometry import transformation_from_parameters
from mtl_jax.sde.photometric import MonodepthOptions, monodepth_loss
from mtl_jax.tasks.base import bad_label_counts
from mtl_jax.weighting import Weighting

PyTree = Any
#: Batch fields the SDE step never reads: evaluation-only labels and the procedural set's
#: true camera motion.
LABELS_NOT_USED = ("depth", "normals", "edges", "pose_prev", "pose_next")
#: The batch field of each neighbour frame id.
FRAME_KEYS = {-1: "image_prev", 1: "image_next"}
SDE_TASK = "disp"


@flax.struct.dataclass
class SDETrainState(steps.TrainState):
    """:class:`~mtl_jax.steps.TrainState` (the multi-task model) plus the pose network's
    parameters, BatchNorm statistics and optimiser state."""

    pose_params: PyTree
    pose_stats: PyTree
    pose_opt_state: PyTree


def init_pose(rng: jax.Array, input_size: tuple[int, int], *, pose_net,
              pose_tx: optax.GradientTransformation) -> tuple[PyTree, PyTree, PyTree]:
    """``(pose_params, pose_stats, pose_opt_state)`` of a fresh pose network."""
    variables = init_pose_network(pose_net, rng, input_size)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), pose_tx.init(params)


def predict_poses(pose_net, params: PyTree, stats: PyTree, batch: Mapping[str, jax.Array],
                  frame_ids, *, train: bool) -> tuple[dict[int, jax.Array], PyTree, dict]:
    """``({frame_id: T [B,4,4]}, new pose stats, {frame_id: (axisangle, translation)})``: one
    pose-network pass per neighbour, the pair in temporal order, T of negative ids inverted."""
    poses, raw = {}, {}
    for f in frame_ids[1:]:
        pair = pose_pair(batch["image"], batch[FRAME_KEYS[f]], f)
        variables = {"params": params, "batch_stats": stats}
        if train:
            (axisangle, translation), mutated = pose_net.apply(
                variables, pair, train=True, mutable=["batch_stats"])
            stats = mutated.get("batch_stats", stats)
        else:
            axisangle, translation = pose_net.apply(variables, pair, train=False)
        poses[f] = transformation_from_parameters(axisangle, translation, invert=f < 0)
        raw[f] = (axisangle, translation)
    return poses, stats, raw


def disparities(preds: Mapping[str, jax.Array], aux: Mapping[str, jax.Array],
                scales) -> dict[int, jax.Array]:
    """``{scale: disparity}``: the final prediction (scale 0) and the side outputs."""
    return {s: preds[SDE_TASK] if s == 0 else aux[f"{SDE_TASK}/side/{s}"] for s in scales}


def sde_train_step(state: SDETrainState, batch: Mapping[str, jax.Array], *, model, pose_net,
                   tasks: Mapping[str, Any], weighting: Weighting,
                   tx: optax.GradientTransformation, pose_tx: optax.GradientTransformation,
                   options: MonodepthOptions, clip_norm: float | None
                   ) -> tuple[SDETrainState, dict[str, jax.Array]]:
    """One optimisation step of both networks (module docstring)."""
    rng = jax.random.fold_in(state.rng, state.step)
    drop_rng, noise_rng = jax.random.split(rng)
    batch = {k: v for k, v in batch.items() if k not in LABELS_NOT_USED}
    neighbours = {f: batch[FRAME_KEYS[f]] for f in options.frame_ids[1:]}

    def objective(params, pose_params):
        poses, pose_stats, raw = predict_poses(pose_net, pose_params, state.pose_stats, batch,
                                               options.frame_ids, train=True)
        (preds, aux), mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": drop_rng})
        sde_total, per_scale, automask = monodepth_loss(
            disparities(preds, aux, options.scales), batch["image"], neighbours,
            batch["intrinsics"], poses, noise_rng, options)
        losses = {name: sde_total if name == SDE_TASK
                  else steps.task_objective(task, name, preds[name], aux, batch)
                  for name, task in tasks.items()}
        out = weighting(jax.lax.stop_gradient(losses), state.weighting_state, state.step,
                        rng=rng)
        weights = jax.lax.stop_gradient(out.weights)
        total = sum(weights[t] * losses[t] for t in tasks)
        extra = {"per_scale": per_scale, "automask": automask, "raw": raw}
        return total, (losses, out, mutated.get("batch_stats", state.batch_stats), pose_stats,
                       extra)

    (total, (losses, wout, new_stats, new_pose_stats, extra)), (grads, pose_grads) = \
        jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(state.params,
                                                                    state.pose_params)
    norm = optax.global_norm((grads, pose_grads))
    grad_metrics = steps.part_norms(grads, "grad_norm")  # before clipping
    grad_metrics["grad_norm"] = norm  # both networks
    grad_metrics["grad_norm/pose_net"] = optax.global_norm(pose_grads)
    if clip_norm:
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
        grads, pose_grads = jax.tree.map(lambda g: g * scale.astype(g.dtype),
                                         (grads, pose_grads))
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    pose_updates, new_pose_opt = pose_tx.update(pose_grads, state.pose_opt_state,
                                                state.pose_params)

    finite, finite_task = steps.finite_flags(total, norm, losses, tasks)

    keep = functools.partial(steps.keep_where, finite)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(optax.apply_updates(state.params, updates), state.params),
        batch_stats=keep(new_stats, state.batch_stats),
        opt_state=keep(new_opt, state.opt_state),
        weighting_state=keep(wout.state, state.weighting_state),
        pose_params=keep(optax.apply_updates(state.pose_params, pose_updates),
                         state.pose_params),
        pose_stats=keep(new_pose_stats, state.pose_stats),
        pose_opt_state=keep(new_pose_opt, state.pose_opt_state))
    metrics = steps.task_metrics(total, losses, wout, finite_task, tasks)
    metrics["nonfinite"] = ~finite
    for s, value in extra["per_scale"].items():
        metrics[f"loss/{SDE_TASK}/scale_{s}"] = value
    metrics["sde/automask_fraction"] = jnp.mean(extra["automask"].astype(jnp.float32))
    for f, (axisangle, translation) in extra["raw"].items():
        metrics[f"sde/pose/{f:+d}/translation"] = jnp.mean(jnp.linalg.norm(translation, axis=-1))
        metrics[f"sde/pose/{f:+d}/rotation"] = jnp.mean(jnp.linalg.norm(axisangle, axis=-1))
    metrics.update(grad_metrics)
    metrics.update(steps.alpha_summaries(new_state.params))
    metrics.update({f"bad_labels/{t}": n for t, n in bad_label_counts(tasks, batch).items()})
    return new_state, metrics
