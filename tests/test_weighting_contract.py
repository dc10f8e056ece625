"""Every registered weighting strategy inside the real jitted step.

For each strategy (and the ``rep_grad`` variant of the gradient-based ones): it compiles and
runs in the train step on 1 and on 4 devices with equal results, returns finite weights that
are logged, its state survives a checkpoint round trip, and the fast decomposed gradient
(one encoder pass, one VJP per decoder) equals a naive reference built from one full
``jax.grad`` per task.
"""

import dataclasses
import functools
import os
import sys
from typing import ClassVar

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtl_jax import steps
from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment, open_data
from mtl_jax.weighting import WEIGHTINGS, Weighting, WeightingOutput
from mtl_jax.weighting.aligned_mtl import AlignedMTL
from mtl_jax.weighting.cagrad import CAGrad
from mtl_jax.weighting.conflict_free import ConFIG
from mtl_jax.weighting.db_mtl import DBMTL
from mtl_jax.weighting.dualproj import DualProj
from mtl_jax.weighting.dwa import DynamicWeightAverage
from mtl_jax.weighting.ew import EqualWeighting
from mtl_jax.weighting.excess_mtl import ExcessMTL
from mtl_jax.weighting.fairgrad import FairGrad
from mtl_jax.weighting.famo import FAMO
from mtl_jax.weighting.fixed import FixedWeighting
from mtl_jax.weighting.gls import GLS
from mtl_jax.weighting.graddrop import GradDrop
from mtl_jax.weighting.gradnorm import GradNorm
from mtl_jax.weighting.gradvac import GradVac
from mtl_jax.weighting.imtl import IMTL
from mtl_jax.weighting.imtl_full import IMTLFull
from mtl_jax.weighting.imtl_l import IMTLL
from mtl_jax.weighting.krum import Krum
from mtl_jax.weighting.mgda import MGDA
from mtl_jax.weighting.moco import MoCo
from mtl_jax.weighting.nash_mtl import NashMTL
from mtl_jax.weighting.pcgrad import PCGrad
from mtl_jax.weighting.rlw import RandomLossWeighting
from mtl_jax.weighting.stch import STCH
from mtl_jax.weighting.trimmed_mean import TrimmedMean
from mtl_jax.weighting.upgrad import UPGrad
from mtl_jax.weighting.uw import UncertaintyWeighting, UncertaintyWeightingXTasC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXTRA_ARGS = {"fixed": {"weights": {"semseg": 2.0, "depth": 1.0, "normals": 0.5}},
              "dwa": {"steps_per_epoch": 1}}


@dataclasses.dataclass(frozen=True)
class _Bundle(Weighting):
    """Test helper: every member runs in the same step (one compiled step for many
    strategies). The first member's output drives the update (weights, ``shared_grad``,
    ``decoder_weights``); every member's weights are logged as diagnostics
    ``<member>/weight/<task>`` and its state is kept under its name."""

    members: tuple = ()

    def init(self, tasks, grad_dim=0):
        return {m.name: m.init(tasks, grad_dim=grad_dim) if m.needs_grad_dim else m.init(tasks)
                for m in self.members}

    def __call__(self, losses, state, step, **inputs):
        outs = {m.name: m(losses, state[m.name], step, **inputs) for m in self.members}
        lead = outs[self.members[0].name]
        diagnostics = {f"{n}/weight/{t}": o.weights[t] for n, o in outs.items() for t in losses}
        diagnostics.update({f"{n}/{k}": v for n, o in outs.items()
                            for k, v in o.diagnostics.items()})
        return WeightingOutput(lead.weights, {n: o.state for n, o in outs.items()}, diagnostics,
                               shared_grad=lead.shared_grad,
                               decoder_weights=lead.decoder_weights)


@dataclasses.dataclass(frozen=True)
class _ParamBundle(_Bundle):
    """Gradient-based strategies on the shared parameters; the lead (DB-MTL) returns both a
    ``shared_grad`` and ``decoder_weights``."""

    name: ClassVar[str] = "_bundle_param"
    requires: ClassVar[str] = "task_grads"
    needs_grad_dim: ClassVar[bool] = True
    rep_grad: bool = False
    members: tuple = (DBMTL(), GradVac(), GradDrop(rep_grad=False), MoCo(), FairGrad(),
                      ExcessMTL(), IMTLFull(), DualProj(), ConFIG(), Krum(), TrimmedMean(),
                      PCGrad(), CAGrad(), MGDA(), NashMTL(), AlignedMTL(), UPGrad(), IMTL(),
                      GradNorm())


