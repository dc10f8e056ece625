"""Losses and metrics of every task on hand-made arrays with hand-computed answers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.evaluation import metrics as ev
from mtl_jax.tasks import TASKS, make_task

LN3 = math.log(3.0)


# Jitted wrappers: one compilation per function is much faster than eager op-by-op dispatch.
@functools.cache
def _compute_fn(metric_cls):
    # One jitted function per metric class: a single jit shared by classes whose pytrees look
    # alike (e.g. ConfusionMatrix3 with and without per-class IoU) was once served the other
    # class's trace in a full-suite run.
    return jax.jit(metric_cls.compute)


def _scalars(metric):
    return {k: float(v) for k, v in _compute_fn(type(metric))(metric).items()}


# Jitted once with the task as a static argument: the compilation cache is then keyed on the
# task's value. (jax.jit(task.metrics) on a fresh, short-lived bound method can be served a
# stale trace of another task whose bound method had the same address.)
_jit_loss = jax.jit(lambda task, pred, batch: task.loss(pred, batch), static_argnums=0)
_jit_metrics = jax.jit(lambda task, pred, batch: task.metrics(pred, batch), static_argnums=0)
_jit_grad = jax.jit(lambda task, pred, batch: jax.grad(task.loss)(pred, batch), static_argnums=0)


def _loss(task, pred, batch):
    return float(_jit_loss(task, pred, batch))


def _metrics(task, pred, batch):
    return _jit_metrics(task, pred, batch)


# ---------------------------------------------------------------- semseg


def test_semseg_ce_ignore_and_class_weights():
    # Pixels: logits [0,0] label 0 -> ln 2; [ln3,0] label 0 -> ln(4/3); [ln3,0] label 1 -> ln 4;
    # the 4th pixel is ignored (-1) and would otherwise dominate.
    logits = jnp.array([[[[0.0, 0.0], [LN3, 0.0]], [[LN3, 0.0], [100.0, -100.0]]]])
    labels = jnp.array([[[0, 0], [1, -1]]], jnp.int32)
    task = make_task("semseg", num_classes=2)
    assert _loss(task, logits, {"semseg": labels}) == pytest.approx(0.7890413, abs=1e-5)
    # Out-of-range label 5 is ignored in jit as well.
    bad = labels.at[0, 1, 1].set(5)
    assert _loss(task, logits, {"semseg": bad}) == pytest.approx(0.7890413, abs=1e-5)
    # Weights (1, 3): (ln2 + ln(4/3) + 3 ln4) / 5.
    weighted = make_task("semseg", num_classes=2, class_weights=[1.0, 3.0])
    assert _loss(weighted, logits, {"semseg": labels}) == pytest.approx(1.0279424, abs=1e-5)
    # bfloat16 logits still give a float32 loss.
    assert task.loss(logits.astype(jnp.bfloat16), {"semseg": labels}).dtype == jnp.float32


def test_semseg_check_labels():
    task = make_task("semseg", num_classes=3)
    task.check_labels({"semseg": np.array([[-1, 0, 2]])})
    with pytest.raises(ValueError, match=r"-2, 3, 7"):
        task.check_labels({"semseg": np.array([[-1, 3, 7, -2, 0]])})


def _onehot(ids, c, scale=5.0):
    return scale * jax.nn.one_hot(jnp.asarray(ids), c)


def test_semseg_confusion_and_miou_with_absent_class():
    gt = jnp.array([[[0, 0, 1], [1, -1, 0]]], jnp.int32)
    pred = _onehot([[[0, 1, 1], [1, 2, 0]]], 3)  # class 2 only on the ignored pixel
    task = make_task("semseg", num_classes=3, per_class_iou=True)
    m = _metrics(task, pred, {"semseg": gt})
    np.testing.assert_array_equal(m.matrix, [[2, 1, 0], [0, 2, 0], [0, 0, 0]])
    out = _scalars(m)
    # IoU: class 0 = 2/3, class 1 = 2/3, class 2 absent -> skipped (plain mean would be 4/9).
    assert out["miou"] == pytest.approx(0.6666667, abs=1e-6)
    assert out["pixel_acc"] == pytest.approx(0.8, abs=1e-6)
    assert math.isnan(out["iou/2"])
    # A class present only in the prediction counts with IoU 0: (2/3 + 1 + 0) / 3.
    pred2 = _onehot([[[0, 2, 1], [1, 2, 0]]], 3)
    out2 = _scalars(_metrics(task, pred2, {"semseg": gt}))
    assert out2["miou"] == pytest.approx(0.5555556, abs=1e-6)


# ---------------------------------------------------------------- depth

# (pred, gt) per pixel; (5, 0) is invalid, (-1, 2) has a negative prediction.
DEPTH_PRED = jnp.array([[[[1.1], [3.0], [4.0]], [[5.0], [-1.0], [2.6]]]])
DEPTH_GT = jnp.array([[[[1.0], [2.0], [8.0]], [[0.0], [2.0], [1.4]]]])


def test_depth_l1_and_berhu_both_regimes():
    pred = jnp.array([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    gt = jnp.array([[[[1.5], [0.0]], [[2.0], [8.0]]]])  # residuals -0.5, (invalid), 1, -4
    batch = {"depth": gt}
    assert _loss(make_task("depth"), pred, batch) == pytest.approx(1.8333333, abs=1e-6)
    # c = 0.2 * 4 = 0.8: 0.5 -> 0.5; 1 -> (1 + 0.64) / 1.6 = 1.025; 4 -> (16 + 0.64) / 1.6 = 10.4
    berhu = make_task("depth", loss="berhu")
    assert _loss(berhu, pred, batch) == pytest.approx(3.975, abs=1e-5)
    # Gradient with c held fixed: -1/3, 0, (1/0.8)/3, (-4/0.8)/3.
    grad = jax.jit(jax.grad(berhu.loss))(pred, batch)
    np.testing.assert_allclose(
        grad.reshape(-1), [-0.3333333, 0.0, 0.4166667, -1.6666667], atol=1e-6
    )


def test_depth_l1_per_image_skips_empty_and_padded_images():
    pred = jnp.array([[[[1.0], [3.0]]], [[[2.0], [4.0]]], [[[1.0], [1.0]]], [[[9.0], [9.0]]]])
    gt = jnp.array([[[[1.5], [2.0]]], [[[0.0], [8.0]]], [[[0.0], [0.0]]], [[[1.0], [1.0]]]])
    batch = {"depth": gt, "example_mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
    # Image means 0.75 and 4 (image 3 has no valid pixel, image 4 is padding).
    per_image = make_task("depth", loss="l1_per_image")
    assert _loss(per_image, pred, batch) == pytest.approx(2.375, abs=1e-6)
    assert _loss(make_task("depth"), pred, batch) == pytest.approx(1.8333333, abs=1e-6)


def test_depth_metrics_toy():
    out = _scalars(_metrics(make_task("depth"), DEPTH_PRED, {"depth": DEPTH_GT}))
    # abs 0.1 1 4 3 1.2; rel 0.1 .5 .5 1.5 .857143; sq .01 1 16 9 1.44; ratios 1.1 1.5 2 2e6 1.857
    expected = {
        "abs_err": 1.86,
        "abs_rel": 0.6914286,
        "sq_rel": 1.6077143,  # mean (p-g)^2/g
        "rmse": 2.3430749,
        "rmse_log": 6.5044338,  # p = -1 enters as 1e-6 (RATIO_EPS)
        "delta1": 0.2,
        "delta2": 0.4,
        "delta3": 0.6,
    }
    assert out == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- normals


def _normals_at(degrees):
    th = np.radians(np.asarray(degrees, np.float64))
    return jnp.asarray(np.stack([np.sin(th), 0 * th, np.cos(th)], -1)[None, None], jnp.float32)


def test_normals_loss_and_angles():
    # gt (0,0,1) everywhere except an all-zero (invalid) last pixel; shape [1,1,5,3].
    gt = jnp.array([[[[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]]]], jnp.float32)
    pred = jnp.array([[[[0, 0, 2], [1, 0, 0], [0, 0, -3], [1, 0, 1], [1, 1, 1]]]], jnp.float32)
    task = make_task("normals")
    # 1 - cos: 0, 1, 2, 1 - 1/sqrt2
    assert _loss(task, pred, {"normals": gt}) == pytest.approx(0.8232233, abs=1e-6)
    out = _scalars(_metrics(task, pred, {"normals": gt}))
    assert out["mean_angle"] == pytest.approx(78.75, abs=1e-3)  # (0 + 90 + 180 + 45) / 4
    assert out["within_11.25"] == pytest.approx(25.0)
    assert out["within_30"] == pytest.approx(25.0)
    np.testing.assert_allclose(np.linalg.norm(task.postprocess(pred), axis=-1)[0, 0, :4], 1.0)


def test_normals_orthogonal_identical_and_median():
    task = make_task("normals")
    gt = _normals_at([0.0, 0.0])
    out = _scalars(_metrics(task, _normals_at([0.0, 90.0]), {"normals": gt}))
    assert out["mean_angle"] == pytest.approx(45.0, abs=1e-4)
    same = _scalars(_metrics(task, gt, {"normals": gt}))
    assert same["mean_angle"] == pytest.approx(0.0, abs=1e-3)
    assert same["within_11.25"] == 100.0
    # Median of 0, 10, 30, 60, 90 degrees is 30, recovered within the 0.05-degree bin.
    angles = [0.0, 10.0, 30.0, 60.0, 90.0]
    out = _scalars(_metrics(task, _normals_at(angles), {"normals": _normals_at([0.0] * 5)}))
    assert abs(out["median_angle"] - 30.0) <= 0.05
    assert out["mean_angle"] == pytest.approx(38.0, abs=1e-3)


# ---------------------------------------------------------------- edges


def test_edges_weighted_ce():
    logits = jnp.array([[[[0.0, 0.0], [LN3, 0.0], [LN3, 0.0], [-50.0, 50.0]]]])
    labels = jnp.array([[[1, 0, 1, -1]]], jnp.int32)
    # (0.95 ln2 + 0.05 ln(4/3) + 0.95 ln4) / (0.95 + 0.05 + 0.95)
    loss = _loss(make_task("edges"), logits, {"edges": labels})
    assert loss == pytest.approx(1.0204374, abs=1e-5)


def test_edges_pixel_and_boundary_f1():
    gt = jnp.array([[[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [-1, 0, 0, 0, 1]]], jnp.int32)
    pr = jnp.array([[[0, 0, 1, 0, 1], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]])  # (2,0) is ignored
    logits = _onehot(pr, 2)
    out = _scalars(_metrics(make_task("edges"), logits, {"edges": gt}))
    # Pixel: tp 1, fp 2, fn 2. Boundary t=1: 2 of 3 predictions and 2 of 3 edges matched.
    third, two_thirds = 0.3333333, 0.6666667
    assert out == pytest.approx(
        {"precision": third, "recall": third, "f1": third,
         "bprecision": two_thirds, "brecall": two_thirds, "bf1": two_thirds},
        abs=1e-6,
    )  # fmt: skip
    wide = _scalars(_metrics(make_task("edges", tolerance=2), logits, {"edges": gt}))
    assert wide["bf1"] == pytest.approx(1.0)
    exact = _scalars(_metrics(make_task("edges", tolerance=0), logits, {"edges": gt}))
    assert exact["bf1"] == pytest.approx(exact["f1"])


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_l1_and_psnr():
    image = jnp.full((2, 1, 2, 3), 0.5)
    pred = image.at[0, 0, 0].add(0.1).at[1].set(-7.0)  # example 1 is padding
    batch = {"image": image, "example_mask": jnp.array([1.0, 0.0])}
    task = make_task("reconstruction")
    assert _loss(task, pred, batch) == pytest.approx(0.05, abs=1e-6)
    # MSE = 0.005 -> 10 log10(200)
    assert _scalars(_metrics(task, pred, batch))["psnr"] == pytest.approx(23.0103, abs=1e-3)
    clipped = image.at[0].set(1.0)
    over = clipped.at[0].set(1.5)  # clipped to the image: perfect reconstruction
    assert _scalars(_metrics(task, over, {"image": clipped}))["psnr"] == pytest.approx(100.0)


# ---------------------------------------------------------------- contracts, every task


def _random(seed, b=2, h=4, w=5):
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[:, 0, 0] = 0.0
    batch = {
        "image": rng.uniform(size=(b, h, w, 3)).astype(np.float32),
        "semseg": rng.integers(-1, 3, size=(b, h, w)).astype(np.int32),
        "depth": (rng.uniform(size=(b, h, w, 1)) * (rng.uniform(size=(b, h, w, 1)) > 0.2)),
        "normals": normals,
        "edges": rng.integers(-1, 2, size=(b, h, w)).astype(np.int32),
        "example_mask": np.ones((b,), np.float32),
    }
    batch["depth"] = batch["depth"].astype(np.float32)
    tasks = _tasks()
    preds = {n: rng.normal(size=(b, h, w, t.channels)).astype(np.float32) for n, t in tasks.items()}
    return batch, preds


def _tasks():
    return {n: (make_task(n, num_classes=3) if n == "semseg" else make_task(n)) for n in TASKS}


def _invalid(batch):
    out = dict(batch)
    out.update(semseg=np.full_like(batch["semseg"], -1), depth=np.zeros_like(batch["depth"]))
    out.update(normals=np.zeros_like(batch["normals"]), edges=np.full_like(batch["edges"], -1))
    out["example_mask"] = np.zeros_like(batch["example_mask"])  # for reconstruction
    return out


@pytest.mark.parametrize("name", sorted(TASKS))
def test_all_invalid_gives_zero_loss_finite_grads_and_metrics(name):
    task = _tasks()[name]
    batch, preds = _random(0)
    batch = _invalid(batch)
    if task.label_loss:  # disp learns from video: its loss is the SDE run's (test_sde.py)
        assert _loss(task, preds[name], batch) == 0.0
        grad = _jit_grad(task, jnp.asarray(preds[name]), batch)
        assert np.all(np.isfinite(grad))
    out = _scalars(_metrics(task, preds[name], batch))
    assert all(np.isfinite(v) for v in out.values()), out
    assert all(np.isfinite(v) for v in _scalars(task.empty_metrics()).values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_padded_examples_contribute_nothing(name):
    task = _tasks()[name]
    batch, preds = _random(1, b=3)
    batch["example_mask"] = np.array([1.0, 0.0, 1.0], np.float32)
    keep = [0, 2]
    small = {k: v[keep] for k, v in batch.items()}
    if task.label_loss:
        loss_all = _loss(task, preds[name], batch)
        assert loss_all == pytest.approx(_loss(task, preds[name][keep], small), rel=1e-5)
    full, kept = _metrics(task, preds[name], batch), _metrics(task, preds[name][keep], small)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), full, kept)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_merge_of_two_batches_equals_one_batch_and_jit_equals_eager(name):
    task = _tasks()[name]
    batch, preds = _random(2, b=4)
    halves = [slice(0, 1), slice(1, 4)]
    parts = [_metrics(task, preds[name][s], {k: v[s] for k, v in batch.items()}) for s in halves]
    merged = task.empty_metrics().merge(parts[0]).merge(parts[1])
    whole = task.metrics(preds[name], batch)  # eager
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), merged, whole)
    jitted = _jit_metrics(task, preds[name], batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), jitted, whole)
    eager = {k: float(v) for k, v in whole.compute().items()}
    assert _scalars(jitted) == pytest.approx(eager, rel=1e-5)
    assert set(task.directions) == set(eager)
    if not task.label_loss:
        return
    eager_loss = float(task.loss(preds[name], batch))
    assert _loss(task, preds[name], batch) == pytest.approx(eager_loss, rel=1e-5)
    half = jnp.asarray(preds[name], jnp.bfloat16)
    assert _jit_loss(task, half, batch).dtype == jnp.float32


def test_evaluation_helpers_collect_merge_compute():
    tasks = _tasks()
    batch, preds = _random(3)
    step = jax.jit(lambda p, b: ev.collect_metrics(tasks, p, b))
    acc = ev.merge_metrics(None, step(preds, batch))
    acc = ev.merge_metrics(acc, ev.empty_metrics(tasks))
    flat = ev.compute_metrics(acc)
    directions = ev.directions_for(tasks)
    assert set(flat) == set(directions)
    assert directions["depth/abs_err"] is False and directions["semseg/miou"] is True
    alone = _scalars(_metrics(tasks["semseg"], preds["semseg"], batch))
    assert flat["semseg/miou"] == pytest.approx(alone["miou"])


def test_make_task_errors():
    with pytest.raises(ValueError, match="valid tasks: depth, disp, edges, normals"):
        make_task("segmentation")
    with pytest.raises(TypeError, match="unknown argument.*lossx.*accepts: loss"):
        make_task("depth", lossx="l1")
    with pytest.raises(ValueError, match="depth loss must be one of"):
        make_task("depth", loss="l2")


def test_a_task_owns_its_facts(monkeypatch):
    """Adding a task is its class plus one registry line: the task-set letters, the pictures,
    predict's drawing and the trivial predictor all ask the task, none names it."""
    import dataclasses as dc

    from mtl_jax import predict, tasks
    from mtl_jax.config_utils import task_set
    from mtl_jax.evaluation.pictures import prediction_grid
    from mtl_jax.evaluation.trivial import fit_constants

    @dc.dataclass(frozen=True)
    class Heat(tasks.Task):
        name = "heat"
        letter = "h"
        label_key = "heat_map"

        @property
        def channels(self):
            return 1

        @classmethod
        def prediction_picture(cls, pred, label=None):
            return np.repeat(np.asarray(pred, np.uint8).reshape(*np.shape(pred)[:2], 1), 3, -1)

        def trivial_prediction(self, examples):
            return np.array([np.mean([e["heat_map"].mean() for e in examples])], np.float32)

    monkeypatch.setitem(tasks.TASKS, "heat", Heat)
    assert task_set("sh") == ("semseg", "heat")
    batch = {"image": np.zeros((1, 2, 3, 3), np.float32),
             "heat_map": np.full((1, 2, 3, 1), 7.0, np.float32)}
    grid = prediction_grid(batch, {"heat": np.full((1, 2, 3, 1), 9.0, np.float32)})
    assert {7, 9} <= set(np.unique(grid).tolist())  # its label and its prediction, its way
    np.testing.assert_array_equal(predict.picture("heat", np.full((2, 3), 5.0)),
                                  np.full((2, 3, 3), 5, np.uint8))

    class Source:  # two decoded training examples
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": np.zeros((2, 3, 3), np.uint8),
                    "heat_map": np.full((2, 3, 1), 2.0 + 2 * i, np.float32)}

    np.testing.assert_allclose(fit_constants(Source(), {"heat": Heat()})["heat"], [3.0])
