"""The procedural scene generator and its TFDS builder."""

import numpy as np
import pytest
from conftest import TINY

from mtl_jax.data import registry
from mtl_jax.data import synthetic_render as R

H, W = 48, 64


@pytest.fixture(scope="module")
def examples():
    return [R.render_example(0, "train", i, H, W) for i in range(12)]


def test_fields_shapes_dtypes_ranges(examples):
    for ex in examples:
        assert set(ex) == {"image", "semseg", "depth", "normals", "edges", "intrinsics", "light"}
        assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
        assert ex["semseg"].shape == (H, W) and ex["semseg"].dtype == np.int8
        assert ex["depth"].shape == (H, W, 1) and ex["depth"].dtype == np.float32
        assert ex["normals"].shape == (H, W, 3) and ex["normals"].dtype == np.float32
        assert ex["edges"].shape == (H, W) and ex["edges"].dtype == np.int8
        assert ex["semseg"].min() >= -1 and ex["semseg"].max() < R.NUM_CLASSES
        assert set(np.unique(ex["edges"])) <= {0, 1}
        assert np.all(ex["depth"] >= 0) and np.all(ex["depth"] < 12.0)
        assert ex["image"].std() > 5  # not blank
        fx, fy, cx, cy = ex["intrinsics"]
        assert fx > 0 and fy > 0 and 0 < cx < W and 0 < cy < H
        np.testing.assert_allclose(np.linalg.norm(ex["light"]), 1.0, atol=1e-5)


def test_label_statistics(examples):
    seen = set()
    void = []
    for ex in examples:
        seen |= set(np.unique(ex["semseg"]).tolist())
        void.append(np.mean(ex["semseg"] == -1))
    assert R.NUM_CLASSES >= 8
    assert {R.FLOOR, R.WALL} <= seen and len(seen - {-1}) >= 6
    assert np.mean(void) < 0.05  # void is a small fraction


def test_void_appears_somewhere():
    exs = [R.render_example(0, "train", i, 32, 48) for i in range(60)]
    frac = np.mean([np.mean(ex["semseg"] == -1) for ex in exs])
    assert 0 < frac < 0.05


def test_deterministic_and_index_dependent():
    a = R.render_example(7, "val", 3, H, W)
    b = R.render_example(7, "val", 3, H, W)
    c = R.render_example(7, "val", 4, H, W)
    d = R.render_example(8, "val", 3, H, W)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert not np.array_equal(a["depth"], c["depth"])
    assert not np.array_equal(a["image"], d["image"])
    e = R.render_example(7, "train", 3, H, W)
    assert not np.array_equal(a["depth"], e["depth"])  # splits differ


def test_normals_unit_where_valid_zero_where_invalid(examples):
    some_invalid = False
    for ex in examples:
        valid = ex["depth"][..., 0] > 0
        norm = np.linalg.norm(ex["normals"], axis=-1)
        np.testing.assert_allclose(norm[valid], 1.0, atol=1e-5)
        assert np.all(ex["normals"][~valid] == 0)
        assert np.all(ex["depth"][..., 0][valid] > 0)
        some_invalid |= bool((~valid).any())
        # Normals face the camera: dot with the viewing ray is negative.
        fx, fy, cx, cy = ex["intrinsics"]
        v, u = np.mgrid[0:H, 0:W]
        ray = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u, float)], -1)
        assert np.all(np.sum(ray * ex["normals"], -1)[valid] < 1e-6)
    assert some_invalid  # Kinect-like holes exist


def test_edges_exactly_where_class_changes(examples):
    for ex in examples:
        s = ex["semseg"]
        ref = np.zeros_like(s)
        for y in range(H):
            for x in range(W):
                for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and s[yy, xx] != s[y, x]:
                        ref[y, x] = 1
        np.testing.assert_array_equal(ex["edges"], ref)


