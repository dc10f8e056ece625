"""Unit tests of the loss-based strategies (uw, uw_xtasc, dwa, rlw, famo) and grad_magnitude,
on hand-made losses and gradients with hand-computed expectations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.weighting.dwa import DynamicWeightAverage
from mtl_jax.weighting.famo import FAMO
from mtl_jax.weighting.grad_magnitude import GradMagnitude
from mtl_jax.weighting.rlw import RandomLossWeighting
from mtl_jax.weighting.uw import UncertaintyWeighting, UncertaintyWeightingXTasC

TASKS = ("seg", "depth")
RNG = jax.random.key(0)


def _losses(values, tasks=TASKS):
    return {t: jnp.float32(v) for t, v in zip(tasks, values, strict=True)}


def _weights(out, tasks=TASKS):
    return np.array([float(out.weights[t]) for t in tasks])


@functools.cache
def _call(strategy, tasks=TASKS, jit=True):
    """``f(loss_values, state, step)``; the losses dict is built inside the (jitted) function,
    in task order, as the train step does (a dict passed into ``jax.jit`` comes out with its
    keys sorted, which would reorder the tasks)."""

    def fn(values, state, step):
        return strategy(_losses(values, tasks), state, step, rng=RNG)

    return jax.jit(fn) if jit else fn


def _run(strategy, loss_rows, tasks=TASKS, state=None, jit=True):
    """Calls the strategy once per row; returns the list of weight vectors and the last state."""
    fn = _call(strategy, tasks, jit)
    state = strategy.init(tasks) if state is None else state
    weights = []
    for i, row in enumerate(loss_rows):
        out = fn(jnp.asarray(row, jnp.float32), state, jnp.int32(i))
        weights.append(_weights(out, tasks))
        state = out.state
    return weights, state


# ----------------------------------------------------------------------------- uw


def test_uw_initial_weights_and_sgd_step():
    uw = UncertaintyWeighting(optimizer="sgd", learning_rate=0.1)
    state = uw.init(TASKS)
    out = _call(uw)(jnp.array([1.0, 4.0]), state, jnp.int32(0))
    np.testing.assert_allclose(_weights(out), [0.8243606353500641] * 2, rtol=1e-6)
    np.testing.assert_allclose(float(out.diagnostics["log_var/depth"]), -0.5)
    # grad = -exp(0.5)/2 * L + 1/2 = [-0.32436..., -2.79744...]; sgd: s <- s - 0.1 * grad.
    np.testing.assert_allclose(np.asarray(out.state["log_var"]),
                               [-0.5 + 0.03243606353500641, -0.5 + 0.27974425414002564],
                               rtol=1e-6)
    # The next call's weights use the updated s.
    out2 = uw(_losses([1.0, 4.0]), out.state, jnp.int32(1), rng=RNG)
    np.testing.assert_allclose(_weights(out2), 0.5 * np.exp(-np.asarray(out.state["log_var"])),
                               rtol=1e-6)


def test_uw_adam_moves_against_gradient():
    uw = UncertaintyWeighting()  # adam, lr 1e-4
    _, state = _run(uw, [[1.0, 4.0]])
    # First Adam step is -lr * sign(grad); both gradients are negative -> both s increase.
    np.testing.assert_allclose(np.asarray(state["log_var"]), [-0.5 + 1e-4] * 2, rtol=1e-5)
    # Small loss (L < exp(s), grad > 0) -> s decreases.
    _, state = _run(uw, [[0.1, 4.0]])
    assert float(state["log_var"][0]) < -0.5 < float(state["log_var"][1])


def test_uw_converges_to_log_loss():
    uw = UncertaintyWeighting(optimizer="sgd", learning_rate=0.5)
    _, state = _run(uw, [[0.5, 3.0]] * 200)
    np.testing.assert_allclose(np.asarray(state["log_var"]), np.log([0.5, 3.0]), atol=1e-4)


def test_uw_xtasc():
    uw = UncertaintyWeightingXTasC(optimizer="sgd", learning_rate=0.1)
    assert uw.name == "uw_xtasc" and uw.init_log_var == 0.0
    weights, state = _run(uw, [[1.0, 4.0], [1.0, 4.0]])
    np.testing.assert_allclose(weights[0], [0.5, 0.5], rtol=1e-6)
    # grad = -0.5 exp(-s) L + 1 = [0.5, -1.0] -> s = [-0.05, 0.1] after the first call.
    np.testing.assert_allclose(weights[1], [0.5256355481880121, 0.45241870901797976],
                               rtol=1e-6)
    # Second step at s = [-0.05, 0.1]: grad = [1 - 0.52563555, 1 - 4 * 0.45241871].
    np.testing.assert_allclose(np.asarray(state["log_var"]), [-0.09743644518, 0.18096748361],
                               rtol=1e-6)


def test_uw_bad_optimizer():
    with pytest.raises(UserError):
        UncertaintyWeighting(optimizer="lbfgs")


# ----------------------------------------------------------------------------- dwa


def test_dwa_epoch_mode():
    dwa = DynamicWeightAverage(steps_per_epoch=2)
    history = [[1.0, 3.0], [3.0, 1.0],   # epoch 0: means (2, 2)
               [3.0, 2.0], [5.0, 2.0],   # epoch 1: means (4, 2)
               [2.0, 1.0], [2.0, 3.0],   # epoch 2: weights from w = (4/2, 2/2); means (2, 2)
               [9.0, 9.0]]               # epoch 3: weights from w = (2/4, 2/2)
    weights, state = _run(dwa, history)
    for w in weights[:4]:
        np.testing.assert_allclose(w, [1.0, 1.0])
    # 2 * softmax([2, 1] / 2) and 2 * softmax([0.5, 1] / 2).
    for w in weights[4:6]:
        np.testing.assert_allclose(w, [1.2449186624037092, 0.7550813375962908], rtol=1e-6)
    np.testing.assert_allclose(weights[6], [0.8756469982284039, 1.1243530017715961], rtol=1e-6)
    assert int(state["epochs"]) == 3 and int(state["count"]) == 1
    np.testing.assert_allclose(np.asarray(state["sum"]), [9.0, 9.0])


def test_dwa_three_tasks_sum_to_k():
    tasks = ("a", "b", "c")
    dwa = DynamicWeightAverage(steps_per_epoch=1, temperature=2.0)
    weights, _ = _run(dwa, [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5], [1.0, 1.0, 1.0]], tasks=tasks)
    # w = (1, 2, 0.5) -> 3 * softmax(w / 2).
    expected = 3 * np.exp([0.5, 1.0, 0.25]) / np.exp([0.5, 1.0, 0.25]).sum()
    np.testing.assert_allclose(weights[2], expected, rtol=1e-6)
    np.testing.assert_allclose(weights[2].sum(), 3.0, rtol=1e-6)


def test_dwa_window_mode():
    dwa = DynamicWeightAverage(window=2, steps_per_epoch=1000)  # window takes precedence
    history = [[1.0, 3.0], [3.0, 1.0], [3.0, 2.0], [5.0, 2.0], [0.0, 0.0], [8.0, 8.0]]
    weights, state = _run(dwa, history)
    for w in weights[:4]:
        np.testing.assert_allclose(w, [1.0, 1.0])
    # Call 4: older = mean(rows 0-1) = (2, 2), recent = mean(rows 2-3) = (4, 2).
    np.testing.assert_allclose(weights[4], [1.2449186624037092, 0.7550813375962908], rtol=1e-6)
    # Call 5: older = mean(rows 1-2) = (3, 1.5), recent = mean(rows 3-4) = (2.5, 1).
    w = np.array([2.5 / 3, 1 / 1.5]) / 2
    np.testing.assert_allclose(weights[5], 2 * np.exp(w) / np.exp(w).sum(), rtol=1e-6)
    assert np.asarray(state["history"]).shape == (4, 2) and int(state["seen"]) == 4


def test_dwa_needs_a_period():
    with pytest.raises(UserError):
        DynamicWeightAverage().init(TASKS)


# ----------------------------------------------------------------------------- rlw


def test_rlw():
    rlw = RandomLossWeighting()
    tasks = ("a", "b", "c")
    losses = _losses([1.0, 2.0, 3.0], tasks)
    fn = jax.jit(lambda rng: rlw(_losses([1.0, 2.0, 3.0], tasks), {}, jnp.int32(0), rng=rng))
    w0 = _weights(fn(jax.random.key(0)), tasks)
    assert (w0 > 0).all()
    np.testing.assert_allclose(w0.sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w0, _weights(fn(jax.random.key(0)), tasks))
    assert not np.allclose(w0, _weights(fn(jax.random.key(1)), tasks))
    expected = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3,)))
    np.testing.assert_allclose(w0, np.asarray(expected), rtol=1e-6)
    wu = _weights(RandomLossWeighting(distribution="uniform")(losses, {}, 0, rng=RNG), tasks)
    np.testing.assert_allclose(wu.sum(), 1.0, rtol=1e-6)
    with pytest.raises(UserError):
        RandomLossWeighting(distribution="cauchy")


# ----------------------------------------------------------------------------- famo


def test_famo_weights():
    famo = FAMO()
    weights, state = _run(famo, [[2.0, 2.0]])
    np.testing.assert_allclose(weights[0], [0.5, 0.5])
    # z = (1/2, 1/2), L = (1, 4): c = (1, 1/4) / 1.25.
    weights, _ = _run(famo, [[1.0, 4.0]])
    np.testing.assert_allclose(weights[0], [0.8, 0.2], rtol=1e-6)


def test_famo_logits_favour_the_lagging_task():
    famo = FAMO()
    weights, state = _run(famo, [[1.0, 1.0], [0.1, 0.9]])
    logits = np.asarray(state["logits"])
    # Task 0 improved far more (log 10 vs log 1/0.9): its logit goes down, task 1's up; the
    # first Adam step has size lr = 0.025.
    np.testing.assert_allclose(logits, [-0.025, 0.025], rtol=1e-5)
    # z = softmax(logits) = (0.4875026, 0.5124974); c = (z / L) / sum(z / L).
    np.testing.assert_allclose(weights[1], [0.89540914, 0.10459086], rtol=1e-6)
    # Equal improvements leave the logits unchanged (gradient 0; weight decay of 0 logits is 0).
    _, state = _run(famo, [[1.0, 2.0], [0.5, 1.0]])
    np.testing.assert_allclose(np.asarray(state["logits"]), [0.0, 0.0], atol=1e-7)


def test_famo_logit_gradient_is_softmax_vjp():
    famo = FAMO()
    logits = jnp.array([0.3, -0.2, 0.1])
    prev, now = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.9, 3.3])
    delta = jnp.log(prev) - jnp.log(now)
    _, vjp = jax.vjp(jax.nn.softmax, logits)
    np.testing.assert_allclose(np.asarray(famo.logit_grad(logits, prev, now)),
                               np.asarray(vjp(delta)[0]), rtol=1e-5, atol=1e-7)


def test_famo_clamps_zero_loss():
    weights, state = _run(FAMO(), [[0.0, 1.0], [0.0, 1.0]])
    assert np.isfinite(weights).all() and np.isfinite(np.asarray(state["logits"])).all()


# ----------------------------------------------------------------------------- grad_magnitude


def _gm(strategy, decoder_grads, tasks=("a", "b")):
    fn = jax.jit(lambda g: strategy(_losses([1.0] * len(tasks), tasks), {}, jnp.int32(0),
                                    rng=RNG, decoder_grads=g))
    out = fn(decoder_grads)
    return _weights(out, tasks), out


def test_grad_magnitude_mean_abs():
    gm = GradMagnitude()
    assert gm.requires == "decoder_grads"
    equal = {"a": {"w": jnp.array([1.0, -3.0])}, "b": {"w": jnp.array([2.0, 2.0, 2.0, 2.0])}}
    w, out = _gm(gm, equal)
    np.testing.assert_allclose(w, [0.5, 0.5])
    np.testing.assert_allclose(float(out.diagnostics["gbar/a"]), 2.0)
    # a: (1 + 3 + 0 + 4) / 4 = 2; b: 1 -> (2/3, 1/3).
    unequal = {"a": {"w": jnp.array([1.0, -3.0]), "k": jnp.array([[0.0, 4.0]])},
               "b": {"w": jnp.array([1.0, -1.0])}}
    w, _ = _gm(gm, unequal)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3], rtol=1e-6)
    # l2: sqrt(26) and sqrt(2).
    w, _ = _gm(GradMagnitude(norm="l2"), unequal)
    np.testing.assert_allclose(w, [0.7828707270446675, 0.21712927295533246], rtol=1e-6)
    w, _ = _gm(GradMagnitude(scale=2.0), unequal)
    np.testing.assert_allclose(w, [4 / 3, 2 / 3], rtol=1e-6)


def test_grad_magnitude_zero_grads_equal_weights():
    zeros = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.zeros((2, 2))}}
    w, _ = _gm(GradMagnitude(), zeros)
    np.testing.assert_allclose(w, [0.5, 0.5])
    with pytest.raises(UserError):
        GradMagnitude(norm="max")


# ----------------------------------------------------------------------------- all


STATEFUL = [
    UncertaintyWeighting(),
    UncertaintyWeightingXTasC(),
    DynamicWeightAverage(steps_per_epoch=2),
    DynamicWeightAverage(window=2),
    RandomLossWeighting(),
    FAMO(),
]
HISTORY = [[1.0, 3.0], [3.0, 1.0], [3.0, 2.0], [5.0, 2.0], [2.0, 1.5], [1.0, 1.0], [0.5, 0.9]]


@pytest.mark.parametrize("strategy", STATEFUL, ids=lambda s: f"{s.name}")
def test_state_round_trip_and_jit(strategy):
    w_jit, state = _run(strategy, HISTORY[:5])
    w_eager, state_eager = _run(strategy, HISTORY[:5], jit=False)
    np.testing.assert_allclose(np.array(w_jit), np.array(w_eager), rtol=1e-6)
    host = jax.tree.map(np.asarray, state)
    assert jax.tree.structure(host) == jax.tree.structure(state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(strategy.init(TASKS)))
    a, state_a = _run(strategy, HISTORY[5:], state=state)
    b, state_b = _run(strategy, HISTORY[5:], state=host)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_grad_magnitude_stateless_round_trip():
    gm = GradMagnitude()
    state = gm.init(TASKS)
    assert state == {} and jax.tree.map(np.asarray, state) == {}
