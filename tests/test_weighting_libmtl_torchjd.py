"""The strategies ported from LibMTL and TorchJD, on hand-made gradients and losses:
GradVac, GradDrop, MoCo, DB-MTL, FairGrad, GLS, STCH, ExcessMTL, IMTL-L, IMTL, DualProj,
ConFIG, Krum, TrimmedMean. Expected values are worked out by hand in the comments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.weighting import WEIGHTINGS, make_weighting
from mtl_jax.weighting.conflict_free import ConFIG
from mtl_jax.weighting.db_mtl import DBMTL
from mtl_jax.weighting.dualproj import DualProj
from mtl_jax.weighting.excess_mtl import ExcessMTL
from mtl_jax.weighting.fairgrad import FairGrad, solve_fairgrad
from mtl_jax.weighting.gls import GLS
from mtl_jax.weighting.graddrop import GradDrop
from mtl_jax.weighting.gradvac import GradVac
from mtl_jax.weighting.imtl_full import IMTLFull
from mtl_jax.weighting.imtl_l import IMTLL
from mtl_jax.weighting.krum import Krum
from mtl_jax.weighting.moco import MoCo
from mtl_jax.weighting.stch import STCH
from mtl_jax.weighting.trimmed_mean import TrimmedMean

RNG = jax.random.key(0)
NEW = ["gradvac", "graddrop", "moco", "db_mtl", "fairgrad", "gls", "stch", "excess_mtl",
       "imtl_l", "imtl_full", "dualproj", "conflict_free", "krum", "trimmed_mean"]


def _losses(values):
    return {f"t{i}": jnp.asarray(v, jnp.float32) for i, v in enumerate(values)}


def _init(strategy, num_tasks, grad_dim):
    tasks = [f"t{i}" for i in range(num_tasks)]
    if strategy.needs_grad_dim:
        return strategy.init(tasks, grad_dim=grad_dim)
    return strategy.init(tasks)


@functools.cache
def _runner(strategy):
    """One jitted call per strategy (strategies are hashable), reused across calls."""
    return jax.jit(lambda losses, state, step, rng, grads: strategy(losses, state, step, rng=rng,
                                                                    grads=grads))


def _call(strategy, grads, losses=None, state=None, step=0, rng=RNG):
    grads = jnp.asarray(grads, jnp.float32)
    losses = _losses(losses if losses is not None else [1.0] * grads.shape[0])
    if state is None:
        state = _init(strategy, grads.shape[0], grads.shape[1])
    return _runner(strategy)(losses, state, jnp.asarray(step, jnp.int32), rng, grads)


def _weights(out):
    return np.array([float(v) for v in out.weights.values()])


def _make(name):
    return make_weighting({"name": name, **({"steps_per_epoch": 1} if name == "stch" else {})})


# ---------------------------------------------------------------- every new strategy

def test_registered_with_config_names():
    for name in NEW:
        assert WEIGHTINGS[name].name == name


@pytest.mark.parametrize("name", NEW)
def test_zero_gradients_give_finite_weights(name):
    """All-zero gradients (and then random ones, the second call seeing the first's state)
    give finite weights, diagnostics and direction, inside jit (one compilation)."""
    strategy = _make(name)
    losses = [0.9, 2.0, 0.3]
    out = _call(strategy, np.zeros((3, 6)), losses)
    assert np.all(np.isfinite(_weights(out)))
    if out.shared_grad is not None:
        np.testing.assert_array_equal(np.asarray(out.shared_grad), 0.0)
    grads = np.random.default_rng(0).normal(size=(3, 6))
    out = _call(strategy, grads, losses, state=out.state)
    assert np.all(np.isfinite(_weights(out)))
    assert all(np.isfinite(float(v)) for v in out.diagnostics.values())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out.state))


# ---------------------------------------------------------------- GradVac

def test_gradvac_with_zero_targets_is_pcgrad():
    # g1 = (1, 0), g2 = (-1, 1): g1' = g1 + g2 / 2, g2' = g2 + g1; the sum is
    # 2 g1 + 1.5 g2. Targets move to beta * cos = 0.5 * (-1 / sqrt(2)).
    out = _call(GradVac(), [[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(_weights(out), [2.0, 1.5], rtol=1e-5)
    expected = -0.5 / np.sqrt(2.0)
    np.testing.assert_allclose(np.asarray(out.state["rho"]),
                               [[0.0, expected], [expected, 0.0]], rtol=1e-5)


def test_gradvac_raises_the_cosine_to_its_target():
    # Orthogonal g1 = (1, 0), g2 = (0, 1), targets 0.5: g1' = g1 + g2 * 0.5 / sqrt(0.75)
    # (= (1, 1/sqrt(3)), whose cosine with g2 is exactly 0.5), and symmetrically.
    state = {"rho": jnp.asarray([[0.0, 0.5], [0.5, 0.0]], jnp.float32)}
    out = _call(GradVac(), np.eye(2), state=state)
    shift = 0.5 / np.sqrt(0.75)
    np.testing.assert_allclose(_weights(out), [1 + shift, 1 + shift], rtol=1e-5)
    g1_new = np.array([1.0, shift])
    assert g1_new[1] / np.linalg.norm(g1_new) == pytest.approx(0.5, rel=1e-6)
    # Both pairs were adjusted: the targets become 0.5 * 0.5 + 0.5 * 0 either way.
    np.testing.assert_allclose(np.asarray(out.state["rho"])[0, 1], 0.25, rtol=1e-6)


def test_gradvac_target_update_rules():
    # g1 = (1, 0), g2 = (1, 1): cosine 1/sqrt(2) > target 0.5, nothing is adjusted.
    state = {"rho": jnp.asarray([[0.0, 0.5], [0.5, 0.0]], jnp.float32)}
    grads = [[1.0, 0.0], [1.0, 1.0]]
    always = _call(GradVac(), grads, state=state)
    on_adjust = _call(GradVac(ema_update="on_adjust"), grads, state=state)
    np.testing.assert_allclose(_weights(always), [1.0, 1.0])
    moved = 0.5 * 0.5 + 0.5 / np.sqrt(2.0)
    np.testing.assert_allclose(np.asarray(always.state["rho"])[0, 1], moved, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(on_adjust.state["rho"])[0, 1], 0.5)
    with pytest.raises(UserError, match="ema_update"):
        GradVac(ema_update="sometimes")


# ---------------------------------------------------------------- GradDrop

def test_graddrop_keeps_agreeing_signs_and_leaks():
    grads = [[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]]
    out = _call(GradDrop(), grads)  # purity 1 (all positive) or 0 (all negative)
    np.testing.assert_allclose(np.asarray(out.shared_grad), [4.0, -3.0, 0.0])
    np.testing.assert_allclose(_weights(out), [1.0, 1.0])
    conflicting = np.tile([[1.0], [-3.0]], (1, 4000))
    out = _call(GradDrop(leak=1.0), conflicting)
    np.testing.assert_allclose(np.asarray(out.shared_grad), -2.0)


def test_graddrop_picks_the_positive_sign_with_probability_purity():
    # Entries +1 and -3 per coordinate: P = (1 + (-2) / 4) / 2 = 0.25; with U ~ U(0, 1) the
    # positive entry survives where P > U (about a quarter of the coordinates), else the
    # negative one.
    conflicting = np.tile([[1.0], [-3.0]], (1, 4000))
    out = _call(GradDrop(), conflicting)
    shared = np.asarray(out.shared_grad)
    assert set(np.unique(shared)) <= {1.0, -3.0}
    draw = np.asarray(jax.random.uniform(RNG, (4000,), jnp.float32))
    np.testing.assert_array_equal(shared, np.where(0.25 > draw, 1.0, -3.0))
    assert abs(np.mean(shared == 1.0) - 0.25) < 0.03
    assert float(out.diagnostics["kept/t0"]) == pytest.approx(np.mean(shared == 1.0))


# ---------------------------------------------------------------- MoCo

def test_moco_one_step_by_hand():
    # g1 = (3, 4) (norm 5), L1 = 2 -> h1 = (1.2, 1.6); g2 = (0, 2), L2 = 1 -> h2 = (0, 1).
    # k = 1: y = h / 2; y y^T = [[1, 0.4], [0.4, 0.25]], times lambda = 1/2: (0.7, 0.325);
    # lambda = softmax(0.5 - 0.1 * (0.7, 0.325)) = softmax(0.43, 0.4675).
    out = _call(MoCo(), [[3.0, 4.0], [0.0, 2.0]], losses=[2.0, 1.0])
    lam1 = 1.0 / (1.0 + np.exp(0.0375))
    np.testing.assert_allclose(_weights(out), [lam1, 1 - lam1], rtol=1e-5)
    expected = lam1 * np.array([0.6, 0.8]) + (1 - lam1) * np.array([0.0, 0.5])
    np.testing.assert_allclose(np.asarray(out.shared_grad), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.state["y"]), [[0.6, 0.8], [0.0, 0.5]], rtol=1e-6)
    # k = 2: y <- y - (0.5 / sqrt(2)) (y - h).
    again = _call(MoCo(), [[3.0, 4.0], [0.0, 2.0]], losses=[2.0, 1.0], state=out.state)
    step = 0.5 / np.sqrt(2.0)
    y2 = np.array([[0.6, 0.8], [0.0, 0.5]]) * (1 - step) + step * np.array([[1.2, 1.6],
                                                                              [0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(again.state["y"]), y2, rtol=1e-5)
    assert int(again.state["count"]) == 2


def test_history_strategies_refuse_rep_grad_and_need_grad_dim():
    for cls in (MoCo, DBMTL, ExcessMTL):
        assert cls.needs_grad_dim and not cls.supports_rep_grad
        with pytest.raises(UserError, match="rep_grad"):
            cls(rep_grad=True)
        with pytest.raises(UserError, match="grad_dim"):
            cls().init(["a", "b"])
        state = cls().init(["a", "b"], grad_dim=3)
        with pytest.raises(ValueError, match="do not match"):
            _call(cls(), np.ones((2, 4)), state=state)


# ---------------------------------------------------------------- DB-MTL

def test_db_mtl_by_hand():
    # Log-loss gradients h = g / L: (3, 4) and (0, 2) (L = 1, 0.5). First call, beta = 0.9:
    # b = h + 0.9 (0 - h) = 0.1 h; norms 0.5, 0.2 -> alpha = (1, 2.5); update
    # (0.3, 0.4) + 2.5 (0, 0.2) = (0.3, 0.9). Decoders get 1 / L.
    grads, losses = [[3.0, 4.0], [0.0, 1.0]], [1.0, 0.5]
    out = _call(DBMTL(), grads, losses=losses)
    np.testing.assert_allclose(np.asarray(out.shared_grad), [0.3, 0.9], rtol=1e-5)
    np.testing.assert_allclose(_weights(out), [1.0, 5.0], rtol=1e-5)
    np.testing.assert_allclose([float(v) for v in out.decoder_weights.values()], [1.0, 2.0],
                               rtol=1e-6)
    # Second call: b = h + 0.9 (0.1 h - h) = 0.19 h, the same alpha.
    again = _call(DBMTL(), grads, losses=losses, state=out.state)
    np.testing.assert_allclose(np.asarray(again.shared_grad), [0.57, 1.71], rtol=1e-5)


# ---------------------------------------------------------------- FairGrad

def test_fairgrad_diagonal_gram_closed_form():
    # Orthogonal gradients, Gram diag(4, 1): a_t w_t = w_t^(-1/alpha) -> w_t = a_t^(-alpha /
    # (1 + alpha)): alpha = 1 gives (1/2, 1), alpha = 2 gives (4^(-2/3), 1).
    grads = [[2.0, 0.0], [0.0, 1.0]]
    np.testing.assert_allclose(_weights(_call(FairGrad(), grads)), [0.5, 1.0], rtol=1e-5)
    np.testing.assert_allclose(_weights(_call(FairGrad(alpha=2.0), grads)),
                               [4 ** (-2 / 3), 1.0], rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_solves_its_system(alpha):
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(4, 9)) * np.array([[10.0], [1.0], [0.1], [1.0]])
    gram = grads @ grads.T
    w, residual = solve_fairgrad(jnp.asarray(gram, jnp.float32), alpha, 20)
    w = np.asarray(w, np.float64)
    assert np.all(w > 0) and float(residual) < 1e-4
    np.testing.assert_allclose(gram @ w, w ** (-1.0 / alpha), rtol=1e-3)


# ---------------------------------------------------------------- GLS and STCH

def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    # L = (1, 4): G = 2, w_t = G / (T L_t) = (1, 0.25); sum w L = G.
    out = GLS()(_losses([1.0, 4.0]), {}, jnp.int32(0))
    np.testing.assert_allclose(_weights(out), [1.0, 0.25], rtol=1e-6)
    assert float(out.diagnostics["geometric_mean"]) == pytest.approx(2.0)


def test_stch_warmup_nadir_and_smooth_max():
    strategy = STCH(steps_per_epoch=2, warmup_epoch=1)
    state = strategy.init(["a", "b"])
    run = jax.jit(lambda ls, st: strategy(ls, st, jnp.int32(0)))
    seen = []
    for values in ([1.0, 2.0], [2.0, 2.0], [2.0, 1.0], [4.0, 3.0], [3.0, 4.0]):
        out = run({"a": jnp.float32(values[0]), "b": jnp.float32(values[1])}, state)
        state = out.state
        seen.append(_weights(out))
    # Epochs 0 (warm-up) and 1 (nadir epoch): the gradient of sum log L, w = 1 / L.
    np.testing.assert_allclose(seen[0], [1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(seen[3], [0.25, 1 / 3], rtol=1e-6)
    # Nadir (3, 2) from epoch 1. Call 5, L = (3, 4): objective 2 log(L1/3 + L2/2), whose
    # gradient is (2 (1/3) / 3, 2 (1/2) / 3) = (2/9, 1/3).
    np.testing.assert_allclose(seen[4], [2 / 9, 1 / 3], rtol=1e-5)
    np.testing.assert_allclose(float(out.diagnostics["nadir/a"]), 3.0)
    with pytest.raises(UserError, match="steps_per_epoch"):
        STCH().init(["a", "b"])


# ---------------------------------------------------------------- ExcessMTL

def test_excess_mtl_by_hand():
    strategy = ExcessMTL()
    # Call 1, g1 = (1, 0), g2 = (0, 2): s = g^2, e = sum(g^2 / sqrt(s)) = (1, 2): stored as
    # the reference, weights stay 1.
    first = _call(strategy, [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(_weights(first), [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(first.state["initial_excess"]), [1.0, 2.0], rtol=1e-6)
    # Call 2, g1 = (2, 0), g2 = (0, 2): s = (5, 8), e = (4/sqrt 5, 4/sqrt 8), ratio to the
    # reference (1.78885, 0.70711); w = exp(0.01 ratio) normalised to sum 2.
    second = _call(strategy, [[2.0, 0.0], [0.0, 2.0]], state=first.state)
    ratio = np.array([4 / np.sqrt(5.0), 4 / np.sqrt(8.0) / 2.0])
    expected = np.exp(0.01 * ratio)
    np.testing.assert_allclose(_weights(second), 2 * expected / expected.sum(), rtol=1e-5)
    assert strategy.decoder_weighting == "weights"


# ---------------------------------------------------------------- IMTL-L and IMTL

def test_imtl_l_scales_descend_the_scaled_loss():
    # s = 0: weights 1; d/ds = e^s L - 1 = (1, -0.5); SGD 0.1 -> s = (-0.1, 0.05).
    strategy = IMTLL(optimizer="sgd", learning_rate=0.1)
    out = strategy(_losses([2.0, 0.5]), strategy.init(["t0", "t1"]), jnp.int32(0))
    np.testing.assert_allclose(_weights(out), [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(out.state["scale"]), [-0.1, 0.05], rtol=1e-6)
    again = strategy(_losses([2.0, 0.5]), out.state, jnp.int32(1))
    np.testing.assert_allclose(_weights(again), np.exp([-0.1, 0.05]), rtol=1e-6)


def test_imtl_full_balances_the_scaled_gradients():
    # s = (log 2, 0): scaled gradients (2, 0) and (0, 1); IMTL-G gives alpha = (1/3, 2/3)
    # (2 alpha_1 = alpha_2), i.e. weights alpha e^s = (2/3, 2/3) on the raw gradients, whose
    # combination (2/3, 2/3) projects equally on both; decoders get e^s = (2, 1).
    strategy = IMTLFull()
    state = strategy.init(["t0", "t1"])
    state["scale"] = jnp.asarray([np.log(2.0), 0.0], jnp.float32)
    out = _call(strategy, np.eye(2), state=state)
    np.testing.assert_allclose(_weights(out), [2 / 3, 2 / 3], rtol=1e-4)
    np.testing.assert_allclose([float(v) for v in out.decoder_weights.values()], [2.0, 1.0],
                               rtol=1e-6)


# ---------------------------------------------------------------- DualProj and ConFIG

def test_dualproj_projects_the_mean():
    # No conflict with the mean: weights stay 1/T.
    out = _call(DualProj(reg_eps=0.0), [[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(_weights(out), [0.5, 0.5], rtol=1e-6)
    # g1 = (1, 0), g2 = (-2, 1): mean (-0.5, 0.5) conflicts with g1; its projection onto
    # {g1.x >= 0, g2.x >= 0} is (0, 0.5) = 1 g1 + 0.5 g2.
    out = _call(DualProj(reg_eps=0.0), [[1.0, 0.0], [-2.0, 1.0]])
    np.testing.assert_allclose(_weights(out), [1.0, 0.5], rtol=1e-5)


def test_config_equal_cosines_and_summed_length():
    # Orthogonal g1 = (1, 0), g2 = (0, 2): b^ = (1, 1)/sqrt 2, length (1 + 2)/sqrt 2, result
    # (1.5, 1.5) = 1.5 g1 + 0.75 g2.
    out = _call(ConFIG(), [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(_weights(out), [1.5, 0.75], rtol=1e-5)
    # g1 = (1, 0), g2 = (1, 1): b = (1, sqrt 2 - 1), b^ = (0.92388, 0.38268), length
    # 0.92388 + 1.30656 = 2.23044 -> (2.06066, 0.85355); equal cosines (0.92388) with both.
    grads = np.array([[1.0, 0.0], [1.0, 1.0]])
    out = _call(ConFIG(), grads)
    direction = _weights(out) @ grads
    np.testing.assert_allclose(direction, [2.060660, 0.853553], rtol=1e-5)
    cosines = grads @ direction / np.linalg.norm(grads, axis=1) / np.linalg.norm(direction)
    np.testing.assert_allclose(cosines, [0.9238795, 0.9238795], rtol=1e-5)
    assert float(out.diagnostics["cosine"]) == pytest.approx(0.9238795, rel=1e-5)


def _near_duplicate_jacobian() -> np.ndarray:
    """Three tasks, the second almost the first: σ_min / σ_max of the unit rows ≈ 6e-4."""
    rng = np.random.default_rng(3)
    g1 = rng.normal(size=64)
    g2 = 2.0 * (g1 + 8e-4 * np.linalg.norm(g1) * rng.normal(size=64) / 8.0)
    g3 = 0.5 * rng.normal(size=64)
    return np.stack([g1, g2, g3]).astype(np.float32)


def test_config_near_duplicate_tasks_match_a_float64_svd_pseudo_inverse():
    """The reference's pinv of the unit-row matrix, in float64 by SVD: with σ_min / σ_max ≈
    6e-4 the float32 result must agree to 1e-4 (the Gram-matrix route, which squares the
    condition number, was 16 % off)."""
    grads = _near_duplicate_jacobian()
    g64 = grads.astype(np.float64)
    units = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    s = np.linalg.svd(units, compute_uv=False)
    assert 3e-4 < s[-1] / s[0] < 1e-3  # ill-conditioned, but far above the 1e-6 cutoff
    b = np.linalg.pinv(units, rcond=1e-6) @ np.ones(3)
    b_hat = b / np.linalg.norm(b)
    want = np.sum(g64 @ b_hat) * b_hat
    out = _call(ConFIG(), grads)
    got = _weights(out).astype(np.float64) @ g64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.linalg.norm(want))
    assert float(out.diagnostics["cosine"]) == pytest.approx(
        float(np.mean(units @ b_hat)), rel=1e-4)
    # rcond=None: torch's own default cutoff, max(T, N) · eps(float32) = 7.6e-6 here.
    got_torch_rule = _weights(_call(ConFIG(rcond=None), grads)).astype(np.float64) @ g64
    np.testing.assert_allclose(got_torch_rule, want, rtol=0,
                               atol=1e-4 * np.linalg.norm(want))
    # A cutoff above σ_min / σ_max drops the small direction: 2.6 % off, far outside the
    # tolerance above (the old Gram route was 0.75 % off on this matrix, 16 % on others).
    dropped = _weights(_call(ConFIG(rcond=1e-2), grads)).astype(np.float64) @ g64
    assert np.linalg.norm(dropped - want) > 0.01 * np.linalg.norm(want)


# ---------------------------------------------------------------- Krum and TrimmedMean

def test_krum_selects_the_most_central_gradients():
    # 1-D gradients 0, 1, 3, 10; T - f - 2 = 2 nearest: scores 1+3, 1+2, 2+3, 7+9.
    grads = [[0.0], [1.0], [3.0], [10.0]]
    np.testing.assert_allclose(_weights(_call(Krum(), grads)), [0, 1, 0, 0])
    np.testing.assert_allclose(_weights(_call(Krum(n_selected=2), grads)), [0.5, 0.5, 0, 0])
    # f = 1: one nearest: scores 1, 1, 2, 7 -> the tie goes to the first task.
    np.testing.assert_allclose(_weights(_call(Krum(n_byzantine=1), grads)), [1, 0, 0, 0])
    with pytest.raises(UserError, match="at least 3 tasks"):
        Krum().init(["a", "b"])


def test_trimmed_mean_coordinatewise():
    # Coordinate 0: (1, 2, 10) -> 2 (task 1 kept); coordinate 1: (5, -1, 0) -> 0 (task 2).
    grads = [[1.0, 5.0], [2.0, -1.0], [10.0, 0.0]]
    out = _call(TrimmedMean(), grads)
    np.testing.assert_allclose(np.asarray(out.shared_grad), [2.0, 0.0])
    np.testing.assert_allclose(_weights(out), [0.0, 0.5, 0.5])
    mean = _call(TrimmedMean(trim_number=0), grads)
    np.testing.assert_allclose(np.asarray(mean.shared_grad), np.mean(grads, axis=0), rtol=1e-6)
    np.testing.assert_allclose(_weights(mean), [1 / 3] * 3, rtol=1e-6)
    with pytest.raises(UserError, match="trim_number=0"):
        TrimmedMean().init(["a", "b"])
