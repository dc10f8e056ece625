"""Pure train and eval steps, and the train state.

``train_step(state, batch, *, model, tasks, weighting, tx, ...) -> (state, metrics)`` is a
module-level pure function; :func:`mtl_jax.experiment.build_experiment` binds the
keyword-only dependencies with ``functools.partial`` and compiles it with ``jax.jit`` and explicit
shardings (the batch split over mesh axis ``data``, the state replicated) and donation of the
state.

Non-finite losses never reach the parameters: when any task loss, the total or the gradient
norm is not finite, the step keeps params, batch statistics, optimiser and weighting state as
they were (the step counter still advances) and reports ``nonfinite/<task>`` flags; the host
then stops with an error naming the step and the task, or goes on when
``config.skip_nonfinite`` is set. So a checkpoint never holds NaN parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from mtl_jax.models.interface import loss_groups_of
from mtl_jax.models.layers import resize_bilinear
from mtl_jax.models.multitask import attention_masks, side_outputs, transferred_outputs
from mtl_jax.tasks.base import LabelErrorCount, bad_label_counts
from mtl_jax.tasks.compat import compat_metrics
from mtl_jax.weighting import Weighting
from mtl_jax.weighting.base import decoder_weights_of, flat_rows, select_prefix, unflatten_row

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

    def model_state(self) -> TrainState:
        """The model's part as a plain ``TrainState`` (for the eval/predict steps): itself,
        or, for a state that also holds other networks (UDA's discriminators, SDE's pose
        network), its model fields."""
        return TrainState(step=self.step, params=self.params, batch_stats=self.batch_stats,
                          opt_state=self.opt_state, weighting_state=self.weighting_state,
                          rng=self.rng)


def init_state(rng: jax.Array, param_rng: jax.Array, image_shape: tuple[int, ...], *, model,
               tx: optax.GradientTransformation, weighting: Weighting, task_names) -> TrainState:
    """A fresh state (pure; jit it with ``out_shardings`` for a sharded init).

    ``param_rng`` initialises the parameters; ``rng`` becomes the state's key, folded with the
    step for per-step randomness (dropout, random weightings).
    """
    variables = model.init({"params": param_rng, "dropout": param_rng},
                           jnp.zeros(image_shape, jnp.float32), train=False)
    params = variables["params"]
    extra = {}
    if weighting.needs_grad_dim:  # row length of the per-task gradients (shared parameters)
        shared = {k: v for k, v in params.items() if k != "decoders"}
        extra["grad_dim"] = sum(int(x.size) for x in jax.tree.leaves(shared))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        weighting_state=weighting.init(tuple(task_names), **extra),
        rng=rng,
    )


def part_norms(tree: PyTree, prefix: str) -> dict[str, jax.Array]:
    """Global norm of ``tree`` as ``prefix`` and of each of its parts: ``<prefix>/<part>``,
    and ``<prefix>/decoders/<task>`` for each task's decoder."""
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
    return task_losses(model, tasks, preds, aux, batch), preds, aux, new_stats


def task_losses(model, tasks: Mapping[str, Any], preds: Mapping[str, jax.Array],
                aux: Mapping[str, jax.Array], batch: Batch) -> dict[str, jax.Array]:
    """``{task: loss}`` that the weighting sees: each task's :func:`task_objective`, regrouped
    by the model's optional ``loss_groups(losses, preds, aux, batch, tasks) -> losses`` hook
    when it has one (XTasC-Net adds its cross-task terms, which need every task's prediction).
    Models with such a hook train through :func:`coupled_grads` in decomposed steps."""
    losses = {name: task_objective(task, name, preds[name], aux, batch)
              for name, task in tasks.items()}
    groups = loss_groups_of(model)
    return losses if groups is None else groups(losses, preds, aux, batch, tasks)


def task_objective(task, name: str, pred: jax.Array, aux: Mapping[str, jax.Array],
                   batch: Batch) -> jax.Array:
    """Loss of task ``name``: its loss on the prediction, averaged with its losses on the
    model's side outputs (aux ``'<name>/side/<k>'``, already at the label size) when there are
    any -- the multi-scale objective of DenseMTL (scales 0 and 1) and PAD-Net's deep
    supervision."""
    terms = [task.loss(pred, batch)]
    terms += [task.loss(side, batch) for side in side_outputs(aux, name).values()]
    return sum(terms) / len(terms)


