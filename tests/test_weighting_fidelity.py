"""Gradient-based strategies against their reference definitions: IMTL-G's solve on
ill-conditioned gradients, Nash-MTL's Gram normalisation, UPGrad's ridge (TorchJD), Aligned-MTL's
scale modes, PCGrad's fixed task order."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.weighting.aligned_mtl import AlignedMTL
from mtl_jax.weighting.imtl import IMTL
from mtl_jax.weighting.nash_mtl import NashMTL
from mtl_jax.weighting.pcgrad import PCGrad
from mtl_jax.weighting.upgrad import UPGrad


def _call(strategy, grads, rng=None, step=0):
    grads = jnp.asarray(grads, jnp.float32)
    losses = {f"t{i}": jnp.float32(1.0) for i in range(grads.shape[0])}
    out = strategy(losses, strategy.init(list(losses)), jnp.int32(step), rng=rng, grads=grads)
    return np.array([float(v) for v in out.weights.values()])


# ---------------------------------------------------------------- IMTL-G
def _imtl_float64(g):
    g = np.asarray(g, np.float64)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = np.linalg.solve((d @ uu.T).T, uu @ g[0])
    alpha = np.concatenate([[1.0 - rest.sum()], rest])
    return alpha @ g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtl_on_nearly_parallel_gradients_matches_float64(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(50)
    grads = np.stack([base + 1e-3 * rng.standard_normal(50),
                      2 * base + 1e-3 * rng.standard_normal(50),
                      rng.standard_normal(50)]).astype(np.float32)
    exact = _imtl_float64(grads)
    got = _call(IMTL(), grads) @ grads.astype(np.float64)
    # The normal-equations solver was off by 2-13x the norm here; a direct solve: < 1 %.
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-2


def test_imtl_exactly_parallel_gradients_stay_finite():
    g = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 1.0]], np.float32)
    w = _call(IMTL(), g)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- Nash-MTL
def test_nash_default_is_the_authors_normalised_and_undone_problem():
    g = np.array([[1.0, 0.2, 0.0], [-0.3, 2.0, 0.5], [0.1, 0.1, 3.0]], np.float32)
    gram = g.astype(np.float64) @ g.T.astype(np.float64)
    n = np.linalg.norm(gram)
    alpha = _call(NashMTL(), g)
    # Authors: solve with G / n and the constraint alpha_t * n * (G / n alpha)_t = 1.
    np.testing.assert_allclose(alpha * n * ((gram / n) @ alpha), 1.0, rtol=2e-3)
    # Invariance: scaling the gradients by s scales alpha by 1 / s.
    np.testing.assert_allclose(_call(NashMTL(), 10.0 * g), alpha / 10.0, rtol=2e-3)
    # normalize_gram=True is the other problem, alpha_t (G / n alpha)_t = 1: sqrt(n) larger.
    np.testing.assert_allclose(_call(NashMTL(normalize_gram=True), g), alpha * math.sqrt(n),
                               rtol=2e-3)


# ---------------------------------------------------------------- UPGrad
def test_upgrad_ridge_is_relative_to_the_full_trace():
    # K = [[1, -.5], [-.5, 1]], trace 2. TorchJD: M = K / 2 + reg_eps I. For task 1,
    # v = (1, -M12 / M22) = (1, .25 / .6); by symmetry w = (1 + 5/12) / 2 each.
    # (The old ridge, relative to trace / T, gave (1 + .5 / 1.1) / 2 = .7273.)
    s = math.sqrt(0.75)
    g = np.array([[1.0, 0.0], [-0.5, s]], np.float32)
    w = _call(UPGrad(reg_eps=0.1), g)
    np.testing.assert_allclose(w, [(1 + 5 / 12) / 2] * 2, rtol=1e-5)


# ---------------------------------------------------------------- Aligned-MTL
@pytest.mark.parametrize("mode, common", [("min", 1.0), ("median", 4.0), ("rmse", 7.5)])
def test_aligned_mtl_scale_modes(mode, common):
    # Orthogonal gradients with norms 1..4: eigenvalues 1, 4, 9, 16 and weights
    # sqrt(common) / norm_t. torch.median of an even count takes the lower middle one (4).
    g = np.diag([1.0, 2.0, 3.0, 4.0]).astype(np.float32)
    w = _call(AlignedMTL(scale_mode=mode), g)
    np.testing.assert_allclose(w, math.sqrt(common) / np.array([1.0, 2.0, 3.0, 4.0]), rtol=1e-5)
    # Odd count: the middle one.
    w3 = _call(AlignedMTL(scale_mode="median"), g[:3, :3])
    np.testing.assert_allclose(w3, 2.0 / np.array([1.0, 2.0, 3.0]), rtol=1e-5)
    with pytest.raises(UserError, match="scale_mode"):
        AlignedMTL(scale_mode="max")


# ---------------------------------------------------------------- PCGrad
def _pcgrad_numpy(g, order):
    g = np.asarray(g, np.float64)
    total = np.zeros(g.shape[1])
    for i in range(len(g)):
        gi = g[i].copy()
        for j in order:
            if j != i and gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        total += gi
    return total


def test_pcgrad_fixed_task_order_is_reproducible():
    g = np.array([[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.5, -1.2, 1.0]], np.float32)
    order = ("t2", "t0", "t1")
    fixed = PCGrad(task_order=order)
    w1 = _call(fixed, g, rng=jax.random.key(1))
    w2 = _call(fixed, g, rng=jax.random.key(7), step=3)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_allclose(w1 @ g.astype(np.float64), _pcgrad_numpy(g, [2, 0, 1]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_call(PCGrad(task_order="config"), g) @ g.astype(np.float64),
                               _pcgrad_numpy(g, [0, 1, 2]), rtol=1e-5, atol=1e-6)
    assert PCGrad(task_order="t2, t0,t1").task_order == order
    with pytest.raises(UserError, match="every task"):
        _call(PCGrad(task_order=("t0", "t1")), g)
