"""Frame triplets of the procedural dataset (``synthetic``, config ``triplets``): fields, camera
path, and the geometry the self-supervised depth loss relies on: warping a neighbour frame
with the true depth and pose reproduces the centre frame."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from triplet_geometry import warp, warp_error

from mtl_jax.data import registry, synthetic
from mtl_jax.data import synthetic_triplets as T
from mtl_jax.main import main

H, W = 48, 64


@pytest.fixture(scope="module")
def triplets():
    return [T.render_triplet(0, "train", i, H, W) for i in range(6)]


def _rotation_deg(pose):
    r = np.asarray(pose, np.float64)[:3, :3]
    return np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))


def test_fields_shapes_dtypes(triplets):
    for ex in triplets:
        assert set(ex) == {"image", "image_prev", "image_next", "intrinsics", "pose_prev",
                           "pose_next", "semseg", "depth", "normals", "edges", "light"}
        for key in ("image", "image_prev", "image_next"):
            assert ex[key].shape == (H, W, 3) and ex[key].dtype == np.uint8
            assert ex[key].std() > 5
        assert ex["intrinsics"].shape == (4,) and ex["intrinsics"].dtype == np.float32
        assert ex["semseg"].shape == (H, W) and ex["semseg"].dtype == np.int8
        assert ex["depth"].shape == (H, W, 1) and ex["depth"].dtype == np.float32
        assert np.all(ex["depth"] > 0.3) and np.all(ex["depth"] < 12.0)  # valid everywhere
        for key in ("pose_prev", "pose_next"):
            pose = ex[key].astype(np.float64)
            assert ex[key].shape == (4, 4) and ex[key].dtype == np.float32
            np.testing.assert_allclose(pose[3], [0, 0, 0, 1])
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)
            assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0, abs=1e-6)
            # 0.15-0.30 m forward, <= 0.08 m sideways, <= 1.5 degrees of yaw per frame
            assert 0.14 < np.linalg.norm(pose[:3, 3]) < 0.33
            assert _rotation_deg(pose) <= 1.5 + 1e-3
        # moving forward: the next camera is closer to the scene (points' z decreases)
        assert ex["pose_next"][2, 3] < -0.1 and ex["pose_prev"][2, 3] > 0.1


def test_deterministic_and_index_dependent():
    a = T.render_triplet(3, "val", 2, H, W)
    b = T.render_triplet(3, "val", 2, H, W)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert not np.array_equal(a["depth"], T.render_triplet(3, "val", 3, H, W)["depth"])
    assert not np.array_equal(a["depth"], T.render_triplet(3, "train", 2, H, W)["depth"])
    with pytest.raises(ValueError, match="split"):
        T.render_triplet(0, "test")


def test_true_depth_and_pose_warp_the_neighbours_onto_the_centre(triplets):
    """Measured at 48x64 over these 6 triplets (images in [0, 1]): the per-pixel error of the
    true warp has a median of 0.0012-0.0016 (a third of a grey level: quantisation) and a mean
    of 0.007-0.016 (occlusions, texture and object edges: one ray per pixel); with the other
    neighbour's pose the median is 0.008-0.034, without any warp 0.004-0.013."""
    for ex in triplets:
        ex = {k: (v.astype(np.float64) / 255 if k.startswith("image") else v)
              for k, v in ex.items()}
        for which, other in (("prev", "next"), ("next", "prev")):
            err, inside = warp_error(ex, which)
            assert np.median(err) < 1 / 255 and err.mean() < 0.02, (which, err.mean())
            assert inside > (0.95 if which == "prev" else 0.7)  # most of the frame stays in
            # the other neighbour's pose is wrong here (the camera moves the other way)
            wrong, _ = warp_error(ex, which, pose=ex[f"pose_{other}"])
            assert np.median(wrong) > 4 * np.median(err) and wrong.mean() > 3 * err.mean()
            still = np.abs(ex[f"image_{which}"] - ex["image"]).mean(-1)
            assert np.median(still) > 2 * np.median(err)  # the frames differ: the camera moved


def test_motion_has_parallax(triplets):
    """The motion field is not a homography: near surfaces move more than the rotation alone
    would move them (flow minus the flow of the same pixel at infinite depth)."""
    for ex in triplets:
        _, _, flow = warp(ex["image_next"], ex["depth"], ex["intrinsics"], ex["pose_next"])
        far = np.full_like(ex["depth"], 1e6)
        _, _, rot_flow = warp(ex["image_next"], far, ex["intrinsics"], ex["pose_next"])
        parallax = np.linalg.norm(flow - rot_flow, axis=-1)
        z = ex["depth"][..., 0]
        near, distant = z < np.quantile(z, 0.2), z > np.quantile(z, 0.8)
        assert np.median(parallax) > 0.5 and parallax.max() > 3.0
        assert np.median(parallax[near]) > 1.5 * np.median(parallax[distant])


def test_centre_labels_match_the_single_frame_conventions(triplets):
    for ex in triplets:
        np.testing.assert_allclose(np.linalg.norm(ex["normals"], axis=-1), 1.0, atol=1e-5)
        fx, fy, cx, cy = ex["intrinsics"]
        v, u = np.mgrid[0:H, 0:W]
        ray = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u, float)], -1)
        assert np.all(np.sum(ray * ex["normals"], -1) < 1e-6)  # facing the camera
        assert set(np.unique(ex["edges"])) <= {0, 1}


def test_builder_config_and_records(tmp_path):
    tfds.disable_progress_bar()
    opts = dict(height=24, width=32, num_train=3, num_val=2)
    assert synthetic.make_config("triplets").name == "triplets"
    assert synthetic.config_name("triplets", **opts) == "triplets_24x32_n3-2_s0"
    data_dir = str(tmp_path)
    # the command line takes the triplets as a synthetic "domain"
    assert main(["data", "build", "synthetic", "--domain=triplets", f"--data_dir={data_dir}",
                 *(f"--{k}={v}" for k, v in opts.items())]) == 0
    src = registry.open_split("synthetic", "train", "triplets", data_dir, **opts)
    assert len(src) == 3
    for i in range(3):
        rec, ref = src[i], T.render_triplet(0, "train", i, 24, 32)
        assert int(rec["index"]) == i
        for key in ("image", "image_prev", "image_next", "pose_prev", "pose_next",
                    "intrinsics", "semseg", "depth", "edges"):
            np.testing.assert_array_equal(rec[key], ref[key], err_msg=key)
        np.testing.assert_allclose(rec["normals"], ref["normals"], atol=1e-3)
    val = registry.open_split("synthetic", "val", "triplets", data_dir, **opts)
    assert len(val) == 2 and not np.array_equal(val[0]["image"], src[0]["image"])
    # the single-frame domains keep their fields
    features = registry.get_builder("synthetic", "source", data_dir, **opts).info.features
    assert "image_prev" not in features and "pose_next" not in features
