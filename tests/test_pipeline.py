"""Joint augmentation and the grain -> sharded jax.Array pipeline."""

import jax
import numpy as np
import pytest
from conftest import TINY
from jax.sharding import Mesh
from triplet_geometry import warp_error

from mtl_jax.data import augment, pipeline, registry
from mtl_jax.data import synthetic_render as R
from mtl_jax.data import synthetic_triplets as T


def _example(h=32, w=48, index=0):
    return augment.decode(R.render_example(0, "train", index, h, w))


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def test_decode_contract():
    ex = _example()
    assert ex["image"].dtype == np.float32 and 0 <= ex["image"].min() <= ex["image"].max() <= 1
    assert ex["semseg"].dtype == np.int32 and ex["edges"].dtype == np.int32
    assert ex["example_mask"] == 1.0


def test_flip_twice_is_identity_and_negates_normal_x():
    ex = _example()
    once = augment.hflip(ex)
    np.testing.assert_array_equal(once["semseg"], ex["semseg"][:, ::-1])
    np.testing.assert_array_equal(once["normals"][..., 0], -ex["normals"][:, ::-1, 0])
    twice = augment.hflip(once)
    for k in ex:
        np.testing.assert_array_equal(twice[k], ex[k], err_msg=k)


def test_flip_keeps_camera_geometry_consistent():
    """After a flip, normals still face the camera under the flipped intrinsics."""
    f = augment.hflip(_example())
    fx, fy, cx, cy = f["intrinsics"]
    v, u = np.mgrid[0:32, 0:48]
    ray = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u, float)], -1)
    valid = f["depth"][..., 0] > 0
    assert np.all(np.sum(ray * f["normals"], -1)[valid] < 1e-5)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_scale_crop_divides_constant_depth_by_scale(scale):
    ex = _example()
    ex["depth"] = np.full_like(ex["depth"], 3.0)
    out = augment.scale_crop(ex, scale, top=2, left=3)
    np.testing.assert_allclose(out["depth"], 3.0 / scale, rtol=1e-6)
    assert out["image"].shape == ex["image"].shape and out["semseg"].shape == ex["semseg"].shape
    # Height maps (aerial data) keep their values: scale_depth=False.
    kept = augment.scale_crop(ex, scale, top=2, left=3, scale_depth=False)
    np.testing.assert_array_equal(kept["depth"], 3.0)


def test_scale_crop_keeps_image_and_labels_aligned():
    ex = _example()
    # Paint the image with the class id so that alignment can be read back exactly.
    ex["image"] = np.repeat((ex["semseg"][..., None] + 1) / 16.0, 3, -1).astype(np.float32)
    out = augment.scale_crop(ex, 1.5, top=5, left=7)
    s = out["semseg"]
    # Where a pixel's 3x3 neighbourhood has one class, bilinear image == nearest label.
    pad = np.pad(s, 1, mode="edge")
    const = np.ones_like(s, bool)
    for dy in range(3):
        for dx in range(3):
            const &= pad[dy:dy + s.shape[0], dx:dx + s.shape[1]] == s
    np.testing.assert_allclose(out["image"][..., 0][const] * 16 - 1, s[const], atol=1e-4)
    assert const.mean() > 0.5
    # Normals stay unit where valid, zero where depth is invalid.
    valid = out["depth"][..., 0] > 0
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1)[valid], 1.0, atol=1e-5)
    assert np.all(out["normals"][~valid] == 0)


def test_scale_crop_matches_direct_nearest_indexing():
    ex = _example()
    out = augment.scale_crop(ex, 1.5, top=4, left=6)
    # 32/1.5 = 21.33 -> 21 rows, 48/1.5 = 32 cols; destination pixel i reads floor((i+.5)*21/32).
    iy = np.floor((np.arange(32) + 0.5) * 21 / 32).astype(int) + 4
    ix = np.floor((np.arange(48) + 0.5) * 32 / 48).astype(int) + 6
    np.testing.assert_array_equal(out["semseg"], ex["semseg"][iy][:, ix])


