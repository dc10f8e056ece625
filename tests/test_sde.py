"""Self-supervised depth from video (DenseMTL's SDE setting): the disp task's evaluation, the
SDE run's step and config, geometry on procedural triplets."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.tasks import VideoDepth, make_task
from mtl_jax.tasks.video_depth import disp_to_depth, lower_median


def _batch(gt_BxHxW):
    return {"depth": jnp.asarray(gt_BxHxW, jnp.float32)[..., None]}


def _disp_of(depth, task):
    """The sigmoid disparity whose depth is ``depth`` (the inverse of disp_to_depth)."""
    lo, hi = 1.0 / task.max_depth, 1.0 / task.min_depth
    return (1.0 / np.asarray(depth, np.float64) - lo) / (hi - lo)


def test_disp_to_depth_spans_the_range():
    d = disp_to_depth(jnp.array([0.0, 1.0, 0.5]), 0.1, 100.0)
    np.testing.assert_allclose(d, [100.0, 0.1, 1.0 / (0.01 + 9.99 * 0.5)], rtol=1e-6)


def test_lower_median_is_torchs_median():
    x = jnp.array([[4.0, 1.0, 3.0, 2.0, 100.0], [5.0, 6.0, 7.0, 8.0, 9.0]])
    m = jnp.array([[True, True, True, True, False], [False] * 5])
    # torch.tensor([4., 1., 3., 2.]).median() == 2 (the lower middle value); no value -> 1
    np.testing.assert_array_equal(lower_median(x, m), [2.0, 1.0])


def test_median_scaling_makes_a_scaled_prediction_exact():
    task = make_task("disp")
    rng = np.random.default_rng(0)
    gt = rng.uniform(2.0, 60.0, (2, 6, 8))
    gt[0, 0, :3] = 0.0  # invalid
    gt[1, 1, 1] = 95.0  # outside the 1e-3..80 evaluation range
    pred = _disp_of(gt.clip(1.0) * 0.3, task)  # the right shape, a third of the scale
    out = task.metrics(jnp.asarray(pred, jnp.float32)[..., None], _batch(gt)).compute()
    assert float(out["abs_rel"]) < 1e-5 and float(out["delta1"]) == 1.0
    n_valid = int(np.sum((gt > 1e-3) & (gt < 80)))
    assert int(task.metrics(jnp.asarray(pred, jnp.float32)[..., None], _batch(gt)).count) \
        == n_valid


def test_median_scaling_by_hand():
    task = make_task("disp")
    gt = np.array([[[1.0, 2.0], [4.0, 8.0]]])
    depth = np.array([[[1.0, 1.0], [1.0, 2.0]]])  # medians: gt 2 (lower), pred 1 -> scale 2
    out = task.metrics(jnp.asarray(_disp_of(depth, task), jnp.float32)[..., None],
                       _batch(gt)).compute()
    scaled = depth * 2.0
    want = np.mean(np.abs(scaled - gt) / gt)
    np.testing.assert_allclose(float(out["abs_rel"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(out["rmse"]), np.sqrt(np.mean((scaled - gt) ** 2)),
                               rtol=1e-5)


def test_side_outputs_are_upsampled_to_the_label_size():
    task = make_task("disp")
    gt = np.full((1, 8, 8), 10.0)
    small = jnp.full((1, 4, 4, 1), 0.3)
    stats = task.metrics(small, _batch(gt))
    assert int(stats.count) == 64 and float(stats.compute()["abs_rel"]) < 1e-6


def test_trivial_prediction_is_the_per_image_median():
    task = make_task("disp")
    gt = np.array([[[1.0, 2.0], [3.0, 10.0]]])
    const = jnp.broadcast_to(jnp.asarray(task.trivial_prediction([]))[None, None, None],
                             (1, 2, 2, 1))
    out = task.metrics(const, _batch(gt)).compute()
    np.testing.assert_allclose(float(out["abs_rel"]),
                               np.mean(np.abs(2.0 - gt) / gt), rtol=1e-5)


def test_the_disp_task_refuses_a_supervised_loss():
    with pytest.raises(UserError, match="learns depth from video"):
        VideoDepth().loss(jnp.zeros((1, 2, 2, 1)), _batch(np.ones((1, 2, 2))))
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        VideoDepth(min_depth=5.0, max_depth=1.0)


# ------------------------------------------------------------- geometry on procedural triplets
def _triplet(seed=3, h=48, w=64):
    from mtl_jax.data.synthetic_triplets import render_triplet

    ex = render_triplet(seed, "train", 0, h, w)
    f32 = {k: jnp.asarray(np.asarray(ex[k], np.float32) / (255.0 if k.startswith("image")
                                                            else 1.0))[None]
           for k in ("image", "image_prev", "image_next", "depth", "intrinsics", "pose_prev",
                     "pose_next")}
    f32["depth"] = f32["depth"].reshape(1, h, w)
    return f32


def test_true_depth_and_pose_warp_a_procedural_frame_onto_the_centre():
    """The library's warp (the training path) with the renderer's depth and poses: the
    photometric error (0.85 SSIM + 0.15 L1, images in [0, 1]) is near zero where the centre
    pixel is visible in the neighbour: median 0.0009 (t-1) / 0.0009 (t+1) over the visible
    pixels, 100 % / 77 % of them, means 0.029 / 0.040 (occlusion edges); with the camera 30 cm
    off sideways 0.20 / 0.23, unwarped 0.019 / 0.023."""
    from mtl_jax.sde.geometry import backproject, intrinsics_matrices, project, warp
    from mtl_jax.sde.photometric import reprojection_loss

    ex = _triplet()
    K, inv_K = intrinsics_matrices(ex["intrinsics"])
    h, w = ex["depth"].shape[1:]
    for which in ("prev", "next"):
        pose = ex[f"pose_{which}"]
        grid = project(backproject(ex["depth"], inv_K), K, pose, h, w)
        visible = np.asarray(jnp.all(jnp.abs(grid) <= 1.0, axis=-1))[0]
        assert visible.mean() > 0.7
        right = np.asarray(reprojection_loss(warp(ex[f"image_{which}"], ex["depth"], K, inv_K,
                                                  pose), ex["image"]))[0]
        wrong_pose = pose.at[:, 0, 3].add(0.3)  # 30 cm sideways
        wrong = np.asarray(reprojection_loss(warp(ex[f"image_{which}"], ex["depth"], K, inv_K,
                                                  wrong_pose), ex["image"]))[0]
        unwarped = np.asarray(reprojection_loss(ex[f"image_{which}"], ex["image"]))[0]
        assert np.median(right[visible]) < 0.003, np.median(right[visible])
        assert np.median(wrong[visible]) > 50 * np.median(right[visible])
        assert np.median(unwarped[visible]) > 10 * np.median(right[visible])


def test_monodepth_loss_prefers_the_true_depth_and_pose_on_procedural_frames():
    from mtl_jax.sde.photometric import MonodepthOptions, monodepth_loss

    ex = _triplet()
    opts = MonodepthOptions(scales=(0,))
    task = make_task("disp")
    true_disp = jnp.asarray(_disp_of(np.asarray(ex["depth"]), task), jnp.float32)[..., None]
    poses = {-1: ex["pose_prev"], 1: ex["pose_next"]}
    nbs = {-1: ex["image_prev"], 1: ex["image_next"]}
    key = jax.random.key(0)

    def loss(disp, poses):
        return float(monodepth_loss({0: disp}, ex["image"], nbs, ex["intrinsics"], poses, key,
                                    opts)[0])

    best = loss(true_disp, poses)
    assert best < 0.5 * loss(jnp.full_like(true_disp, 0.5), poses)  # a flat world
    identity = jnp.eye(4)[None]
    assert best < 0.8 * loss(true_disp, {-1: identity, 1: identity})  # a static camera


# ------------------------------------------------------------------------ the SDE run's step
@pytest.fixture(scope="module")
def sde_exp_and_batch(sde_data_dir):
    from conftest import REPO

    from mtl_jax.config_utils import load_config
    from mtl_jax.data import pipeline
    from mtl_jax.experiment import open_data
    from mtl_jax.sde.run import build_sde_experiment

    config = load_config(f"{REPO}/configs/densemtl_sde.py", "smoke")
    config.num_devices = 1
    config.dataset.data_dir = sde_data_dir
    sexp = build_sde_experiment(config)
    train_source, _ = open_data(config)
    it = pipeline.train_iterator(train_source, global_batch_size=int(config.batch_size),
                                 mesh=sexp.exp.mesh, seed=0, augment=sexp.exp.augment,
                                 prefetch=1)
    batch = next(it)
    it.close()
    return config, sexp, batch


def test_the_sde_step_trains_both_networks_without_reading_depth(sde_exp_and_batch):
    """One step moves the model and the pose network; a batch whose depth labels and true
    poses are NaN gives bit-identical networks and losses (the SDE loss never reads them)."""
    _, sexp, batch = sde_exp_and_batch
    assert {"image_prev", "image_next", "intrinsics", "depth", "pose_prev"} <= set(batch)
    init = jax.device_get(sexp.init_state())
    s1, m1 = sexp.train_step(sexp.init_state(), batch)
    poisoned = dict(batch, **{k: jax.device_put(jnp.full_like(batch[k], jnp.nan),
                                                batch[k].sharding)
                              for k in ("depth", "pose_prev", "pose_next")})
    s2, m2 = sexp.train_step(sexp.init_state(), poisoned)
    s1, s2, m1, m2 = jax.device_get((s1, s2, m1, m2))
    for part in ("params", "batch_stats", "pose_params", "pose_stats", "opt_state",
                 "pose_opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(s1, part)), jax.tree.leaves(getattr(s2, part)),
                        strict=True):
            np.testing.assert_array_equal(a, b, err_msg=part)
    assert m1["loss/disp"] == m2["loss/disp"] and np.isfinite(m1["loss/disp"])
    assert not m1["nonfinite"] and int(s1.step) == 1
    for part in ("params", "pose_params"):
        before = flax.traverse_util.flatten_dict(getattr(init, part), sep="/")
        after = flax.traverse_util.flatten_dict(getattr(s1, part), sep="/")
        still = [k for k in before if np.array_equal(before[k], after[k])]
        # Every leaf of both networks got a gradient, but the xTAMs' key/query/value convs:
        # their correlation branch is scaled by alpha, which starts at 0 (as the reference's).
        assert all(("/key/" in k or "/query/" in k or "/value/" in k) for k in still), still
    assert set(m1) >= {f"loss/disp/scale_{s}" for s in range(4)} | {
        "sde/automask_fraction", "sde/pose/-1/translation", "grad_norm/pose_net"}
    np.testing.assert_allclose(m1["loss/disp"], np.mean(
        [m1[f"loss/disp/scale_{s}"] for s in range(4)]), rtol=1e-6)
    assert 0.0 < m1["sde/automask_fraction"] <= 1.0


def test_sde_config_errors_are_one_line(sde_exp_and_batch):
    from mtl_jax.sde.run import build_sde_experiment, sde_options

    config, _, _ = sde_exp_and_batch
    bad = config.copy_and_resolve_references()
    bad.sde.unknown_key = 1
    with pytest.raises(UserError, match=r"config.sde has unknown keys \['unknown_key'\]"):
        sde_options(bad)
    bad = config.copy_and_resolve_references()
    bad.sde.frame_ids = (0, 2)
    with pytest.raises(UserError, match="frame_ids"):
        sde_options(bad)
    bad = config.copy_and_resolve_references()
    del bad.tasks["disp"]
    bad.task_order = ["semseg"]
    with pytest.raises(UserError, match="needs the self-supervised depth task 'disp'"):
        build_sde_experiment(bad)