@dataclasses.dataclass(frozen=True)
class _RepBundle(_Bundle):
    """The same on the shared representation; the lead (GradDrop) returns a ``shared_grad``
    that the step pulls back through the encoder."""

    name: ClassVar[str] = "_bundle_rep"
    requires: ClassVar[str] = "task_grads"
    decoder_weighting: ClassVar[str] = "ones"
    rep_grad: bool = True
    members: tuple = (GradDrop(), GradVac(rep_grad=True), FairGrad(rep_grad=True),
                      IMTLFull(rep_grad=True), DualProj(rep_grad=True),
                      ConFIG(rep_grad=True), Krum(rep_grad=True), TrimmedMean(rep_grad=True),
                      PCGrad(rep_grad=True), CAGrad(rep_grad=True), MGDA(rep_grad=True),
                      NashMTL(rep_grad=True), AlignedMTL(rep_grad=True),
                      UPGrad(rep_grad=True), IMTL(rep_grad=True), GradNorm(rep_grad=True))


@dataclasses.dataclass(frozen=True)
class _LossBundle(_Bundle):
    """Loss-only strategies (the ordinary one-backward step), led by uncertainty weighting
    (learnt state). STCH's nadir epoch is the first call, so the second call uses the smooth
    Tchebycheff weights; DWA's epoch is one step, so its second call moves too."""

    name: ClassVar[str] = "_bundle_losses"
    members: tuple = (UncertaintyWeighting(), UncertaintyWeightingXTasC(), EqualWeighting(),
                      FixedWeighting(weights={"semseg": 2.0, "depth": 1.0, "normals": 0.5}),
                      DynamicWeightAverage(steps_per_epoch=1), RandomLossWeighting(), FAMO(),
                      STCH(steps_per_epoch=1, warmup_epoch=0), GLS(), IMTLL())


BUNDLES = {cls.name: cls for cls in (_ParamBundle, _RepBundle, _LossBundle)}
#: Strategies also run alone, as the step's only strategy, for the ways of combining gradients
#: that the bundles' leads (DB-MTL: a shared-parameter direction; GradDrop: a representation
#: direction; UW: loss weights) do not drive: decoder gradients, and per-task weights on
#: representation gradients. (Per-task weights on parameter gradients: MGDA in
#: ``test_fast_path_equals_naive_reference``.)
ALONE = [("grad_magnitude", False), ("pcgrad", True)]


def variants():
    return ALONE + [(name, False) for name in BUNDLES]


def test_every_strategy_is_in_a_contract_case():
    """A new strategy must join a bundle (one compiled step for many strategies), and each
    gradient strategy that supports ``rep_grad`` the representation bundle too."""
    members = {cls.name: {m.name for m in cls.members} for cls in BUNDLES.values()}
    covered = set().union(*members.values()) | {n for n, _ in ALONE}
    assert covered == set(WEIGHTINGS), sorted(set(WEIGHTINGS) ^ covered)
    rep = {n for n, cls in WEIGHTINGS.items()
           if cls.requires == "task_grads" and cls.supports_rep_grad}
    assert rep <= members["_bundle_rep"], sorted(rep - members["_bundle_rep"])
    assert {n for n, cls in WEIGHTINGS.items() if cls.requires == "task_grads"} <= \
        members["_bundle_param"]
    for cls in BUNDLES.values():
        assert {m.requires for m in cls.members} == {cls.requires}, cls.name


def _config(data_dir, name, rep_grad, n_devices):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    c = quickstart.get_config("smoke")
    c.dataset.data_dir = data_dir
    c.num_devices = n_devices
    c.optimizer.name = "sgd"  # linear in the gradient: device-count noise stays tiny
    # The smallest encoder with the ResNet feature contract: this file compiles the step
    # for every strategy on 1 and 4 devices, so compile time is what matters.
    c.model.encoder = "simple"
    c.model.encoder_kwargs = {"widths": (4, 8, 8, 8, 8)}
    c.model.decoder_kwargs = {"features": 4, "convs_per_block": 1}
    w = {"name": name, **EXTRA_ARGS.get(name, {})}
    if rep_grad:
        w["rep_grad"] = True
    c.weighting = w
    return c


@pytest.fixture(scope="module")
def batch(data_dir):
    c = _config(data_dir, "ew", False, 1)
    exp = build_experiment(c)
    (src,) = open_data(c, splits=("train",))
    it = pipeline.train_iterator(src, global_batch_size=c.batch_size, mesh=exp.mesh, seed=0,
                                 augment=None)
    b = jax.device_get(next(it))
    it.close()
    return b


