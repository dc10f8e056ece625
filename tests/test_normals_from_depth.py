"""Surface normals from z-depth and intrinsics (mtl_jax.data.geometry): ours, DenseMTL's
reference convention next to them, and the pipeline option ``config.dataset.normals_from_depth``."""

import jax
import ml_collections
import numpy as np
import pytest
from conftest import TINY
from jax.sharding import Mesh

from mtl_jax.data import augment, pipeline, registry
from mtl_jax.data.geometry import (
    DENSEMTL_BASES,
    backproject,
    densemtl_normals_from_depth,
    normals_from_depth,
    scale_intrinsics,
)
from mtl_jax.experiment import dataset_normals_from_depth

H, W = 24, 32
K = np.array([30.0, 36.0, 14.2, 12.7])  # fx != fy, off-centre principal point


def _rays(k, h=H, w=W):
    fx, fy, cx, cy = np.asarray(k, np.float64)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones((h, w))], -1)


def _plane_depth(n, rho, k=K, h=H, w=W):
    """z-depth of the plane {X : n·X = -rho} (unit n facing the camera) through camera k."""
    n_dot_r = _rays(k, h, w) @ np.asarray(n, np.float64)
    assert np.all(n_dot_r < 0), "plane not in front of the camera"
    return (-rho / n_dot_r).astype(np.float32)


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _angle_deg(a, b):
    cos = np.clip(np.sum(np.asarray(a, np.float64) * b, -1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def _valid(n):
    return np.any(n != 0, axis=-1)


def test_fronto_parallel_plane_faces_the_camera():
    out = normals_from_depth(np.full((H, W, 1), 2.0, np.float32), K)
    assert out.dtype == np.float32 and out.shape == (H, W, 3)
    np.testing.assert_allclose(out, np.broadcast_to([0.0, 0.0, -1.0], (H, W, 3)), atol=1e-7)


@pytest.mark.parametrize("normal", [
    [0.0, np.sin(np.radians(35)), -np.cos(np.radians(35))],    # tilted about x: floor-like
    [0.0, -np.sin(np.radians(25)), -np.cos(np.radians(25))],   # tilted about x, other way
    [np.sin(np.radians(40)), 0.0, -np.cos(np.radians(40))],    # tilted about y: wall-like
    [-np.sin(np.radians(30)), 0.0, -np.cos(np.radians(30))],
    [0.3, -0.4, -0.8],                                          # oblique
])
def test_tilted_planes_give_their_analytic_normal(normal):
    n = _unit(normal)
    depth = _plane_depth(n, rho=2.0)
    out = normals_from_depth(depth, K)
    assert _valid(out).all()  # one-sided differences at the borders are exact on planes
    assert _angle_deg(out, n).max() < 0.1
    points = _rays(K) * depth[..., None]
    assert np.all(np.sum(out * points, -1) < 0)


def test_invalid_pixels_are_zero_and_only_make_neighbours_one_sided():
    n = _unit([0.2, 0.5, -0.8])
    depth = _plane_depth(n, rho=1.5)
    depth[5, 7] = 0.0                   # isolated hole
    depth[10, 12] = np.nan              # non-finite counts as invalid
    depth[15, 19] = depth[15, 21] = -1  # (15, 20) has no usable neighbour along u
    depth[:, 30] = 0.0                  # column 29 keeps its left neighbour only, and the
    out = normals_from_depth(depth, K)  # border column 31 has no neighbour along u
    expected_invalid = ~(np.isfinite(depth) & (depth > 0))
    expected_invalid[15, 20] = True
    expected_invalid[:, 31] = True
    np.testing.assert_array_equal(~_valid(out), expected_invalid)
    assert np.all(out[expected_invalid] == 0) and not np.any(np.signbit(out[expected_invalid]))
    assert _angle_deg(out[~expected_invalid], n).max() < 0.1
    # The 4-neighbours of the holes are still valid (one-sided differences).
    for r, c in [(4, 7), (6, 7), (5, 6), (5, 8), (9, 12), (11, 12), (10, 11), (10, 13)]:
        assert _valid(out)[r, c]


def test_depth_discontinuity_is_marked_invalid_on_both_sides():
    depth = np.full((H, W), 2.0, np.float32)
    depth[:, W // 2:] = 3.0  # relative jump 0.5 > 0.1
    out = normals_from_depth(depth, K)
    invalid = ~_valid(out)
    expected = np.zeros((H, W), bool)
    expected[:, W // 2 - 1:W // 2 + 1] = True
    np.testing.assert_array_equal(invalid, expected)
    np.testing.assert_allclose(out[~expected], np.broadcast_to([0, 0, -1.0], (H * W - 2 * H, 3)),
                               atol=1e-7)
    # Below the threshold the step is taken as a (steep) surface; the test can be disabled.
    assert _valid(normals_from_depth(depth, K, max_rel_jump=0.6)).all()
    assert _valid(normals_from_depth(depth, K, max_rel_jump=np.inf)).all()


def test_steep_plane_is_not_a_discontinuity():
    n = _unit([0.0, np.sin(np.radians(60)), -np.cos(np.radians(60))])
    depth = _plane_depth(n, rho=1.0)
    z = depth.astype(np.float64)
    assert 0.09 < np.abs(np.diff(z, axis=0) / np.minimum(z[1:], z[:-1])).max() < 0.1
    out = normals_from_depth(depth, K)
    assert _valid(out).all() and _angle_deg(out, n).max() < 0.1


def test_scale_intrinsics_half_pixel_convention():
    np.testing.assert_allclose(scale_intrinsics([40.0, 40.0, 23.5, 15.5], (32, 48), (64, 96)),
                               [80.0, 80.0, 47.5, 31.5])  # centred stays centred
    k2 = scale_intrinsics(K, (H, W), (2 * H, 2 * W))
    np.testing.assert_allclose(k2, [60.0, 72.0, 28.9, 25.9], rtol=1e-6)
    # A low-res pixel centre sits halfway between high-res pixels 2i and 2i+1: same ray.
    lo, hi = _rays(K), _rays(k2, 2 * H, 2 * W)
    mid = 0.25 * (hi[0::2, 0::2] + hi[1::2, 0::2] + hi[0::2, 1::2] + hi[1::2, 1::2])
    np.testing.assert_allclose(mid, lo, atol=1e-6)
    with pytest.raises(ValueError, match="fx, fy, cx, cy"):
        scale_intrinsics(np.eye(3), (H, W), (H, W))


def test_plane_at_twice_the_resolution_gives_the_same_normals():
    n = _unit([0.35, -0.3, -0.85])
    lo = normals_from_depth(_plane_depth(n, 2.0), K)
    k2 = scale_intrinsics(K, (H, W), (2 * H, 2 * W))
    depth_hi = _plane_depth(n, 2.0, k2, 2 * H, 2 * W)
    hi = normals_from_depth(depth_hi, k2)
    assert _angle_deg(hi, n).max() < 0.1 and _angle_deg(lo, n).max() < 0.1
    # The unscaled intrinsics describe another camera: a visibly wrong normal.
    assert _angle_deg(normals_from_depth(depth_hi, K), n).min() > 1.0


# ------------------------------------------------------ DenseMTL's convention, next to ours
def _unmirror(n):
    """The reference's n_z = |n_z| undone: camera-facing normals (n_z < 0), as ours."""
    return np.asarray(n, np.float64) * np.array([1.0, 1.0, -1.0])


@pytest.mark.parametrize("normal", [[0.0, 0.0, -1.0], [0.3, -0.4, -0.8]])
def test_both_methods_give_the_plane_normal(normal):
    n = _unit(normal)
    depth = _plane_depth(n, rho=2.0)
    ours = normals_from_depth(depth, K)
    ref, mask = densemtl_normals_from_depth(depth, K)
    assert ref.dtype == np.float32 and ref.shape == (H, W, 3) and mask.dtype == bool
    # The reference keeps the interior only: border removed, then a 3x3 erosion.
    expected = np.zeros((H, W), bool)
    expected[2:-2, 2:-2] = True
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == (H - 4) * (W - 4) == 560 and _valid(ours).sum() == H * W
    assert np.all(ref[..., 2][mask] > 0)  # its sign convention: |n_z|
    assert _angle_deg(_unmirror(ref[mask]), n).max() < 0.1
    assert _angle_deg(ours, n).max() < 0.1
    assert np.all(ref[~mask] == 0)


def test_densemtl_mask_counted_by_hand():
    h, w = 8, 10
    k = np.array([8.0, 8.0, 4.5, 3.5])
    depth = np.full((h, w), 2.0)
    depth[0, 0] = 0.0   # on the removed border: its 3x3 window is already out, costs nothing
    depth[1, 3] = 0.0   # in the eroded ring: removes (2, 2..4) from the interior
    depth[4, 5] = 0.0   # inside: removes its whole 3x3 window, rows 3..5 x cols 4..6
    _, mask = densemtl_normals_from_depth(depth, k)
    expected = np.zeros((h, w), bool)
    expected[2:6, 2:8] = True  # (8 - 4) x (10 - 4) = 24 interior pixels
    expected[2, 2:5] = False
    expected[3:6, 4:7] = False
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 24 - 3 - 9 == 12
    # Ours loses the three holes and (0, 3) (outside above it, the hole (1, 3) below: no
    # neighbour along v); the other neighbours switch to one-sided differences.
    ours_invalid = ~_valid(normals_from_depth(depth, k))
    assert set(zip(*np.nonzero(ours_invalid))) == {(0, 0), (1, 3), (4, 5), (0, 3)}
    assert h * w - ours_invalid.sum() == 76
    # An explicit validity mask (e.g. the reference's eval range) is used instead of depth > 0.
    far = np.ones((h, w), bool)
    far[4, 5] = False
    _, mask_far = densemtl_normals_from_depth(np.full((h, w), 2.0), k, far)
    assert mask_far.sum() == 24 - 9
    with pytest.raises(ValueError, match="shape"):
        densemtl_normals_from_depth(depth, k, far[:-1])


def test_depth_discontinuity_ours_drops_it_the_reference_mixes_the_surfaces():
    depth = np.full((H, W), 2.0, np.float32)
    depth[:, W // 2:] = 3.0  # two fronto-parallel planes, a 1 m step between columns 15 and 16
    ours_valid = _valid(normals_from_depth(depth, K))
    ref, mask = densemtl_normals_from_depth(depth, K)
    edge = np.zeros((H, W), bool)
    edge[:, W // 2 - 1:W // 2 + 1] = True
    np.testing.assert_array_equal(ours_valid, ~edge)
    # The reference keeps the edge columns (only the border and the erosion cut its mask) ...
    assert mask.sum() == (H - 4) * (W - 4) and mask[edge].sum() == 2 * (H - 4)
    # ... exact elsewhere, but there its normals tilt towards the step, 76-80 deg off.
    facing = np.broadcast_to([0.0, 0.0, -1.0], (H, W, 3))
    err = _angle_deg(_unmirror(ref), facing)
    assert err[mask & ~edge].max() < 1e-3
    assert 75.0 < err[mask & edge].min() and err[mask & edge].max() < 80.0
    np.testing.assert_allclose(ref[mask & edge][:, 1], 0.0, atol=1e-6)  # no tilt along v
    # Each kept normal is the normalised sum of the four bases' cross products, the
    # neighbours indexed directly (no roll): checks the offsets' directions.
    points = backproject(depth, K)
    for r, c in [(7, W // 2 - 1), (7, W // 2), (7, 5)]:
        total = sum(np.cross(points[r + dv1, c + du1] - points[r, c],
                             points[r + dv0, c + du0] - points[r, c])
                    for (du1, dv1), (du0, dv0) in DENSEMTL_BASES)
        total = total / np.linalg.norm(total)
        total[2] = abs(total[2])
        np.testing.assert_allclose(ref[r, c], total, atol=1e-6)


def test_decode_needs_intrinsics():
    ex = {"image": np.zeros((4, 5, 3), np.uint8), "depth": np.ones((4, 5, 1), np.float32)}
    assert "normals" not in augment.decode(ex)
    with pytest.raises(ValueError, match="'intrinsics'"):
        augment.decode(ex, normals_from_depth=True)
    ex["intrinsics"] = np.array([5.0, 5.0, 2.0, 1.5], np.float32)
    out = augment.decode(ex, normals_from_depth=True)
    np.testing.assert_allclose(out["normals"], np.broadcast_to([0, 0, -1.0], (4, 5, 3)))


def test_config_option():
    c = ml_collections.ConfigDict({"dataset": {"name": "synthetic"}})
    assert dataset_normals_from_depth(c) is False
    c.dataset.normals_from_depth = True
    assert dataset_normals_from_depth(c) is True


def _check_batch_normals(b, stored=None):
    nrm = np.asarray(b["normals"], np.float64)
    valid = _valid(nrm)
    depth_ok = np.asarray(b["depth"])[..., 0] > 0
    assert valid.mean() > 0.5 and not np.any(valid & ~depth_ok)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=-1)[valid], 1.0, atol=1e-5)
    if stored is not None:  # the synthetic depth is z-depth: computed ~= rendered normals
        both = valid & _valid(stored)
        assert np.median(_angle_deg(nrm[both], stored[both])) < 1.0


def test_pipeline_batches_with_normals_from_depth(data_dir):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    val = registry.open_split("synthetic", "val", data_dir=data_dir, **TINY)
    b = next(pipeline.eval_batches(val, global_batch_size=4, mesh=mesh, normals_from_depth=True))
    stored = next(pipeline.eval_batches(val, global_batch_size=4, mesh=mesh))["normals"]
    _check_batch_normals(b, np.asarray(stored, np.float64))
    train = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    it = pipeline.train_iterator(train, global_batch_size=4, mesh=mesh, seed=0,
                                 augment=augment.JointAugment(), normals_from_depth=True)
    try:
        _check_batch_normals(next(it))
    finally:
        it.close()
