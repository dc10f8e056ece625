"""Depth evaluation range, the added metrics (sq_rel, rmse_log, normals rmse_angle), berHu
normalisation, dataset task defaults, and the reference codes' averaging (``eval.compat``)."""

import math
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_jax import steps
from mtl_jax.evaluation import compute_metrics, merge_metrics
from mtl_jax.experiment import build_tasks
from mtl_jax.tasks import make_task
from mtl_jax.tasks.compat import compat_metrics, masked_median, parse_compat


def _depth_batch(gt):
    return {"depth": jnp.asarray(gt, jnp.float32)[..., None]}


def _m(task, pred, batch):
    return {k: float(v) for k, v in task.metrics(
        jnp.asarray(pred, jnp.float32)[..., None], batch).compute().items()}


# ---------------------------------------------------------------------------- range
def test_far_plane_outside_range_is_not_valid_depth():
    gt = [[[10.0, 20.0, 655.35, 0.0]]]  # VKITTI2 sky at the far plane, one hole
    pred = [[[12.0, 100.0, 600.0, 5.0]]]
    batch = _depth_batch(gt)
    ranged = make_task("depth", min_depth=1e-3, max_depth=80.0)
    m = _m(ranged, pred, batch)
    # Valid: 10 and 20 only; the prediction 100 is clamped to 80.
    assert m["abs_err"] == pytest.approx((2.0 + 60.0) / 2)
    assert m["abs_rel"] == pytest.approx((0.2 + 3.0) / 2)
    assert m["rmse"] == pytest.approx(math.sqrt((4.0 + 3600.0) / 2))
    # Without a range (the old behaviour) the far plane counts and dominates.
    plain = _m(make_task("depth"), pred, batch)
    assert plain["abs_err"] == pytest.approx((2.0 + 80.0 + 55.35) / 3, rel=1e-5)


def test_prediction_is_clamped_from_below():
    m = _m(make_task("depth", min_depth=0.5, max_depth=80.0), [[[-3.0]]], _depth_batch([[[2.0]]]))
    assert m["abs_err"] == pytest.approx(1.5)
    assert m["delta3"] == 0.0


