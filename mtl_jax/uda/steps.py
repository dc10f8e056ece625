"""The UDA train state and the one step that updates both players.

``uda_train_step(state, batch, ...) -> (state, metrics)`` is pure; :mod:`mtl_jax.uda.run`
compiles it with ``jax.jit`` (batch halves split over mesh axis ``data``, the state
replicated and donated), exactly as :func:`mtl_jax.steps.train_step`.

``batch = {'source': {...labelled}, 'target': {'image': ...}}`` (``'target'`` is unused and may
be absent when ``adversarial=False``). One step:

1. Generator (the multi-task model, parameters ``state.params``): forward on the source half
   (train mode) -> supervised task losses, weighted by the config's strategy (loss-based
   strategies; the weights see the supervised losses only); forward on the target half (train
   mode, BatchNorm statistics continue from the source pass, as two PyTorch forwards do) ->
   discriminator inputs (:mod:`mtl_jax.uda.inputs`) -> ``L_adv = Σ_{task, scale}
   BCE(D(target), 'source')`` with the discriminators' parameters held constant.
   ``L_G = Σ_t w_t L_t + lambda_adv · L_adv``; the config's optimiser updates the model.
2. Discriminators (``state.disc_params``): on the *detached* source and target inputs of the
   same forward passes, ``L_D = Σ_{task, scale} (BCE(D(source), 'source') + BCE(D(target),
   'target')) / 2`` (ADVENT's halves); their own optimiser (Adam 1e-4, β = (0.9, 0.99), poly
   0.9) updates them, and their spectral-norm power-iteration state advances (two iterations
   per step: the source call, then the target call).

The generator's gradient is taken w.r.t. the model's parameters only and the discriminator's
w.r.t. the discriminators' only, so neither update can move the other player. A non-finite
loss or gradient keeps both players as they were (the step counter advances), as in
:mod:`mtl_jax.steps`. The labels outside a task's range in the labelled half are counted
(``bad_labels/<task>``, as :func:`mtl_jax.steps.train_step` does) for the loop to check; the
target half's labels, when its dataset has any, are never read, so never counted (in the
oracle configuration the labelled half *is* the target data: ``config.dataset``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtl_jax import steps
from mtl_jax.tasks.base import bad_label_counts
from mtl_jax.uda.inputs import discriminator_inputs
from mtl_jax.weighting import Weighting

PyTree = Any
SOURCE, TARGET = 1.0, 0.0  # discriminator labels


@flax.struct.dataclass
class UDATrainState(steps.TrainState):
    """:class:`~mtl_jax.steps.TrainState` (the model's part) plus the discriminators'.

    ``disc_stats`` is the spectral norms' power-iteration state (``u`` and ``sigma`` of every
    kernel, Flax's ``batch_stats`` collection); it is saved and restored with the rest.
    """

    disc_params: PyTree
    disc_stats: PyTree
    disc_opt_state: PyTree


def init_disc(rng: jax.Array, input_shapes: Mapping[str, tuple[int, ...]], *, disc,
              disc_tx: optax.GradientTransformation) -> tuple[PyTree, PyTree, PyTree]:
    """``(disc_params, disc_stats, disc_opt_state)`` for inputs of ``input_shapes``."""
    variables = disc.init({"params": rng},
                          {k: jnp.zeros(s, jnp.float32) for k, s in input_shapes.items()},
                          update_stats=False)
    params = variables["params"]
    return params, variables["batch_stats"], disc_tx.init(params)


def bce_with_logits(logits: jax.Array, label: float) -> jax.Array:
    """Mean binary cross-entropy of patch logits against a constant label (PyTorch's
    ``BCEWithLogitsLoss``)."""
    logits = jnp.asarray(logits, jnp.float32)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)))


def _accuracy(logits: jax.Array, label: float) -> jax.Array:
    return jnp.mean(((logits > 0).astype(jnp.float32) == label).astype(jnp.float32))


def generator_step(state: UDATrainState, batch: Mapping[str, Mapping[str, jax.Array]],
                   rng: jax.Array, *, model, tasks: Mapping[str, Any], weighting: Weighting,
                   tx: optax.GradientTransformation, disc, lambda_adv: float,
                   scales: Sequence[int], adversarial: bool = True):
    """The model's update (step 1 of the module docstring).

    Returns ``(state, disc_inputs, finite, metrics)``: ``state`` with new ``params``,
    ``batch_stats``, ``opt_state`` and ``weighting_state`` (the discriminators' fields are
    untouched: the gradient is taken w.r.t. ``state.params`` only), the detached discriminator
    inputs ``{'source': {key: x}, 'target': {key: x}}`` (empty without ``adversarial``), and
    whether every loss and the gradient norm are finite.
    """
    r_src, r_tgt, r_flip = jax.random.split(rng, 3)
    names = tuple(tasks)
    source = batch["source"]
    disc_frozen = {"params": state.disc_params, "batch_stats": state.disc_stats}

    def objective(params):
        losses, preds_s, aux_s, stats = steps.forward_losses(
            params, state.batch_stats, source, r_src, model=model, tasks=tasks)
        wout = weighting(steps._in_task_order(jax.lax.stop_gradient(losses), tasks),
                         state.weighting_state, state.step, rng=rng)
        weights = jax.lax.stop_gradient(wout.weights)
        supervised = sum(weights[t] * losses[t] for t in names)
        adv, d_in = {}, {}
        if adversarial:
            (preds_t, aux_t), mutated = model.apply(
                {"params": params, "batch_stats": stats}, batch["target"]["image"], train=True,
                mutable=["batch_stats"], rngs={"dropout": r_tgt})
            stats = mutated.get("batch_stats", stats)
            d_in = {"source": discriminator_inputs(preds_s, aux_s, names, scales),
                    "target": discriminator_inputs(preds_t, aux_t, names, scales)}
            logits = disc.apply(disc_frozen, d_in["target"], update_stats=False,
                                flip_rng=r_flip)
            adv = {k: bce_with_logits(v, SOURCE) for k, v in logits.items()}
        adv_total = sum(adv.values()) if adv else jnp.zeros((), jnp.float32)
        total = supervised + lambda_adv * adv_total
        return total, (losses, wout, stats, supervised, adv, adv_total, d_in)

    (total, (losses, wout, new_stats, supervised, adv, adv_total, d_in)), grads = \
        jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(params=optax.apply_updates(state.params, updates),
                              batch_stats=new_stats, opt_state=new_opt_state,
                              weighting_state=wout.state)
    grad_norms = steps.part_norms(grads, "grad_norm")  # as the supervised step logs them
    finite, finite_task = steps.finite_flags(total, grad_norms["grad_norm"], losses, names)
    metrics = steps.task_metrics(total, losses, wout, finite_task, names)
    metrics.update({"loss/supervised": supervised, **grad_norms,
                    "update_norm": optax.global_norm(updates)})
    if adversarial:
        metrics["loss/adversarial"] = adv_total
        metrics.update({f"adv/{k}": v for k, v in adv.items()})
    return new_state, jax.lax.stop_gradient(d_in), finite, metrics


def discriminator_step(state: UDATrainState, disc_inputs: Mapping[str, Mapping[str, jax.Array]],
                       rng: jax.Array, *, disc, disc_tx: optax.GradientTransformation):
    """The discriminators' update (step 2 of the module docstring) on detached inputs.

    Returns ``(state, finite, metrics)``; only ``disc_params``, ``disc_stats`` and
    ``disc_opt_state`` change (the gradient is taken w.r.t. ``state.disc_params`` only).
    """
    d_src = jax.lax.stop_gradient(disc_inputs["source"])
    d_tgt = jax.lax.stop_gradient(disc_inputs["target"])
    r_flip_s, r_flip_t = jax.random.split(rng)

    def objective(disc_params):
        logits_s, mut = disc.apply(
            {"params": disc_params, "batch_stats": state.disc_stats}, d_src,
            update_stats=True, flip_rng=r_flip_s, mutable=["batch_stats"])
        logits_t, mut = disc.apply(
            {"params": disc_params, "batch_stats": mut["batch_stats"]}, d_tgt,
            update_stats=True, flip_rng=r_flip_t, mutable=["batch_stats"])
        per_key = {k: 0.5 * (bce_with_logits(logits_s[k], SOURCE)
                             + bce_with_logits(logits_t[k], TARGET)) for k in logits_s}
        acc = {k: 0.5 * (_accuracy(logits_s[k], SOURCE) + _accuracy(logits_t[k], TARGET))
               for k in logits_s}
        return sum(per_key.values()), (per_key, acc, mut["batch_stats"])

    (d_total, (d_losses, d_acc, d_stats)), d_grads = jax.value_and_grad(
        objective, has_aux=True)(state.disc_params)
    d_updates, d_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    d_grad_norm = optax.global_norm(d_grads)
    finite = jnp.isfinite(d_total) & jnp.isfinite(d_grad_norm)
    new_state = state.replace(disc_params=optax.apply_updates(state.disc_params, d_updates),
                              disc_stats=d_stats, disc_opt_state=d_opt_state)
    metrics = {"disc/loss": d_total, "disc/grad_norm": d_grad_norm,
               "disc/update_norm": optax.global_norm(d_updates)}
    for k in d_losses:
        metrics[f"disc/loss/{k}"] = d_losses[k]
        metrics[f"disc/accuracy/{k}"] = d_acc[k]
    return new_state, finite, metrics


def uda_train_step(state: UDATrainState, batch: Mapping[str, Mapping[str, jax.Array]], *,
                   model, tasks: Mapping[str, Any], weighting: Weighting,
                   tx: optax.GradientTransformation, disc,
                   disc_tx: optax.GradientTransformation, lambda_adv: float,
                   scales: Sequence[int], adversarial: bool = True
                   ) -> tuple[UDATrainState, dict[str, jax.Array]]:
    """One step of both players on a mixed batch (module docstring); scalar metrics.

    :func:`generator_step`, then (with ``adversarial``) :func:`discriminator_step` on the
    detached outputs of the same forward passes; when anything is non-finite, both players
    keep their previous state and only the step counter advances.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    r_gen, r_disc = jax.random.split(rng)
    new_state, d_in, finite, metrics = generator_step(
        state, batch, r_gen, model=model, tasks=tasks, weighting=weighting, tx=tx, disc=disc,
        lambda_adv=lambda_adv, scales=scales, adversarial=adversarial)
    if adversarial:
        new_state, d_finite, d_metrics = discriminator_step(new_state, d_in, r_disc, disc=disc,
                                                            disc_tx=disc_tx)
        finite &= d_finite
        metrics.update(d_metrics)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics["nonfinite"] = ~finite
    metrics.update(steps.alpha_summaries(new_state.params))
    metrics.update({f"bad_labels/{t}": n
                    for t, n in bad_label_counts(tasks, batch["source"]).items()})
    return new_state.replace(step=state.step + 1), metrics