def _weights(metrics, tasks):
    """The step's weights and, for a bundle, every member's."""
    keys = [f"weight/{t}" for t in tasks]
    keys += sorted(k for k in metrics if k.startswith("weighting/") and "/weight/" in k)
    return np.array([float(metrics[k]) for k in keys])


@pytest.mark.parametrize("name,rep_grad", variants())
def test_strategy_contract(name, rep_grad, data_dir, batch, tmp_path, monkeypatch):
    if name in BUNDLES:
        monkeypatch.setitem(WEIGHTINGS, name, BUNDLES[name])
    exps = [build_experiment(_config(data_dir, name, rep_grad, n)) for n in (1, 4)]
    tasks = tuple(exps[0].tasks)
    results = []
    for exp in exps:
        b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
        state = exp.init_state()
        state, m1 = exp.train_step(state, b)
        state, m2 = exp.train_step(state, b)  # second step: strategies with history move
        results.append((state, m1, m2))
    (s1, a1, a2), (s4, b1, b2) = results
    if name in BUNDLES:
        assert len(_weights(a2, tasks)) == len(tasks) * (1 + len(BUNDLES[name].members))
    for m in (a1, a2):
        w = _weights(m, tasks)
        assert np.all(np.isfinite(w)), (name, w)
        assert not bool(m["nonfinite"]) and np.isfinite(float(m["loss/total"]))
    np.testing.assert_allclose(_weights(a2, tasks), _weights(b2, tasks), rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(float(a2["loss/total"]), float(b2["loss/total"]), rtol=1e-3)
    np.testing.assert_allclose(float(a2["grad_norm"]), float(b2["grad_norm"]), rtol=2e-3)

    # Checkpoint round trip of the whole state, weighting state included.
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, s1)
        ckptr.wait_until_finished()
        restored = ckptr.restore(path, exps[0].abstract_state)
    for x, y in zip(jax.tree.leaves(s1.weighting_state), jax.tree.leaves(restored.weighting_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    b1_ = pipeline.to_global(batch, pipeline.batch_sharding(exps[0].mesh))
    # Donation consumes the input state: compare against a fresh copy of the original.
    _, m_orig = exps[0].train_step(jax.tree.map(jnp.copy, s1), b1_)
    _, m_rest = exps[0].train_step(restored, b1_)
    np.testing.assert_array_equal(_weights(m_orig, tasks), _weights(m_rest, tasks))


def _naive_grads(state, batch, rng, *, model, tasks, weighting):
    """Reference: one full jax.grad per task, then the combination the strategy asks for."""
    def task_loss(params, t):
        losses, _, _, _ = steps.forward_losses(params, state.batch_stats, batch, rng,
                                               model=model, tasks=tasks)
        return losses[t]

    per_task = {t: jax.grad(task_loss)(state.params, t) for t in tasks}
    losses = steps.forward_losses(state.params, state.batch_stats, batch, rng, model=model,
                                  tasks=tasks)[0]
    inputs = {}
    if weighting.requires == "decoder_grads":
        inputs["decoder_grads"] = {t: per_task[t]["decoders"][t] for t in tasks}
    elif weighting.requires == "task_grads":
        if getattr(weighting, "rep_grad", False):
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            feats = model.apply(variables, batch["image"], train=True, method=type(model).encode,
                                mutable=["batch_stats"], rngs={"dropout": rng})[0]

            def from_feats(f, t):
                (pred, _), _ = model.apply(variables, f, batch["image"].shape[1:3], t,
                                           train=True, method=type(model).decode_task,
                                           mutable=["batch_stats"], rngs={"dropout": rng})
                return tasks[t].loss(pred, batch)

            rows = [jax.flatten_util.ravel_pytree(jax.grad(from_feats)(feats, t))[0]
                    for t in tasks]
        else:
            rows = [jax.flatten_util.ravel_pytree(per_task[t]["encoder"])[0] for t in tasks]
        inputs["grads"] = jnp.stack(rows)
    out = weighting(losses, state.weighting_state, state.step, rng=rng, **inputs)
    w = out.weights
    dec_w = w if weighting.decoder_weighting == "weights" else {t: 1.0 for t in tasks}
    if out.decoder_weights is not None:
        dec_w = out.decoder_weights
    enc = jax.tree.map(lambda *xs: sum(w[t] * x for t, x in zip(tasks, xs)),
                       *[per_task[t]["encoder"] for t in tasks])
    if out.shared_grad is not None:  # parameter gradients only: the encoder's ravel order
        enc = jax.flatten_util.ravel_pytree(per_task[next(iter(tasks))]["encoder"])[1](
            out.shared_grad)
    dec = {t: jax.tree.map(lambda g, t=t: dec_w[t] * g, per_task[t]["decoders"][t])
           for t in tasks}
    return {"encoder": enc, "decoders": dec}, w


# One strategy per gradient source: decoder gradients, per-task gradients of the shared
# parameters (vmapped encoder VJP) and of the shared representation.
FAST_PATH_CASES = [("grad_magnitude", False), ("pcgrad", True), ("mgda", False),
                   ("db_mtl", False)]


@pytest.mark.parametrize("name,rep_grad", [c for c in FAST_PATH_CASES if c[0] in WEIGHTINGS])
def test_fast_path_equals_naive_reference(name, rep_grad, data_dir, batch):
    exp = build_experiment(_config(data_dir, name, rep_grad, 1))
    state = exp.init_state()
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    rng = jax.random.key(3)
    kw = dict(model=exp.model, tasks=exp.tasks, weighting=exp.weighting)
    _, _, wout, _, fast = jax.jit(functools.partial(steps.decomposed_grads, **kw))(state, b, rng)
    ref, w_ref = jax.jit(functools.partial(_naive_grads, **kw))(state, b, rng)
    for t in exp.tasks:
        np.testing.assert_allclose(float(wout.weights[t]), float(w_ref[t]), rtol=2e-3,
                                   atol=1e-6)
    # Absolute tolerance from the gradient's overall scale: leaves that are zero in exact
    # arithmetic (biases in front of BatchNorm) carry only float noise of order 1e-9.
    scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(ref))
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4 * scale, rtol=2e-3)