def test_depth_is_planar_on_the_floor():
    """Metric z-depth of the floor: back-projected floor points lie on one plane."""
    ex = R.render_example(3, "train", 0, H, W)
    fx, fy, cx, cy = ex["intrinsics"]
    m = (ex["semseg"] == R.FLOOR) & (ex["depth"][..., 0] > 0)
    v, u = np.nonzero(m)
    z = ex["depth"][v, u, 0]
    pts = np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], -1)
    n = ex["normals"][v, u].mean(0)
    offsets = pts @ n  # constant for points on one plane
    assert np.ptp(offsets) < 1e-3 * max(1.0, np.abs(offsets).mean())


def test_shading_consistent_with_normals():
    """Walls share one albedo per scene: the faces turned to the light are brighter."""
    checked = 0
    for i in range(30):
        ex = R.render_example(1, "train", i, H, W)
        wall = (ex["semseg"] == R.WALL) & (ex["depth"][..., 0] > 0)
        if wall.sum() < 50:
            continue
        n = ex["normals"][wall]
        lum = ex["image"][wall].astype(float).mean(-1)
        faces = {}
        for key in np.unique(np.round(n, 2), axis=0):
            sel = np.all(np.abs(np.round(n, 2) - key) < 1e-6, -1)
            if sel.sum() >= 20:
                faces[tuple(key)] = (max(float(key @ ex["light"]), 0.0), lum[sel].mean())
        vals = sorted(faces.values())
        for (l0, b0), (l1, b1) in zip(vals, vals[1:]):
            if l1 - l0 > 0.15:
                assert b1 > b0, (i, vals)
                checked += 1
    assert checked >= 3


def test_domains_differ_in_colour_statistics():
    src = np.stack([R.render_example(0, "train", i, 32, 48, "source")["image"] for i in range(16)])
    tgt = np.stack([R.render_example(0, "train", i, 32, 48, "target")["image"] for i in range(16)])
    mean_s, mean_t = src.reshape(-1, 3).mean(0), tgt.reshape(-1, 3).mean(0)
    # Source is warm (red > blue), target cool (blue > red), and noisier at fine scale.
    assert mean_s[0] > mean_s[2] and mean_t[2] > mean_t[0]
    assert np.abs(mean_s - mean_t).max() > 15
    hf = lambda x: np.abs(np.diff(x.astype(float), axis=2)).mean()
    assert hf(tgt) > hf(src)
    # Geometry is shared: same scene layout statistics (depth identical for one index).
    a = R.render_example(0, "train", 5, 32, 48, "source")
    b = R.render_example(0, "train", 5, 32, 48, "target")
    assert not np.array_equal(a["image"], b["image"])


def test_builder_writes_records_in_index_order(data_dir):
    src = registry.open_split("synthetic", "train", data_dir=data_dir, **TINY)
    val = registry.open_split("synthetic", "val", data_dir=data_dir, **TINY)
    assert len(src) == TINY["num_train"] and len(val) == TINY["num_val"]
    for i in (0, 5, 23):
        rec = src[i]
        assert int(rec["index"]) == i
        ref = R.render_example(0, "train", i, TINY["height"], TINY["width"])
        np.testing.assert_array_equal(rec["image"], ref["image"])
        np.testing.assert_array_equal(rec["semseg"], ref["semseg"])
        np.testing.assert_array_equal(rec["depth"], ref["depth"])
        np.testing.assert_allclose(rec["normals"], ref["normals"], atol=1e-3)
    assert not np.array_equal(src[0]["image"], val[0]["image"])


def test_missing_dataset_error_names_the_build_command(tmp_path):
    with pytest.raises(registry.DatasetNotFoundError) as e:
        registry.open_split("synthetic", "train", data_dir=str(tmp_path), **TINY)
    msg = str(e.value)
    assert "mtl-jax data build synthetic" in msg and str(tmp_path) in msg
    assert "--num_train=24" in msg


def test_unknown_dataset_and_bad_options():
    from mtl_jax.errors import UserError

    with pytest.raises(UserError, match="available"):
        registry.get_builder("nope")
    with pytest.raises(UserError, match="domain"):
        registry.get_builder("synthetic", domain="mars")
