"""Depth target encodings (DenseMTL's inverse depth in cm) and the berHu loss, checked against
hand computations in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.evaluation import trivial
from mtl_jax.tasks import make_task
from mtl_jax.tasks.depth import decode_depth, encode_depth

F32_EPS = float(np.finfo(np.float32).eps)

_loss = jax.jit(lambda task, pred, batch: task.loss(pred, batch), static_argnums=0)
_grad = jax.jit(lambda task, pred, batch: jax.grad(task.loss)(pred, batch), static_argnums=0)
_metrics = jax.jit(lambda task, pred, batch: task.metrics(pred, batch).compute(),
                   static_argnums=0)


def _hand_berhu(r, valid):
    """berHu as defined in docs/metrics.md, and its derivative with c held constant."""
    r = np.asarray(r, np.float64)
    a = np.abs(r[valid])
    c = 0.2 * a.max()
    per_pixel = np.where(a <= c, a, (a * a + c * c) / (2 * c))
    n = valid.sum()
    deriv = np.zeros_like(r)
    deriv[valid] = np.where(a <= c, np.sign(r[valid]), r[valid] / c) / n
    return per_pixel.mean(), deriv


def _toy_batch():
    """2 real examples + 1 padded one (example_mask 0) of 2x3 pixels, with invalid pixels."""
    gt = np.array([[[2.0, 0.0, 3.5], [1.0, 4.0, 0.0]],
                   [[0.5, 2.5, 6.0], [0.0, 1.5, 3.0]],
                   [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]], np.float32)[..., None]
    mask = np.array([1.0, 1.0, 0.0], np.float32)
    valid = (gt[..., 0] > 0) & (mask[:, None, None] > 0)
    return {"depth": gt, "example_mask": mask}, valid


def test_encode_decode_round_trip_is_exact_to_float32():
    d = np.geomspace(0.1, 300.0, 20001).astype(np.float32)
    for enc in ("none", "inverse_cm"):
        back = np.asarray(decode_depth(encode_depth(d, enc), enc))
        assert back.dtype == np.float32
        np.testing.assert_allclose(back, d, rtol=4 * F32_EPS, atol=0, err_msg=enc)


def test_inverse_cm_formula_and_clamp():
    d = np.array([0.0, 0.01, 1.0, 10.0, 100.0], np.float32)
    np.testing.assert_allclose(np.asarray(encode_depth(d, "inverse_cm")),
                               65536.0 / (100.0 * d.astype(np.float64) + 1.0), rtol=2e-7)
    # v is clamped to >= 1 before decoding: at most 655.35 m, never inf or NaN.
    dec = np.asarray(decode_depth(np.array([-5.0, 0.0, 0.5, 1.0], np.float32), "inverse_cm"))
    np.testing.assert_allclose(dec, 655.35, rtol=1e-6)
    assert np.all(np.isfinite(dec))
    np.testing.assert_array_equal(np.asarray(encode_depth(d, "none")), d)
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_depth(d, "log")


def test_berhu_matches_hand_definition_and_its_gradient():
    batch, valid = _toy_batch()
    rng = np.random.default_rng(0)
    # Residuals on both sides of c and of both signs; huge values on pixels that must be
    # ignored (invalid or padded), which would otherwise set c.
    r = rng.normal(0.0, 1.0, valid.shape).astype(np.float32)
    r[0, 0, 0] = -4.0
    r[~valid] = 1e4
    pred = batch["depth"] + r[..., None]
    task = make_task("depth", loss="berhu")
    expected, deriv = _hand_berhu(r, valid)
    c = 0.2 * np.abs(r[valid]).max()
    assert 0 < np.sum(np.abs(r[valid]) <= c) < valid.sum()  # both branches are used
    assert float(_loss(task, pred, batch)) == pytest.approx(expected, rel=1e-6)
    g = np.asarray(_grad(task, pred, batch))[..., 0]
    np.testing.assert_allclose(g, deriv, rtol=1e-5, atol=1e-8)
    assert np.all(g[~valid] == 0)


@pytest.mark.parametrize("loss", ["l1", "berhu", "l1_per_image"])
def test_inverse_cm_loss_is_on_the_encoded_target(loss):
    batch, valid = _toy_batch()
    gt = batch["depth"][..., 0].astype(np.float64)
    enc = np.where(valid, 65536.0 / (100.0 * np.where(valid, gt, 1.0) + 1.0), 0.0)
    rng = np.random.default_rng(1)
    pred = (enc + rng.normal(0.0, 20.0, enc.shape)).astype(np.float32)
    r = np.where(valid, pred - enc, 0.0)
    if loss == "l1":
        expected = np.abs(r[valid]).mean()
    elif loss == "berhu":
        expected, _ = _hand_berhu(r, valid)
    else:
        expected = np.mean([np.abs(r[i][valid[i]]).mean() for i in range(2)])
    task = make_task("depth", loss=loss, encoding="inverse_cm")
    assert float(_loss(task, pred[..., None], batch)) == pytest.approx(expected, rel=1e-5)


def test_inverse_cm_metrics_are_in_metres():
    batch, _ = _toy_batch()
    task = make_task("depth", loss="berhu", encoding="inverse_cm")
    exact = encode_depth(batch["depth"], "inverse_cm")
    m = {k: float(v) for k, v in _metrics(task, exact, batch).items()}
    assert m["abs_err"] < 1e-5 and m["rmse"] < 1e-5 and m["abs_rel"] < 1e-6
    assert m["delta1"] == 1.0
    # A prediction 10 cm too far everywhere: abs_err 0.1 m, not in encoded units.
    far = encode_depth(batch["depth"] + 0.1, "inverse_cm")
    m = {k: float(v) for k, v in _metrics(task, far, batch).items()}
    assert m["abs_err"] == pytest.approx(0.1, rel=1e-4)
    # Raw outputs <= 0 (untrained network) give finite metrics.
    m = _metrics(task, jnp.zeros_like(exact) - 1.0, batch)
    assert all(np.isfinite(float(v)) for v in m.values())


def test_default_depth_task_is_unchanged_and_hashable():
    a, b = make_task("depth"), make_task("depth", loss="l1", encoding="none")
    assert a == b and hash(a) == hash(b) and a.encoding == "none"
    assert make_task("depth", encoding="inverse_cm") != a
    x = jnp.array([[-1.0, 2.5]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(a.postprocess(x)), np.asarray(x))
    with pytest.raises(ValueError, match="encoding must be one of"):
        make_task("depth", encoding="inverse")


def _source(depths):
    return [{"image": np.zeros((2, 3, 3), np.uint8), "depth": d[..., None].astype(np.float32)}
            for d in depths]


def test_trivial_baseline_encodes_the_constant_depth():
    train = _source([np.full((2, 3), 2.0), np.full((2, 3), 4.0)])
    val = _source([np.array([[3.0, 0.0, 3.0], [3.0, 3.0, 3.0]])])
    for enc in ("none", "inverse_cm"):
        tasks = {"depth": make_task("depth", encoding=enc)}
        consts = trivial.fit_constants(train, tasks)
        np.testing.assert_allclose(consts["depth"], np.asarray(encode_depth([3.0], enc)))
        res = trivial.evaluate_constants(val, tasks, consts)
        assert res["depth/abs_err"] == pytest.approx(0.0, abs=1e-5), enc
        assert res["depth/delta1"] == 1.0


def test_output_scale_multiplies_the_head_output():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0.5, 9.0, (2, 4, 5, 1)).astype(np.float32)
    gt[0, 0, 0, 0] = 0.0  # invalid
    batch = {"depth": jnp.asarray(gt)}
    raw = jnp.asarray(rng.uniform(0.5, 8.0, gt.shape), jnp.float32)
    plain = make_task("depth", loss="berhu", encoding="inverse_cm")
    scaled = make_task("depth", loss="berhu", encoding="inverse_cm", output_scale=100.0)
    assert float(scaled.loss(raw, batch)) == pytest.approx(float(plain.loss(raw * 100.0, batch)),
                                                           rel=1e-6)
    np.testing.assert_allclose(scaled.postprocess(raw), plain.postprocess(raw * 100.0), rtol=1e-6)
    # raw_prediction inverts postprocess; the trivial baseline stays exact with a scale.
    np.testing.assert_allclose(scaled.postprocess(scaled.raw_prediction(jnp.asarray(gt[1]))),
                               gt[1], rtol=1e-5)
    train = _source([np.full((2, 3), 2.0), np.full((2, 3), 4.0)])
    val = _source([np.full((2, 3), 3.0)])
    tasks = {"depth": scaled}
    res = trivial.evaluate_constants(val, tasks, trivial.fit_constants(train, tasks))
    assert res["depth/abs_err"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="output_scale"):
        make_task("depth", output_scale=0.0)