def test_decomposed_equals_standard_for_loss_weighting(data_dir, batch):
    exp = build_experiment(_config(data_dir, "ew", False, 1))
    state = exp.init_state()
    b = pipeline.to_global(batch, pipeline.batch_sharding(exp.mesh))
    rng = jax.random.key(0)
    kw = dict(model=exp.model, tasks=exp.tasks, weighting=exp.weighting)
    t1, _, _, st1, g1 = jax.jit(functools.partial(steps._loss_weighted_grads, **kw))(state, b,
                                                                                     rng)
    t2, _, _, st2, g2 = jax.jit(functools.partial(steps.decomposed_grads, **kw))(state, b, rng)
    assert float(t1) == pytest.approx(float(t2), rel=1e-6)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for x, y in zip(jax.tree.leaves((g1, st1)), jax.tree.leaves((g2, st2))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_registry_names_and_config_errors():
    from mtl_jax.errors import UserError
    from mtl_jax.weighting import make_weighting

    for name, cls in WEIGHTINGS.items():
        assert cls.name == name
        assert cls.requires in ("losses", "decoder_grads", "task_grads")
        assert cls.decoder_weighting in ("weights", "ones")
        if cls.requires == "task_grads":
            assert "rep_grad" in {f.name for f in dataclasses.fields(cls)}
        if not cls.supports_rep_grad:
            with pytest.raises(UserError, match="rep_grad"):
                make_weighting({"name": name, "rep_grad": True})
    with pytest.raises(UserError, match="available"):
        make_weighting({"name": "nope"})
    with pytest.raises(UserError, match="bad options"):
        make_weighting({"name": "ew", "temperature": 2.0})


def test_ew_and_fixed_weights():
    from mtl_jax.errors import UserError
    from mtl_jax.weighting import make_weighting

    losses = {"semseg": jnp.float32(2.0), "depth": jnp.float32(0.5)}
    out = make_weighting("ew")(losses, {}, jnp.int32(0))
    assert {t: float(w) for t, w in out.weights.items()} == {"semseg": 1.0, "depth": 1.0}
    fixed = make_weighting({"name": "fixed", "weights": {"semseg": 50.0, "depth": 1.0}})
    fixed.init(("semseg", "depth"))
    out = jax.jit(lambda ls: fixed(ls, {}, jnp.int32(0)).weights)(losses)
    assert {t: float(w) for t, w in out.items()} == {"semseg": 50.0, "depth": 1.0}
    with pytest.raises(UserError, match="missing"):
        fixed.init(("semseg", "depth", "normals"))
