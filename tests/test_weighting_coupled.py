"""Gradient-based weighting on models whose task heads are coupled (DenseMTL's mTEB, PAD-Net):
``steps.coupled_grads`` (one encoder VJP, one head VJP vmapped over the task losses) equals a
naive reference built from one full ``jax.grad`` per task."""

import functools
import importlib.util
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import steps
from mtl_jax.experiment import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(weighting, model="ours", rep_grad=False):
    spec = importlib.util.spec_from_file_location(
        "densemtl", os.path.join(REPO, "configs", "densemtl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(f"dataset=synthetic,tasks=sdn,smoke,model={model},weighting={weighting},"
                       "attention_impl=naive")
    c.num_devices = 1
    c.model.encoder = "simple"  # compile time is what matters here
    c.model.encoder_kwargs = {"widths": (4, 8, 8, 8, 8)}
    if rep_grad:
        c.weighting.rep_grad = True
    return c


def _batch(n=2, h=32, w=48):
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(n, h, w, 3)).astype(np.float32)
    return {"image": jnp.asarray(rng.uniform(size=(n, h, w, 3)), jnp.float32),
            "semseg": jnp.asarray(rng.integers(-1, 10, (n, h, w)), jnp.int32),
            "depth": jnp.asarray(rng.uniform(0.5, 8, (n, h, w, 1)), jnp.float32),
            "normals": jnp.asarray(normals / np.linalg.norm(normals, axis=-1, keepdims=True))}


def _naive(state, batch, rng, *, model, tasks, weighting):
    def task_loss(params, t):
        return steps.forward_losses(params, state.batch_stats, batch, rng, model=model,
                                    tasks=tasks)[0][t]

    names = tuple(tasks)
    per_task = {t: jax.grad(task_loss)(state.params, t) for t in names}
    losses = steps.forward_losses(state.params, state.batch_stats, batch, rng, model=model,
                                  tasks=tasks)[0]
    shared = [k for k in state.params if k not in ("encoder", "decoders")]
    inputs = {}
    if weighting.requires == "decoder_grads":
        inputs["decoder_grads"] = {t: per_task[t]["decoders"][t] for t in names}
    elif weighting.requires == "task_grads":
        if weighting.rep_grad:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            feats = model.apply(variables, batch["image"], train=True, method=type(model).encode,
                                mutable=["batch_stats"], rngs={"dropout": rng})[0]

            def from_feats(f, t):
                (preds, aux), _ = model.apply(variables, f, batch["image"].shape[1:3],
                                              train=True, method=type(model).decode,
                                              mutable=["batch_stats"], rngs={"dropout": rng})
                return steps.task_objective(tasks[t], t, preds[t], aux, batch)

            rows = [jax.flatten_util.ravel_pytree(jax.grad(from_feats)(feats, t))[0]
                    for t in names]
        else:
            rows = [jax.flatten_util.ravel_pytree(
                (per_task[t]["encoder"], {k: per_task[t][k] for k in shared}))[0] for t in names]
        inputs["grads"] = jnp.stack(rows)
    out = weighting(losses, state.weighting_state, state.step, rng=rng, **inputs)
    w = out.weights
    dec_w = w if weighting.decoder_weighting == "weights" else {t: 1.0 for t in names}
    if out.decoder_weights is not None:
        dec_w = out.decoder_weights
    combined = {
        k: jax.tree.map(lambda *xs: sum(w[t] * x for t, x in zip(names, xs)),
                        *[per_task[t][k] for t in names])
        for k in ["encoder", *shared]}
    if out.shared_grad is not None:  # parameter rows: (encoder, other shared modules)
        t0 = names[0]
        unravel = jax.flatten_util.ravel_pytree(
            (per_task[t0]["encoder"], {k: per_task[t0][k] for k in shared}))[1]
        enc, rest = unravel(out.shared_grad)
        combined = {"encoder": enc, **rest}
    combined["decoders"] = jax.tree.map(lambda *xs: sum(dec_w[t] * x for t, x in zip(names, xs)),
                                        *[per_task[t]["decoders"] for t in names])
    return combined, w


# Per-task weights on the shared-parameter rows (MGDA) and decoder gradients on PAD-Net, whose
# interaction module couples the heads before the decoders; a strategy that returns its own
# shared direction and decoder weights (DB-MTL) on DenseMTL (encoder + mTEB). (mgda on
# DenseMTL, pcgrad with rep_grad and grad_magnitude on DenseMTL were checked the same way when
# this was written; left out of the suite for their compile time.)
@pytest.mark.parametrize("weighting,model,rep_grad", [
    ("mgda", "padnet", False), ("grad_magnitude", "padnet", False), ("db_mtl", "ours", False)])
def test_coupled_grads_equal_naive_reference(weighting, model, rep_grad):
    exp = build_experiment(_config(weighting, model, rep_grad))
    state = exp.init_state()
    batch = _batch()
    rng = jax.random.key(1)
    kw = dict(model=exp.model, tasks=exp.tasks, weighting=exp.weighting)
    _, losses, wout, new_stats, fast = jax.jit(
        functools.partial(steps.decomposed_grads, **kw))(state, batch, rng)
    ref, w_ref = jax.jit(functools.partial(_naive, **kw))(state, batch, rng)
    for t in exp.tasks:
        np.testing.assert_allclose(float(wout.weights[t]), float(w_ref[t]), rtol=2e-3, atol=1e-6)
    assert jax.tree.structure(fast) == jax.tree.structure(ref)
    scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(ref))
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4 * scale, rtol=2e-3)
    # Batch statistics of every part were updated (encoder, decoders, exchange/interaction).
    assert set(new_stats) == set(state.batch_stats)