def alpha_summaries(params: PyTree) -> dict[str, jax.Array]:
    """Mean |α| of every parameter named ``alpha*`` (the xTAM per-channel weights of the
    correlation-guided branch, which start at 0): ``{'alpha/<module path>': scalar}``."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {f"alpha/{path}": jnp.mean(jnp.abs(value.astype(jnp.float32)))
            for path, value in flat.items() if path.rsplit("/", 1)[-1].startswith("alpha")}


def _in_task_order(d: Mapping[str, Any], tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Tree maps return dicts with sorted keys; strategies get them in task order."""
    return {t: d[t] for t in tasks}


def _loss_weighted_grads(state: TrainState, batch: Batch, rng: jax.Array, *, model, tasks,
                         weighting: Weighting):
    """``requires='losses'``: weights from the loss values, one backward of the total."""

    def objective(params):
        losses, _, _, new_stats = forward_losses(params, state.batch_stats, batch, rng,
                                                 model=model, tasks=tasks)
        out = weighting(_in_task_order(jax.lax.stop_gradient(losses), tasks),
                        state.weighting_state, state.step, rng=rng)
        weights = jax.lax.stop_gradient(out.weights)
        total = sum(weights[t] * losses[t] for t in tasks)
        return total, (losses, out, new_stats)

    (total, (losses, wout, new_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    return total, losses, wout, new_stats, grads


def _encoder_vjp(params: PyTree, stats: PyTree, image: jax.Array, rngs, model):
    """The encoder's forward under ``jax.vjp`` w.r.t. its parameters: ``(features, vjp,
    updated batch_stats)``."""

    def encode(enc_params):
        p = {**params, "encoder": enc_params}
        feats, mutated = model.apply({"params": p, "batch_stats": stats}, image, train=True,
                                     method=type(model).encode, mutable=["batch_stats"],
                                     rngs=rngs)
        return feats, mutated["batch_stats"]

    return jax.vjp(encode, params["encoder"], has_aux=True)


def decomposed_grads(state: TrainState, batch: Batch, rng: jax.Array, *, model, tasks,
                     weighting: Weighting):
    """Gradients with per-task information from one forward pass.

    The encoder runs once under ``jax.vjp``; every decoder runs under its own VJP, which gives
    the gradient of L_t w.r.t. decoder t and the cotangent of L_t at the shared features.
    Gradient-based strategies read the decoder gradients (``'decoder_grads'``) or per-task
    gradients of the shared parameters -- the per-task cotangents pulled back through the
    encoder in one vmapped VJP -- or of the shared representation (the cotangents themselves,
    ``rep_grad=True``). The weighted cotangents are then pulled back through the encoder once
    (or the per-task encoder gradients, when already computed, are combined directly).
    """
    params, stats = state.params, state.batch_stats
    shared = set(params) - {"decoders"}
    if shared != {"encoder"} or loss_groups_of(model) is not None:
        # Interaction/exchange modules or cross-task loss terms couple the decoders: one VJP
        # per task loss instead.
        return coupled_grads(state, batch, rng, model=model, tasks=tasks, weighting=weighting)
    image = batch["image"]
    out_size = image.shape[1:3]
    rngs = {"dropout": rng}
    cls = type(model)

    feats, enc_vjp, enc_stats = _encoder_vjp(params, stats, image, rngs, model)

    losses, g_feat, g_dec, new_dec_stats = {}, {}, {}, {}
    for t, task in tasks.items():
        def task_loss(f, dec_params, t=t, task=task):
            p = {**params, "decoders": {**params["decoders"], t: dec_params}}
            (pred, aux), mutated = model.apply(
                {"params": p, "batch_stats": stats}, f, out_size, t, train=True,
                method=cls.decode_task, mutable=["batch_stats"], rngs=rngs)
            return task_objective(task, t, pred, aux, batch), mutated["batch_stats"]

        loss_t, vjp_t, stats_t = jax.vjp(task_loss, feats, params["decoders"][t], has_aux=True)
        g_feat[t], g_dec[t] = vjp_t(jnp.ones_like(loss_t))
        losses[t] = loss_t
        new_dec_stats[t] = stats_t.get("decoders", {}).get(t, {})

    inputs = {}
    per_task_enc = cts = None
    if weighting.requires == "decoder_grads":
        inputs["decoder_grads"] = g_dec
    elif weighting.requires == "task_grads":
        cts = jax.tree.map(lambda *xs: jnp.stack(xs), *[g_feat[t] for t in tasks])
        if getattr(weighting, "rep_grad", False):
            inputs["grads"] = flat_rows(cts)
        else:
            per_task_enc = jax.vmap(lambda ct: enc_vjp(ct)[0])(cts)
            chosen = select_prefix(per_task_enc, getattr(weighting, "grad_param_prefix", ""))
            inputs["grads"] = flat_rows(chosen)
    wout = weighting(_in_task_order(jax.lax.stop_gradient(losses), tasks),
                     state.weighting_state, state.step, rng=rng, **inputs)
    w = jax.lax.stop_gradient(wout.weights)
    w_vec = jnp.stack([w[t] for t in tasks])
    if wout.shared_grad is not None:  # a direction given in the layout of the gradient rows
        direction = jax.lax.stop_gradient(wout.shared_grad)
        if per_task_enc is not None:
            g_enc = unflatten_row(direction, per_task_enc)
        else:
            (g_enc,) = enc_vjp(unflatten_row(direction, cts))
    elif per_task_enc is not None:
        g_enc = jax.tree.map(lambda x: jnp.tensordot(w_vec, x, axes=1).astype(x.dtype),
                             per_task_enc)
    else:
        combined = jax.tree.map(
            lambda *xs: sum(w[t] * x for t, x in zip(tasks, xs, strict=True)).astype(xs[0].dtype),
            *[g_feat[t] for t in tasks])
        (g_enc,) = enc_vjp(combined)
    dec_w = decoder_weights_of(weighting, wout, w)
    grads = {"encoder": g_enc,
             "decoders": {t: jax.tree.map(lambda g, t=t: (dec_w[t] * g).astype(g.dtype), g_dec[t])
                          for t in tasks}}
    total = sum(w[t] * losses[t] for t in tasks)
    new_stats = dict(stats)
    if "encoder" in enc_stats:
        new_stats["encoder"] = enc_stats["encoder"]
    if "decoders" in stats:
        new_stats["decoders"] = {**stats["decoders"], **{t: s for t, s in new_dec_stats.items()
                                                         if s}}
    return total, losses, wout, new_stats, grads


def coupled_grads(state: TrainState, batch: Batch, rng: jax.Array, *, model, tasks,
                  weighting: Weighting):
    """:func:`decomposed_grads` for models whose task heads are coupled (an interaction module
    or exchange blocks between decoder stages, e.g. DenseMTL's mTEB).

    The encoder runs once under ``jax.vjp``; everything after it (interaction/exchange modules
    and all decoders) runs once under a second VJP that returns the vector of task losses, and
    ``jax.vmap`` of that VJP over the T unit cotangents gives, per task t, the gradient of L_t
    w.r.t. the shared features and w.r.t. every non-encoder parameter (T backward passes of
    the heads, no second forward). The shared parameters are the encoder and the non-decoder
    modules (``exchange_stage*``, ``padnet``, ...): strategies that need ``'task_grads'`` see
    the per-task gradients of all of them (or of the encoder's output with ``rep_grad``; the
    exchange modules then get Σ_t w_t g_t). ``'decoder_grads'`` are ∂L_t/∂(decoder t). Decoder
    t's update is Σ_s w_s ∂L_s/∂(decoder t) (other tasks reach it through the exchange), with
    w_s = 1 for strategies whose ``decoder_weighting`` is ``'ones'``.
    """
    params, stats = state.params, state.batch_stats
    image = batch["image"]
    out_size = image.shape[1:3]
    rngs = {"dropout": rng}
    cls = type(model)
    names = tuple(tasks)
    rest = {k: v for k, v in params.items() if k != "encoder"}

    def head_losses(feats, rest_params):
        p = {**rest_params, "encoder": params["encoder"]}
        (preds, aux), mutated = model.apply({"params": p, "batch_stats": stats}, feats, out_size,
                                            train=True, method=cls.decode,
                                            mutable=["batch_stats"], rngs=rngs)
        losses = task_losses(model, tasks, preds, aux, batch)
        return jnp.stack([losses[t] for t in names]), (losses, mutated["batch_stats"])

    feats, enc_vjp, enc_stats = _encoder_vjp(params, stats, image, rngs, model)
    _, head_vjp, (losses, head_stats) = jax.vjp(head_losses, feats, rest, has_aux=True)
    g_feat, g_rest = jax.vmap(head_vjp)(jnp.eye(len(names), dtype=jnp.float32))
    shared_rest = {k: v for k, v in g_rest.items() if k != "decoders"}

    inputs = {}
    per_task_enc = None
    if weighting.requires == "decoder_grads":
        inputs["decoder_grads"] = {t: jax.tree.map(lambda x, i=i: x[i], g_rest["decoders"][t])
                                   for i, t in enumerate(names)}
    elif weighting.requires == "task_grads":
        if getattr(weighting, "rep_grad", False):
            inputs["grads"] = flat_rows(g_feat)
        else:
            per_task_enc = jax.vmap(lambda ct: enc_vjp(ct)[0])(g_feat)
            prefix = getattr(weighting, "grad_param_prefix", "")
            chosen = select_prefix(per_task_enc, prefix)
            inputs["grads"] = flat_rows(chosen if prefix else (chosen, shared_rest))
    wout = weighting(_in_task_order(jax.lax.stop_gradient(losses), tasks),
                     state.weighting_state, state.step, rng=rng, **inputs)
    w = jax.lax.stop_gradient(wout.weights)
    w_vec = jnp.stack([w[t] for t in names])
    dec_w = decoder_weights_of(weighting, wout, w)
    dec_vec = jnp.stack([jnp.asarray(dec_w[t], jnp.float32) for t in names])

    def combine(vec, tree):
        return jax.tree.map(lambda x: jnp.tensordot(vec, x, axes=1).astype(x.dtype), tree)

    g_shared_rest = combine(w_vec, shared_rest)
    if wout.shared_grad is not None:  # a direction in the layout of the gradient rows
        direction = jax.lax.stop_gradient(wout.shared_grad)
        if per_task_enc is not None:
            g_enc, g_shared_rest = unflatten_row(direction, (per_task_enc, shared_rest))
        else:
            (g_enc,) = enc_vjp(unflatten_row(direction, g_feat))
    elif per_task_enc is not None:
        g_enc = combine(w_vec, per_task_enc)
    else:
        (g_enc,) = enc_vjp(combine(w_vec, g_feat))
    grads = {"encoder": g_enc, "decoders": combine(dec_vec, g_rest["decoders"]),
             **g_shared_rest}
    total = jnp.dot(w_vec, jnp.stack([losses[t] for t in names]))
    new_stats = {**stats, **head_stats}
    if "encoder" in enc_stats:
        new_stats["encoder"] = enc_stats["encoder"]
    return total, losses, wout, new_stats, grads


def finite_flags(total: jax.Array, grad_norm: jax.Array, losses: Mapping[str, jax.Array],
                 tasks) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(finite, {task: finite})``: whether the step's total, gradient norm and every task
    loss are finite (the update is applied only then), and each task loss's own flag."""
    finite_task = {t: jnp.isfinite(losses[t]) for t in tasks}
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    return functools.reduce(jnp.logical_and, finite_task.values(), finite), finite_task


def keep_where(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``finite``, else ``old``, leaf by leaf (a skipped non-finite step)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def task_metrics(total: jax.Array, losses: Mapping[str, jax.Array], wout, finite_task,
                 tasks) -> dict[str, jax.Array]:
    """What every kind of train step logs of its tasks: ``loss/total``, ``loss/<task>``,
    ``weight/<task>``, ``nonfinite/<task>``, the weighting's ``weighting/<key>``."""
    metrics = {"loss/total": total}
    for t in tasks:
        metrics.update({f"loss/{t}": losses[t], f"weight/{t}": wout.weights[t],
                        f"nonfinite/{t}": ~finite_task[t]})
    return metrics | {f"weighting/{k}": v for k, v in wout.diagnostics.items()}


def train_step(state: TrainState, batch: Batch, *, model, tasks: Mapping[str, Any],
               weighting: Weighting, tx: optax.GradientTransformation,
               decomposed: bool | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch; returns the new state and scalar metrics.

    ``decomposed`` (default: whenever the strategy needs gradients) selects
    :func:`decomposed_grads` instead of one backward pass of the weighted total; for
    loss-only strategies both give the same gradients.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if decomposed is None:
        decomposed = weighting.requires != "losses"
    grad_fn = decomposed_grads if decomposed else _loss_weighted_grads
    total, losses, wout, new_stats, grads = grad_fn(state, batch, rng, model=model, tasks=tasks,
                                                    weighting=weighting)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    grad_norms = part_norms(grads, "grad_norm")
    finite, finite_task = finite_flags(total, grad_norms["grad_norm"], losses, tasks)

    keep_if_finite = functools.partial(keep_where, finite)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(new_params, state.params),
        batch_stats=keep_if_finite(new_stats, state.batch_stats),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        weighting_state=keep_if_finite(wout.state, state.weighting_state),
    )
    metrics = task_metrics(total, losses, wout, finite_task, tasks)
    metrics["nonfinite"] = ~finite
    metrics.update(grad_norms)
    metrics.update(part_norms(state.params, "param_norm"))
    metrics.update(alpha_summaries(new_state.params))
    metrics["update_norm"] = optax.global_norm(updates)
    metrics.update({f"bad_labels/{t}": n for t, n in bad_label_counts(tasks, batch).items()})
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model, tasks: Mapping[str, Any],
              compat: tuple[str, ...] = ()) -> dict[str, Any]:
    """Metric statistics (``{task: SumMetric}``, sums and counts) of one eval batch.

    The task's metrics are those of the final prediction; a model's side outputs are scored
    too, under ``'<task>/side/<k>'`` (e.g. DenseMTL's half-resolution output), and its
    transferred predictions (aux ``'<task>/from/<source>'``, XTasC-Net) under
    ``'<task>/from/<source>'`` and, against the direct prediction taken as the label (their
    consistency), ``'<task>/from/<source>/vs_pred'``. ``compat`` modes
    (:mod:`mtl_jax.tasks.compat`) add the reference codes' statistics of the final prediction
    under ``'<task>/compat_<mode>'``."""
    preds, aux = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             batch["image"], train=False)
    out = {name: task.metrics(preds[name], batch) for name, task in tasks.items()}
    for name, task in tasks.items():
        for key, side in side_outputs(aux, name).items():
            out[f"{name}/side/{key}"] = task.metrics(side, batch)
        for src, pred in transferred_outputs(aux, name).items():
            out[f"{name}/from/{src}"] = task.metrics(pred, batch)
            direct = {**batch, task.label_key: task.postprocess(preds[name])}
            out[f"{name}/from/{src}/vs_pred"] = task.metrics(pred, direct)
    if compat:
        out.update(compat_metrics(dict(tasks), preds, batch, compat))
    for name, n in bad_label_counts(tasks, batch).items():  # out-of-range labels, counted
        out[f"bad_labels/{name}"] = LabelErrorCount(count=n)
    return out


def predict_step(state: TrainState, image: jax.Array, *, model, tasks: Mapping[str, Any]
                 ) -> dict[str, jax.Array]:
    """Post-processed predictions (``{task: array}``) for pictures and inference, plus the
    transferred ones (``'<task>/from/<source>'``) of models that have them, and for models
    with attention masks in aux (``'<task>/attention/<block>'``, e.g. AdaMT-Net)
    ``'attention/<task>/<block>'``: the mask's channel 0 resized (bilinear) to the image size,
    float32 ``[B, H, W]`` in [0, 1]."""
    preds, aux = model.apply({"params": state.params, "batch_stats": state.batch_stats}, image,
                             train=False)
    out = {name: task.postprocess(preds[name]) for name, task in tasks.items()}
    for name, task in tasks.items():
        for src, pred in transferred_outputs(aux, name).items():
            out[f"{name}/from/{src}"] = task.postprocess(pred)
    for key, mask in attention_masks(aux, tuple(tasks)).items():
        channel0 = resize_bilinear(mask[..., :1].astype(jnp.float32), image.shape[1:3])
        out[f"attention/{key}"] = jnp.clip(channel0[..., 0], 0.0, 1.0)
    return out