def test_sq_rel_and_rmse_log_by_hand():
    gt = np.array([[[2.0, 4.0]]])
    pred = np.array([[[3.0, 2.0]]])
    m = _m(make_task("depth"), pred, _depth_batch(gt))
    assert m["sq_rel"] == pytest.approx((1.0 / 2.0 + 4.0 / 4.0) / 2)
    assert m["rmse_log"] == pytest.approx(
        math.sqrt((math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2), rel=1e-6)


def test_normals_rmse_angle():
    gt = jnp.asarray([[[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]]])
    s30, c30 = math.sin(math.radians(30)), math.cos(math.radians(30))
    pred = jnp.asarray([[[[0.0, 0.0, 1.0], [s30, 0.0, c30]]]])
    m = make_task("normals").metrics(pred, {"normals": gt}).compute()
    assert float(m["rmse_angle"]) == pytest.approx(math.sqrt((0 + 30.0**2) / 2), rel=1e-4)
    assert float(m["mean_angle"]) == pytest.approx(15.0, rel=1e-4)


def test_bad_range_is_an_error():
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        make_task("depth", min_depth=10.0, max_depth=5.0)


def test_dataset_implies_the_range_and_config_overrides_it():
    c = ml_collections.ConfigDict(dict(dataset=dict(name="vkitti2"), tasks=dict(depth=dict())))
    depth = build_tasks(c)["depth"]
    assert (depth.min_depth, depth.max_depth) == (1e-3, 80.0)
    c.tasks.depth = dict(max_depth=50.0)
    assert build_tasks(c)["depth"].max_depth == 50.0
    c.dataset.name = "nyuv2"
    c.tasks.depth = dict()
    assert build_tasks(c)["depth"].max_depth == 10.0
    c.dataset.name = "synthetic"
    assert build_tasks(c)["depth"].max_depth is None


@pytest.mark.parametrize("dataset, depth_range", [
    ("vkitti2", (1e-3, 80.0)), ("synthia", (1e-3, 80.0)), ("cityscapes", (1e-3, 80.0)),
    ("nyuv2", (1e-3, 10.0)), ("nyud_mt", (1e-3, 10.0)),
    ("synthetic", (0.0, None)), ("cityscapes_mtan", (0.0, None)),
])
def test_every_dataset_implies_its_documented_range(dataset, depth_range):
    """The table of docs/metrics.md ("Evaluation range"): KITTI's 1e-3-80 m for the driving
    datasets in metres, the Kinect's 10 m for NYUv2, none for disparity or synthetic depth."""
    c = ml_collections.ConfigDict(dict(dataset=dict(name=dataset), tasks=dict(depth=dict())))
    depth = build_tasks(c)["depth"]
    assert (depth.min_depth, depth.max_depth) == depth_range  # (0, None): no range
    assert depth.has_range == (depth_range[1] is not None)
    c.tasks.depth = dict(min_depth=0.5)  # an explicit option wins, the other bound stays
    depth = build_tasks(c)["depth"]
    assert (depth.min_depth, depth.max_depth) == (0.5, depth_range[1])


# ---------------------------------------------------------------------------- berHu
def test_berhu_all_pixels_normalisation():
    gt = jnp.asarray([[[[1.0], [2.0], [0.0], [0.0]]]])  # 2 of 4 pixels valid
    pred = jnp.asarray([[[[1.5], [4.0], [9.0], [9.0]]]])
    batch = {"depth": gt}
    valid = float(make_task("depth", loss="berhu").loss(pred, batch))
    every = float(make_task("depth", loss="berhu", berhu_norm="all").loss(pred, batch))
    # c = 0.2 * 2 = 0.4: 0.5 -> (0.25 + 0.16) / 0.8, 2 -> (4 + 0.16) / 0.8.
    by_hand = ((0.25 + 0.16) / 0.8 + (4 + 0.16) / 0.8)
    assert valid == pytest.approx(by_hand / 2)
    assert every == pytest.approx(by_hand / 4)  # DenseMTL: mean over all pixels


# ---------------------------------------------------------------------------- compat
def _compat_result(tasks, batches, modes):
    acc = None
    for preds, batch in batches:
        acc = merge_metrics(acc, compat_metrics(tasks, preds, batch, modes))
    return compute_metrics(acc)


def test_per_image_depth_is_denseMTLs_average():
    depth = make_task("depth", min_depth=1e-3, max_depth=80.0)
    gt = np.array([[[1.0, 1.0, 1.0, 1.0]], [[2.0, 0.0, 0.0, 0.0]]])
    pred = np.array([[[2.0, 1.0, 1.0, 1.0]], [[1.0, 5.0, 5.0, 5.0]]])
    r = _compat_result({"depth": depth}, [({"depth": jnp.asarray(pred)[..., None]},
                                           _depth_batch(gt))], ("per_image",))
    # image 0: errors 1,0,0,0 (abs_rel 0.25, mse 0.25); image 1: error 1 on gt 2.
    assert r["depth/compat_per_image/abs_rel"] == pytest.approx((0.25 + 0.5) / 2)
    assert r["depth/compat_per_image/abs_err"] == pytest.approx((0.25 + 1.0) / 2)
    assert r["depth/compat_per_image/rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert r["depth/compat_per_image/delta1"] == pytest.approx((0.75 + 0.0) / 2)
    # Ours, per pixel over the split: 2 / 5 abs err.
    ours = _m(depth, pred, _depth_batch(gt))
    assert ours["abs_err"] == pytest.approx(2.0 / 5)


def test_mtan_compat_averages_per_batch_and_medians():
    normals = make_task("normals")
    up = [0.0, 0.0, 1.0]
    s, c = math.sin(math.radians(10)), math.cos(math.radians(10))
    tilt = [s, 0.0, c]
    # Batch 1: angles 0, 0, 10 (median 0); batch 2: angle 10, plus a valid normal whose
    # components sum to 0 (MTAN counts it invalid, we do not).
    zero_sum = [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0]
    b1 = ({"normals": jnp.asarray([[[up, up, tilt]]])}, {"normals": jnp.asarray([[[up, up, up]]])})
    b2 = ({"normals": jnp.asarray([[[tilt, up, up]]])},
          {"normals": jnp.asarray([[[up, zero_sum, [0.0, 0.0, 0.0]]]])})
    r = _compat_result({"normals": normals}, [b1, b2], ("mtan",))
    assert r["normals/compat_mtan/mean_angle"] == pytest.approx((10 / 3 + 10) / 2, rel=1e-4)
    assert r["normals/compat_mtan/median_angle"] == pytest.approx((0 + 10) / 2, rel=1e-4)
    assert r["normals/compat_mtan/within_11.25"] == pytest.approx(100.0)
    ours = merge_metrics(None, {"normals": normals.metrics(b1[0]["normals"], b1[1])})
    ours = merge_metrics(ours, {"normals": normals.metrics(b2[0]["normals"], b2[1])})
    ours = compute_metrics(ours)
    # Ours: 5 valid pixels (0, 0, 10, 10, 90): mean 22, whole-split median 10.
    assert ours["normals/mean_angle"] == pytest.approx(22.0, rel=1e-4)
    assert ours["normals/median_angle"] == pytest.approx(10.0, abs=0.05)


def test_mtan_depth_and_semseg():
    depth, semseg = make_task("depth"), make_task("semseg", num_classes=3)
    b1 = ({"depth": jnp.asarray([[[[2.0], [2.0]]]]), "semseg": jnp.asarray(
        [[[[5.0, 0, 0], [0, 5.0, 0]]]])},
          {"depth": jnp.asarray([[[[1.0], [1.0]]]]), "semseg": jnp.asarray([[[0, 1]]])})
    b2 = ({"depth": jnp.asarray([[[[1.0], [9.0]]]]), "semseg": jnp.asarray(
        [[[[5.0, 0, 0], [5.0, 0, 0]]]])},
          {"depth": jnp.asarray([[[[2.0], [0.0]]]]), "semseg": jnp.asarray([[[0, 0]]])})
    r = _compat_result({"depth": depth, "semseg": semseg}, [b1, b2], ("mtan",))
    assert r["depth/compat_mtan/abs_err"] == pytest.approx((1.0 + 1.0) / 2)
    assert r["depth/compat_mtan/abs_rel"] == pytest.approx((1.0 + 0.5) / 2)
    assert math.isnan(r["semseg/compat_mtan/miou"])  # class 2 absent: MTAN's plain mean
    assert r["semseg/compat_mtan/pixel_acc"] == pytest.approx(1.0)


def test_per_image_semseg_miou():
    semseg = make_task("semseg", num_classes=2)
    logits = jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    labels = jnp.asarray([[[0, 1]], [[1, 1]]])
    r = _compat_result({"semseg": semseg}, [({"semseg": logits}, {"semseg": labels})],
                       ("per_image",))
    # image 0: IoU class 0 = 1/2, class 1 = 0 -> 0.25; image 1: class 1 = 1 -> 1.
    assert r["semseg/compat_per_image/miou"] == pytest.approx((0.25 + 1.0) / 2)


def test_masked_median_matches_numpy():
    x = np.random.default_rng(0).uniform(size=(3, 7))
    valid = x > 0.3
    np.testing.assert_allclose(masked_median(jnp.asarray(x), jnp.asarray(valid)),
                               np.median(x[valid]), rtol=1e-6)


def test_eval_step_reports_compat_only_when_configured():
    depth = make_task("depth")
    pred = jnp.full((1, 1, 2, 1), 2.0)
    model = types.SimpleNamespace(apply=lambda v, image, train: ({"depth": pred}, {}))
    state = types.SimpleNamespace(params={}, batch_stats={})
    batch = {"image": jnp.zeros((1, 1, 2, 3)), "depth": jnp.asarray([[[[1.0], [4.0]]]])}
    plain = steps.eval_step(state, batch, model=model, tasks={"depth": depth})
    assert set(plain) == {"depth"}
    both = steps.eval_step(state, batch, model=model, tasks={"depth": depth},
                           compat=parse_compat("per_image,mtan"))
    assert set(both) == {"depth", "depth/compat_per_image", "depth/compat_mtan"}
    flat = compute_metrics(both)
    assert flat["depth/compat_mtan/abs_rel"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="valid"):
        parse_compat("xtasc")