def test_joint_augment_is_deterministic_per_rng():
    aug = augment.JointAugment()
    ex = _example()
    a = aug(ex, np.random.default_rng(3))
    b = aug(ex, np.random.default_rng(3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _triplet(index=3, h=48, w=64):
    return augment.decode(T.render_triplet(0, "train", index, h, w))


def _assert_warps_consistently(ex, min_inside=0.6):
    """The neighbours warped with the example's depth, intrinsics and poses reproduce its
    centre frame: median per-pixel error below one grey level (0.0012-0.0016 unaugmented, see
    test_synthetic_triplets); the mean (occlusions and edges, a larger share of a small crop)
    below 0.03."""
    for which in ("prev", "next"):
        err, inside = warp_error(ex, which)
        assert inside > min_inside, which
        assert np.median(err) < 1 / 255 and err.mean() < 0.03, (which, np.median(err))


def test_decode_triplet():
    ex = _triplet()
    for key in ("image", "image_prev", "image_next"):
        assert ex[key].dtype == np.float32 and 0 <= ex[key].min() <= ex[key].max() <= 1
    raw = T.render_triplet(0, "train", 3, 48, 64)
    np.testing.assert_array_equal(ex["image_next"], raw["image_next"] / np.float32(255))
    for key in ("pose_prev", "pose_next", "intrinsics", "depth"):
        assert ex[key].dtype == np.float32
    _assert_warps_consistently(ex)


def test_crop_and_flip_keep_the_triplet_geometry():
    ex = _triplet()
    fx, fy, cx, cy = ex["intrinsics"]
    cropped = augment.crop(ex, 5, 9, 32, 40)
    for key in ("image", "image_prev", "image_next", "depth", "semseg", "normals"):
        np.testing.assert_array_equal(cropped[key], ex[key][5:37, 9:49], err_msg=key)
    np.testing.assert_allclose(cropped["intrinsics"], [fx, fy, cx - 9, cy - 5], rtol=1e-6)
    np.testing.assert_array_equal(cropped["pose_next"], ex["pose_next"])
    _assert_warps_consistently(cropped)
    out = augment.hflip(cropped)
    np.testing.assert_allclose(out["intrinsics"], [fx, fy, 39 - (cx - 9), cy - 5], rtol=1e-6)
    mirror = np.diag([-1.0, 1, 1, 1])
    np.testing.assert_allclose(out["pose_prev"], mirror @ ex["pose_prev"] @ mirror, atol=1e-7)
    _assert_warps_consistently(out)
    # The flipped frames with the unflipped pose do not line up (the flip of the pose matters).
    err, _ = warp_error(out, "next")
    wrong, _ = warp_error(out, "next", pose=cropped["pose_next"])
    assert np.median(wrong) > 2 * np.median(err)
    twice = augment.hflip(out)
    for key in cropped:
        np.testing.assert_allclose(twice[key], cropped[key], atol=1e-7, err_msg=key)


def test_scale_crop_keeps_the_triplet_geometry():
    ex = _triplet()
    out = augment.scale_crop(ex, 1.25, top=4, left=6)
    # depth / 1.25 shrinks the scene: the translations shrink with it, rotations stay
    np.testing.assert_allclose(out["pose_next"][:3, 3], ex["pose_next"][:3, 3] / 1.25,
                               rtol=1e-6)
    np.testing.assert_array_equal(out["pose_next"][:3, :3], ex["pose_next"][:3, :3])
    for which in ("prev", "next"):  # bilinear resizing blurs: a looser bound than a crop's
        err, _ = warp_error(out, which)
        assert np.median(err) < 2 / 255 and err.mean() < 0.03, which
        wrong, _ = warp_error(out, which, pose=ex[f"pose_{which}"])  # unscaled translation
        assert np.median(wrong) > 1.5 * np.median(err)
    kept = augment.scale_crop(ex, 1.25, top=4, left=6, scale_depth=False)
    np.testing.assert_array_equal(kept["pose_next"], ex["pose_next"])
    np.testing.assert_array_equal(kept["depth"], ex["depth"][4:42, 6:57][
        np.floor((np.arange(48) + 0.5) * 38 / 48).astype(int)][
        :, np.floor((np.arange(64) + 0.5) * 51 / 64).astype(int)])


def test_joint_augment_fixed_size_crop_and_flip_keep_the_triplet_geometry():
    """DenseMTL's self-supervised depth setting: random fixed-size crop, flip p=0.5, no
    scaling (config.augment = dict(scales=(1.0,), crop_size=(H, W), flip=True))."""
    ex = _triplet(index=3)
    sideways = ex["pose_next"][0, 3]
    assert abs(sideways) > 0.01  # so that a flip shows in the pose
    aug = augment.JointAugment(scales=(1.0,), crop_size=(32, 40), flip=True)
    flipped, offsets = 0, set()
    for seed in range(8):
        out = aug(ex, np.random.default_rng(seed))
        assert out["image_prev"].shape == (32, 40, 3) and out["semseg"].shape == (32, 40)
        assert out["intrinsics"][0] == ex["intrinsics"][0]  # no scaling
        is_flipped = np.sign(out["pose_next"][0, 3]) != np.sign(sideways)
        flipped += bool(is_flipped)
        cx = out["intrinsics"][2]
        offsets.add(round(float(ex["intrinsics"][2] - (39 - cx if is_flipped else cx)), 3))
        _assert_warps_consistently(out)
    assert 0 < flipped < 8 and len(offsets) > 2  # both flips, several crop positions
    with pytest.raises(augment.CropTooLargeError, match=r"crop_size 64x40 .* 48x64"):
        augment.JointAugment(scales=(1.0,), crop_size=(64, 40))(ex, np.random.default_rng(0))


def test_eval_visits_every_example_exactly_once(data_dir):
    src = registry.open_split("synthetic", "val", data_dir=data_dir, **TINY)
    seen = []
    for b in pipeline.eval_batches(src, global_batch_size=4, mesh=_mesh(4)):
        m = np.asarray(b["example_mask"]) > 0
        seen += np.asarray(b["index"])[m].tolist()
        assert b["image"].shape[0] == 4
    assert sorted(seen) == list(range(TINY["num_val"]))
    # 10 examples over 2 simulated processes: equal batch counts, full coverage.
    parts = [list(pipeline.host_eval_batches(src, local_batch_size=2, process_index=p,
                                             process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    idx = [i for part in parts for b in part for i, m in zip(b["index"], b["example_mask"]) if m]
    assert sorted(idx) == list(range(TINY["num_val"]))


def test_train_batches_same_on_1_and_4_devices(data_dir):
    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    aug = augment.JointAugment()
    it1 = pipeline.train_iterator(src, global_batch_size=8, mesh=_mesh(1), seed=3, augment=aug)
    it4 = pipeline.train_iterator(src, global_batch_size=8, mesh=_mesh(4), seed=3, augment=aug)
    for _ in range(4):  # spans an epoch boundary (24 examples / 8)
        b1, b4 = next(it1), next(it4)
        assert len(b4["image"].sharding.device_set) == 4
        assert b4["image"].addressable_shards[0].data.shape[0] == 2
        for k in b1:
            np.testing.assert_array_equal(np.asarray(b1[k]), np.asarray(b4[k]), err_msg=k)
    it1.close(), it4.close()


def test_train_epochs_cover_data_and_reshuffle(data_dir):
    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    it = pipeline.train_iterator(src, global_batch_size=8, mesh=_mesh(1), seed=0)
    epochs = [[i for _ in range(3) for i in np.asarray(next(it)["index"]).tolist()]
              for _ in range(2)]
    it.close()
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(24))


def test_restored_iterator_continues_identically(data_dir):
    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    aug = augment.JointAugment()
    make = lambda: pipeline.train_iterator(src, global_batch_size=4, mesh=_mesh(2), seed=5,
                                           augment=aug, prefetch=3)
    it = make()
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]  # crosses an epoch boundary
    it.close()
    fresh = make()
    fresh.set_state(state)
    for e in expected:
        got = next(fresh)
        for k in e:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(e[k]), err_msg=k)
    fresh.close()


def test_batch_size_must_divide_devices(data_dir):
    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_iterator(src, global_batch_size=6, mesh=_mesh(4), seed=0)


def test_no_tensorflow_imported(data_dir):
    import sys

    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    it = pipeline.train_iterator(src, global_batch_size=4, mesh=_mesh(1), seed=0)
    next(it)
    it.close()
    assert "tensorflow" not in sys.modules
