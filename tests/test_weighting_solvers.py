"""Unit tests of the solver-based strategies (Nash-MTL, Aligned-MTL, UPGrad) on hand-made
gradient matrices, with hand-computed expectations where the answer has a closed form."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.weighting.aligned_mtl import AlignedMTL
from mtl_jax.weighting.nash_mtl import NashMTL
from mtl_jax.weighting.upgrad import UPGrad

RNG = jax.random.key(0)


def _losses(num_tasks):
    return {f"t{i}": jnp.float32(1.0 + i) for i in range(num_tasks)}


@functools.partial(jax.jit, static_argnums=0)
def _call(strategy, losses, state, step, grads):
    return strategy(losses, state, step, rng=RNG, grads=grads)


def _run(strategy, grads, state=None, step=0):
    """Jitted, as in the train step (``*_jit_equals_eager`` tests check eager mode)."""
    grads = jnp.asarray(grads, jnp.float32)
    losses = _losses(grads.shape[0])
    if state is None:
        state = strategy.init(list(losses))
    out = _call(strategy, losses, state, jnp.int32(step), grads)
    weights = np.array([float(out.weights[t]) for t in losses])
    return weights, out


def _random_grads(num_tasks, dim=20, seed=0, scales=None):
    g = np.random.default_rng(seed).normal(size=(num_tasks, dim))
    if scales is not None:
        g = g * np.asarray(scales)[:, None]
    return g.astype(np.float32)


ORTHOGONAL_1_2 = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]


# --------------------------------------------------------------------------- Nash-MTL

def test_nash_orthogonal_is_inverse_norm():
    # G = diag(1, 4); alpha = (1, 1/2): G alpha = (1, 2) = 1 / alpha.
    w, out = _run(NashMTL(), ORTHOGONAL_1_2)
    np.testing.assert_allclose(w, [1.0, 0.5], rtol=1e-3)  # the ridge moves it by ~5e-5
    assert float(out.diagnostics["residual"]) < 1e-3
    np.testing.assert_allclose(float(out.diagnostics["combined_norm"]), np.sqrt(2.0), rtol=1e-3)


def test_nash_random_solves_bargaining_equation():
    grads = _random_grads(3, seed=1, scales=[1.0, 3.0, 0.2])
    w, out = _run(NashMTL(reg_eps=1e-7), grads)
    gram = grads.astype(np.float64) @ grads.T.astype(np.float64)
    assert np.all(w > 0)
    np.testing.assert_allclose(gram @ w, 1.0 / w, rtol=1e-4)
    assert float(out.diagnostics["residual"]) < 1e-4
    # ||sum_t alpha_t g_t||^2 = alpha^T G alpha = sum_t alpha_t / alpha_t = T.
    np.testing.assert_allclose(w @ gram @ w, 3.0, rtol=1e-4)


def test_nash_scale_equivariant():
    grads = _random_grads(3, seed=2)
    w1, _ = _run(NashMTL(), grads)
    w2, _ = _run(NashMTL(), grads * 1e-3)
    np.testing.assert_allclose(w2, w1 * 1e3, rtol=1e-4)


def test_nash_warm_start_state_round_trip():
    grads = _random_grads(3, seed=3)
    strategy = NashMTL()
    state0 = strategy.init(["t0", "t1", "t2"])
    np.testing.assert_array_equal(np.asarray(state0["alpha"]), np.zeros(3))
    w, out = _run(strategy, grads, state0)
    np.testing.assert_allclose(np.asarray(out.state["alpha"]), w)
    # Warm-started from its own solution, one Newton step keeps it (already converged).
    w_again, out2 = _run(NashMTL(iterations=1), grads, out.state)
    np.testing.assert_allclose(w_again, w, rtol=1e-5)
    np.testing.assert_allclose(float(out2.diagnostics["residual"]),
                               float(out.diagnostics["residual"]), rtol=1e-2, atol=1e-6)
    # Through a numpy round trip (what a checkpoint does).
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), out.state)
    w_restored, _ = _run(NashMTL(iterations=1), grads, restored)
    np.testing.assert_allclose(w_restored, w, rtol=1e-5)


def test_nash_update_every_reuses_previous_weights():
    strategy = NashMTL(update_every=3)
    _, out = _run(strategy, ORTHOGONAL_1_2, step=0)
    other = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    w_skip, _ = _run(strategy, other, out.state, step=1)
    np.testing.assert_allclose(w_skip, [1.0, 0.5], rtol=1e-3)
    w_new, _ = _run(strategy, other, out.state, step=3)
    np.testing.assert_allclose(w_new, [0.5, 1.0], rtol=1e-3)


def test_nash_max_norm_and_normalize_gram():
    # Unclipped ||d|| = sqrt(2); clipped to 0.5 -> weights scaled by 0.5 / sqrt(2).
    w, out = _run(NashMTL(max_norm=0.5), ORTHOGONAL_1_2)
    np.testing.assert_allclose(w, np.array([1.0, 0.5]) * 0.5 / np.sqrt(2.0), rtol=1e-3)
    np.testing.assert_allclose(float(out.diagnostics["combined_norm"]), 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.state["alpha"]), [1.0, 0.5], rtol=1e-3)
    # The released code's variant: G / ||G||_F = diag(1, 4) / sqrt(17).
    w, _ = _run(NashMTL(normalize_gram=True), ORTHOGONAL_1_2)
    np.testing.assert_allclose(w, np.array([1.0, 0.5]) * 17**0.25, rtol=1e-3)


def test_nash_degenerate_inputs_are_finite():
    w, out = _run(NashMTL(), np.zeros((3, 5)))
    np.testing.assert_array_equal(w, np.ones(3))  # no solution: previous (initial) weights
    assert np.isfinite(float(out.diagnostics["residual"]))
    for grads in ([[1.0, 0.0], [-1.0, 0.0]],            # exactly opposed
                  [[1.0, 0.0], [0.0, 0.0]],             # one zero gradient
                  [[1.0, 2.0], [1.0, 2.0]]):            # identical
        w, out = _run(NashMTL(), grads)
        assert np.all(np.isfinite(w)) and np.all(w > 0), grads
        assert all(np.isfinite(float(v)) for v in out.diagnostics.values())
    # Identical gradients: alpha_1 = alpha_2 = a with 2a * ||g||^2 = 1/a -> a = 1/sqrt(10).
    np.testing.assert_allclose(w, [10**-0.5] * 2, rtol=1e-3)


def test_nash_jit_equals_eager():
    grads = jnp.asarray(_random_grads(4, seed=4))
    strategy = NashMTL(update_every=2, max_norm=1.0)
    state = strategy.init(list(_losses(4)))

    def call(state, step, grads):
        out = strategy(_losses(4), state, step, rng=RNG, grads=grads)
        return out.weights, out.state, out.diagnostics

    eager = call(state, jnp.int32(0), grads)
    jitted = jax.jit(call)(state, jnp.int32(0), grads)
    for a, b in zip(jax.tree.leaves(eager[:2]), jax.tree.leaves(jitted[:2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    for k in eager[2]:  # the residual is at round-off level: absolute comparison
        np.testing.assert_allclose(float(eager[2][k]), float(jitted[2][k]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Aligned-MTL

def test_aligned_orthogonal_rescales_to_smallest_singular_value():
    # G = diag(1, 4): V = I, sigma = (1, 2), sigma_R = 1, B = diag(1, 1/2), w = B 1. The
    # update g1 + g2 / 2 = (1, 1, 0) has a component of norm sigma_R = 1 along each task.
    w, out = _run(AlignedMTL(), ORTHOGONAL_1_2)
    np.testing.assert_allclose(w, [1.0, 0.5], rtol=1e-5)
    np.testing.assert_allclose(float(out.diagnostics["condition_number"]), 2.0, rtol=1e-5)
    assert float(out.diagnostics["rank"]) == 2


def test_aligned_orthonormal_is_the_sum():
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(6, 3)))
    w, out = _run(AlignedMTL(), q.T)
    np.testing.assert_allclose(w, [1.0, 1.0, 1.0], rtol=1e-4)
    np.testing.assert_allclose(float(out.diagnostics["condition_number"]), 1.0, rtol=1e-4)
    w, _ = _run(AlignedMTL(task_weights={"t0": 2.0, "t1": 1.0, "t2": 0.5}), q.T)
    np.testing.assert_allclose(w, [2.0, 1.0, 0.5], rtol=1e-4)


def test_aligned_system_is_orthogonal_with_equal_singular_values():
    grads = _random_grads(3, seed=6, scales=[1.0, 5.0, 0.3])
    gram = grads.astype(np.float64) @ grads.T.astype(np.float64)
    sigma_min = np.sqrt(np.linalg.eigvalsh(gram).min())
    # Unit task weights read off the columns of B; the aligned gradients G B must be
    # orthogonal with every norm equal to sigma_min: B^T M B = sigma_min^2 I.
    cols = []
    for i in range(3):
        tw = {f"t{j}": float(i == j) for j in range(3)}
        cols.append(_run(AlignedMTL(task_weights=tw), grads)[0])
    b = np.stack(cols, axis=1)
    np.testing.assert_allclose(b.T @ gram @ b, sigma_min**2 * np.eye(3), atol=2e-3 * sigma_min**2)
    w, _ = _run(AlignedMTL(), grads)
    np.testing.assert_allclose(w, b.sum(1), rtol=1e-5)


def test_aligned_rank_deficient_and_zero():
    # g1 = g2 = (1, 0): M = [[1, 1], [1, 1]], one eigenvalue 2 (v = (1, 1)/sqrt(2)), one 0.
    # B = sqrt(2) v v^T / sqrt(2) = [[.5, .5], [.5, .5]], w = B 1 = (1, 1).
    w, out = _run(AlignedMTL(), [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-5)
    assert float(out.diagnostics["rank"]) == 1
    np.testing.assert_allclose(float(out.diagnostics["condition_number"]), 1.0, rtol=1e-5)
    w, out = _run(AlignedMTL(), np.zeros((3, 4)))
    np.testing.assert_array_equal(w, np.ones(3))
    assert all(np.isfinite(float(v)) for v in out.diagnostics.values())


def test_aligned_jit_equals_eager_and_validation():
    grads = jnp.asarray(_random_grads(3, seed=7))
    strategy = AlignedMTL()
    call = lambda g: strategy(_losses(3), {}, jnp.int32(0), rng=RNG, grads=g).weights
    for t, v in call(grads).items():
        np.testing.assert_allclose(float(v), float(jax.jit(call)(grads)[t]), rtol=1e-5)
    with pytest.raises(UserError):
        AlignedMTL(task_weights={"t0": 1.0}).init(["t0", "t1"])
    hash(AlignedMTL(task_weights={"t0": 1.0}))


# --------------------------------------------------------------------------- UPGrad

def _exact_box_qp(m, lower):
    """argmin_{v >= lower} v^T m v by enumerating the free sets (tiny T only)."""
    num_tasks = len(lower)
    best = None
    for size in range(num_tasks + 1):
        for free in itertools.combinations(range(num_tasks), size):
            free = list(free)
            fixed = [j for j in range(num_tasks) if j not in free]
            v = lower.copy()
            if free:
                v[free] = np.linalg.solve(m[np.ix_(free, free)], -m[np.ix_(free, fixed)]
                                          @ lower[fixed])
            if np.all(v >= lower - 1e-12) and (best is None or v @ m @ v < best[0]):
                best = (v @ m @ v, v)
    return best[1]


def test_upgrad_non_conflicting_is_the_mean():
    grads = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 2.0]]  # all dot products >= 0
    w, out = _run(UPGrad(), grads)
    np.testing.assert_allclose(w, [1 / 3] * 3, rtol=1e-6)
    assert float(out.diagnostics["conflict_fraction"]) == 0.0
    w, _ = _run(UPGrad(reduction="sum"), grads)
    np.testing.assert_allclose(w, [1.0] * 3, rtol=1e-6)


def test_upgrad_conflicting_pair_closed_form():
    # g1 = (1, 0), g2 = (-1, 1), M = [[1, -1], [-1, 2]].
    # pi(g1): v = (1, l), min 1 - 2 l + 2 l^2 -> l = 1/2, pi(g1) = (1/2, 1/2).
    # pi(g2): v = (l, 1), min l^2 - 2 l + 2   -> l = 1,   pi(g2) = (0, 1).
    # w = ((1, 1/2) + (1, 1)) / 2 = (1, 3/4); d = (1/4, 3/4); g1.d = 1/4, g2.d = 1/2.
    grads = np.array([[1.0, 0.0], [-1.0, 1.0]])
    w, out = _run(UPGrad(reg_eps=0.0), grads)
    np.testing.assert_allclose(w, [1.0, 0.75], rtol=1e-6)
    d = w @ grads
    assert np.all(grads @ d >= 0)
    np.testing.assert_allclose(grads @ d, [0.25, 0.5], rtol=1e-6)
    assert float(out.diagnostics["conflict_fraction"]) == 1.0
    w_reg, _ = _run(UPGrad(), grads)  # default ridge 1e-4: within ~1e-4 of the exact answer
    np.testing.assert_allclose(w_reg, [1.0, 0.75], atol=5e-4)


@pytest.mark.parametrize("seed", range(4))
def test_upgrad_matches_brute_force_and_is_non_conflicting(seed):
    rng = np.random.default_rng(10 + seed)
    # Few dimensions, so that several pairs conflict.
    grads = (rng.normal(size=(4, 3)) @ rng.normal(size=(3, 8))).astype(np.float32)
    gram = grads.astype(np.float64) @ grads.T.astype(np.float64)
    expected = np.mean([_exact_box_qp(gram, np.eye(4)[i]) for i in range(4)], axis=0)
    w, out = _run(UPGrad(reg_eps=0.0), grads)
    np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-4)
    assert float(out.diagnostics["kkt_residual"]) < 1e-4
    scale = np.trace(gram) / 4
    assert np.all(gram @ w >= -1e-5 * scale)  # g_t . d >= 0 for every task
    w_reg, _ = _run(UPGrad(), grads)
    assert np.all(gram @ w_reg >= -1e-3 * scale)


def test_upgrad_degenerate_inputs_and_jit():
    w, out = _run(UPGrad(), np.zeros((3, 4)))
    np.testing.assert_allclose(w, [1 / 3] * 3, rtol=1e-6)
    w, out = _run(UPGrad(), [[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # identical + opposed
    assert np.all(np.isfinite(w)) and np.isfinite(float(out.diagnostics["kkt_residual"]))
    grads = jnp.asarray(_random_grads(3, dim=2, seed=8))
    strategy = UPGrad()
    call = lambda g: strategy(_losses(3), {}, jnp.int32(0), rng=RNG, grads=g).weights
    for t, v in call(grads).items():
        np.testing.assert_allclose(float(v), float(jax.jit(call)(grads)[t]), rtol=1e-5)
    with pytest.raises(UserError):
        UPGrad(reduction="max")


def test_strategy_class_contract():
    for cls, name, decoder in ((NashMTL, "nash_mtl", "weights"),
                               (AlignedMTL, "aligned_mtl", "ones"),
                               (UPGrad, "upgrad", "ones")):
        assert cls.name == name and cls.requires == "task_grads"
        assert cls.decoder_weighting == decoder
        strategy = cls(rep_grad=True)
        assert strategy.rep_grad and hash(strategy) == hash(cls(rep_grad=True))
