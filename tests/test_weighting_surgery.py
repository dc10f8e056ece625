"""Gradient-surgery / gradient-based strategies on hand-made gradients: PCGrad, MGDA, CAGrad,
IMTL-G, GradNorm. Expected values are worked out by hand in the comments."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.weighting.cagrad import CAGrad
from mtl_jax.weighting.gradnorm import GradNorm
from mtl_jax.weighting.imtl import IMTL
from mtl_jax.weighting.mgda import MGDA
from mtl_jax.weighting.pcgrad import PCGrad

RNG = jax.random.key(0)


def _losses(values):
    return {f"t{i}": jnp.asarray(v, jnp.float32) for i, v in enumerate(values)}


def _call(strategy, grads, losses=None, state=None, step=0, rng=RNG, jit=False):
    grads = jnp.asarray(grads, jnp.float32)
    losses = _losses(losses if losses is not None else [1.0] * grads.shape[0])
    if state is None:
        state = strategy.init(list(losses))

    def run(losses, state, step, rng, grads):
        return strategy(losses, state, step, rng=rng, grads=grads)

    return (jax.jit(run) if jit else run)(losses, state, jnp.asarray(step, jnp.int32), rng, grads)


def _weights(out):
    return np.array([float(v) for v in out.weights.values()])


def _combined(strategy, grads, **kw):
    return _weights(_call(strategy, grads, **kw)) @ np.asarray(grads, np.float64)


# ---------------------------------------------------------------- every strategy

ALL = [PCGrad(), MGDA(), MGDA(normalization="l2"), MGDA(normalization="loss+"), CAGrad(),
       IMTL(), GradNorm()]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: f"{s.name}")
def test_contract_zero_gradients_give_finite_weights(strategy):
    assert strategy.requires == "task_grads" and strategy.rep_grad is False
    for num_tasks in (1, 2, 3):
        out = _call(strategy, np.zeros((num_tasks, 5)), jit=True)
        assert list(out.weights) == [f"t{i}" for i in range(num_tasks)]
        assert np.all(np.isfinite(_weights(out)))
        assert all(np.isfinite(float(v)) for v in out.diagnostics.values())


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: f"{s.name}")
def test_jit_equals_eager(strategy):
    grads = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40)), jnp.float32)
    losses = _losses([0.9, 2.0, 0.3])
    state = strategy.init(list(losses))
    step = jnp.asarray(3, jnp.int32)

    def run(losses, state, step, rng, grads):
        return strategy(losses, state, step, rng=rng, grads=grads)

    eager = run(losses, state, step, RNG, grads)
    jitted = jax.jit(run)(losses, state, step, RNG, grads)
    np.testing.assert_allclose(_weights(jitted), _weights(eager), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jitted.state), jax.tree.leaves(eager.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- PCGrad

def test_pcgrad_leaves_orthogonal_gradients_alone():
    np.testing.assert_allclose(_weights(_call(PCGrad(), [[1.0, 0.0], [0.0, 3.0]])), [1.0, 1.0])


def test_pcgrad_projects_conflicting_pair():
    # g1 = (1, 0), g2 = (-1, 1), g1.g2 = -1 < 0:
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1); sum = (0.5, 1.5),
    # i.e. weights (1 + 1, 1 + 0.5) = (2, 1.5). Both visiting orders agree for T = 2.
    grads = [[1.0, 0.0], [-1.0, 1.0]]
    for seed in range(5):
        out = _call(PCGrad(), grads, rng=jax.random.key(seed))
        np.testing.assert_allclose(_weights(out), [2.0, 1.5], rtol=1e-6)
        np.testing.assert_allclose(_weights(out) @ np.array(grads), [0.5, 1.5], atol=1e-6)
        np.testing.assert_allclose(float(out.diagnostics["conflict_fraction"]), 1.0)


def test_pcgrad_three_tasks_matches_direct_projection():
    grads = np.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [-0.5, -0.5, 1.0]])
    out = _call(PCGrad(), grads, rng=jax.random.key(3))
    # Whatever order was drawn, the result is one of the orders' direct projections.
    candidates = []
    for orders in itertools.product(*[list(itertools.permutations(
            [j for j in range(3) if j != i])) for i in range(3)]):
        total = np.zeros(3)
        for i, order in enumerate(orders):
            g = grads[i].copy()
            for j in order:
                if g @ grads[j] < 0:
                    g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
            total += g
        candidates.append(total)
    combined = _weights(out) @ grads
    assert min(np.abs(c - combined).max() for c in candidates) < 1e-5


# ---------------------------------------------------------------- MGDA

def test_mgda_two_tasks_closed_form():
    # g1 = (1, 0), g2 = (0, 2): alpha_1 = (g2 - g1).g2 / |g1 - g2|^2 = 4 / 5.
    out = _call(MGDA(), [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(_weights(out), [0.8, 0.2], rtol=1e-6)
    np.testing.assert_allclose(_weights(out) @ np.array([[1.0, 0.0], [0.0, 2.0]]), [0.8, 0.4],
                               rtol=1e-6)
    np.testing.assert_allclose(float(out.diagnostics["min_norm"]), np.sqrt(0.8), rtol=1e-5)
    # scale_to_tasks multiplies by T.
    out = _call(MGDA(scale_to_tasks=True), [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(_weights(out), [1.6, 0.4], rtol=1e-6)


def test_mgda_three_tasks_matches_grid_search():
    grads = np.array([[1.0, 0.2, 0.0, 0.5], [-0.3, 1.0, 0.4, 0.1], [0.2, -0.4, 1.0, -0.2]])
    out = _call(MGDA(), grads)
    alpha = _weights(out)
    assert np.all(alpha >= -1e-6) and abs(alpha.sum() - 1.0) < 1e-5
    grid = np.linspace(0.0, 1.0, 401)
    a, b = np.meshgrid(grid, grid)
    inside = a + b <= 1.0
    points = np.stack([a[inside], b[inside], 1.0 - a[inside] - b[inside]], axis=1)
    norms = np.sum((points @ grads) ** 2, axis=1)
    best = points[np.argmin(norms)]
    assert np.sum((alpha @ grads) ** 2) <= norms.min() + 1e-6
    np.testing.assert_allclose(alpha, best, atol=5e-3)


def test_mgda_dominated_gradient_in_hull_is_chosen():
    # g2 = (0.1, 0.1) lies inside the hull's min-norm region: g1.g2 and g3.g2 >= |g2|^2, so
    # the min-norm point is g2 itself.
    grads = [[2.0, 0.0], [0.1, 0.1], [0.0, 3.0]]
    np.testing.assert_allclose(_weights(_call(MGDA(), grads)), [0.0, 1.0, 0.0], atol=1e-6)
    grads2 = [[2.0, 0.0], [0.1, 0.1]]
    np.testing.assert_allclose(_weights(_call(MGDA(), grads2)), [0.0, 1.0], atol=1e-6)


def test_mgda_normalizations():
    grads = np.array([[1.0, 0.0], [0.0, 2.0]])
    # 'l2': unit gradients (1, 0), (0, 1) -> alpha = (0.5, 0.5); w = alpha / |g| = (0.5, 0.25);
    # the shared update is (0.5, 0.5), the min-norm point of the normalised gradients.
    out = _call(MGDA(normalization="l2"), grads)
    np.testing.assert_allclose(_weights(out), [0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(_weights(out) @ grads, [0.5, 0.5], rtol=1e-6)
    # 'loss' with losses (2, 1): normalised (0.5, 0), (0, 2) -> alpha_1 = 4 / 4.25 = 16/17;
    # w = alpha / L = (8/17, 1/17).
    out = _call(MGDA(normalization="loss"), grads, losses=[2.0, 1.0])
    np.testing.assert_allclose(_weights(out), [8 / 17, 1 / 17], rtol=1e-5)
    # 'loss+' with losses (2, 1): n = (2, 2): normalised (0.5, 0), (0, 1) -> alpha_1 = 0.8;
    # w = (0.4, 0.1).
    out = _call(MGDA(normalization="loss+"), grads, losses=[2.0, 1.0])
    np.testing.assert_allclose(_weights(out), [0.4, 0.1], rtol=1e-5)
    with pytest.raises(UserError):
        MGDA(normalization="l1")


# ---------------------------------------------------------------- CAGrad

def test_cagrad_c0_is_the_mean():
    grads = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0], [0.3, -2.0, 1.0]])
    np.testing.assert_allclose(_weights(_call(CAGrad(c=0.0), grads)), [1 / 3] * 3, rtol=1e-6)


def test_cagrad_improves_the_worst_task():
    grads = np.array([[1.0, 0.0], [-0.8, 0.3]])
    mean = grads.mean(axis=0)
    strategy = CAGrad(c=0.4, rescale=0)
    out = _call(strategy, grads)
    d = _weights(out) @ grads
    assert np.min(grads @ d) > np.min(grads @ mean) + 1e-3
    # d stays in the ball ||d - g0|| <= c ||g0||.
    assert np.linalg.norm(d - mean) <= 0.4 * np.linalg.norm(mean) * (1 + 1e-4)
    np.testing.assert_allclose(float(out.diagnostics["worst_improvement"]), np.min(grads @ d),
                               rtol=1e-4)
    # A grid over the ball's boundary: nothing does much better than d on the worst task.
    angles = np.linspace(0.0, 2 * np.pi, 20001)
    ball = mean + 0.4 * np.linalg.norm(mean) * np.stack([np.cos(angles), np.sin(angles)], 1)
    assert np.min(grads @ d) >= np.max(np.min(ball @ grads.T, axis=1)) - 1e-4
    # rescale variants divide d by (1 + c^2) and (1 + c).
    for rescale, factor in [(1, 1.16), (2, 1.4)]:
        w = _weights(_call(CAGrad(c=0.4, rescale=rescale), grads))
        np.testing.assert_allclose(w * factor, _weights(out), rtol=1e-5)


# ---------------------------------------------------------------- IMTL-G

@pytest.mark.parametrize("grads", [
    [[1.0, 0.0], [1.0, 3.0]],
    [[2.0, 0.0, 0.0, 0.1], [0.5, 1.0, 0.0, 0.0], [-0.3, 0.2, 4.0, 0.0]],
])
def test_imtl_equal_projections(grads):
    grads = np.array(grads)
    out = _call(IMTL(), grads)
    alpha = _weights(out)
    np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)
    d = alpha @ grads
    proj = grads @ d / np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(proj, proj[0], rtol=1e-4)
    assert proj[0] > 0


def test_imtl_two_tasks_by_hand():
    # g1 = (1, 0), g2 = (0, 2): d = a g1 + (1 - a) g2 with d.u1 = d.u2 -> a = 2 (1 - a),
    # a = 2/3: d = (2/3, 2/3).
    np.testing.assert_allclose(_weights(_call(IMTL(), [[1.0, 0.0], [0.0, 2.0]])), [2 / 3, 1 / 3],
                               rtol=1e-5)


# ---------------------------------------------------------------- GradNorm

def test_gradnorm_raises_the_slower_task_and_round_trips_state():
    strategy = GradNorm()
    grads = np.array([[1.0, 0.0], [0.0, 1.0]])
    state = strategy.init(["t0", "t1"])
    out0 = _call(strategy, grads, losses=[1.0, 1.0], state=state, step=0)
    # Equal norms and ratios at the first call: perfectly balanced, nothing moves.
    np.testing.assert_allclose(_weights(out0), [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(out0.state["weights"]), [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(out0.state["initial_losses"]), [1.0, 1.0])
    # Task 0 learns slower (ratio 0.9 vs 0.5): r = (0.9, 0.5) / 0.7, targets
    # G_bar r^1.5 = (1.4579, 0.6037); G = (1, 1) -> L_grad = 0.4579 + 0.3963 = 0.8542.
    out1 = _call(strategy, grads, losses=[0.9, 0.5], state=out0.state, step=1)
    np.testing.assert_allclose(_weights(out1), [1.0, 1.0])  # the weights used this step
    np.testing.assert_allclose(float(out1.diagnostics["gradnorm_loss"]), 0.8542, atol=1e-4)
    new = np.asarray(out1.state["weights"])
    assert new[0] > 1.0 > new[1]
    np.testing.assert_allclose(new.sum(), 2.0, rtol=1e-6)
    # dL_grad/dw = (-1, +1). Adam's state already counted the first call (gradient 0), so
    # this is its 2nd step: m^ = 0.1 g / (1 - 0.9^2), v^ = 0.001 g^2 / (1 - 0.999^2), step =
    # 0.025 * 0.52632 / sqrt(0.50025) = 0.018603 -> (1.018603, 0.981397), summing to 2.
    np.testing.assert_allclose(new, [1.018603, 0.981397], rtol=1e-5)
    out2 = _call(strategy, grads, losses=[0.9, 0.5], state=out1.state, step=2)
    np.testing.assert_allclose(_weights(out2), new)
    # State round trip: a numpy copy (as a checkpoint restores it) gives the same result.
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), out1.state)
    again = _call(strategy, grads, losses=[0.9, 0.5], state=restored, step=2)
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(out2.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(out2.state) == jax.tree.structure(strategy.init(["t0", "t1"]))


def test_gradnorm_weights_stay_positive():
    strategy = GradNorm(learning_rate=5.0)
    grads = np.array([[1.0, 0.0], [0.0, 1.0]])
    state = _call(strategy, grads, losses=[1.0, 1.0]).state
    for step in range(1, 4):
        state = _call(strategy, grads, losses=[1.0, 1e-3], state=state, step=step).state
    w = np.asarray(state["weights"])
    assert np.all(w > 0) and abs(w.sum() - 2.0) < 1e-5
