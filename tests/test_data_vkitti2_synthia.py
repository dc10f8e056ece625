"""The VKITTI2 and SYNTHIA-RAND-CITYSCAPES builders, on the tiny fake folder trees of
``fake_datasets.vkitti2_synthia`` (official file formats: JPEG / colour PNG / 16-bit PNGs /
intrinsic.txt)."""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_datasets.vkitti2_synthia import (
    PLANE_N,
    SY_FRAMES,
    SY_H,
    SY_K,
    SY_W,
    VK_FRAMES,
    VK_H,
    VK_SCENES,
    VK_W,
    plane_depth_cm,
    sy_ids,
    vk_classes,
    vk_colours,
    vk_intrinsics,
    write_png16,
    write_synthia,
    write_vkitti2,
)
from PIL import Image

from mtl_jax.data import augment, manual, registry, synthia, vkitti2
from mtl_jax.data.manual import BadFileError, ManualDataError


# ---------------------------------------------------------------------- shared helpers
def angle_deg(normals, n):
    cos = np.clip(np.sum(normals.astype(np.float64) * n, -1), -1, 1)
    return np.degrees(np.arccos(cos))


def build(builder_cls, config, data_dir, manual_dir):
    tfds.disable_progress_bar()
    b = builder_cls(data_dir=str(data_dir), config=config, file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, manual_dir=str(manual_dir)))
    return b


def read_split(builder, split):
    src = builder.as_data_source(split=split)
    return [src[i] for i in range(len(src))]


def grey_id(example):
    """The identity a fake frame carries in its uniform grey image (value 10 + 8·id)."""
    return int(np.round((float(np.mean(example["image"])) - 10) / 8))


# ------------------------------------------------------------------------- VKITTI2 fakes
@pytest.fixture(scope="module")
def vk_tree(tmp_path_factory):
    return write_vkitti2(str(tmp_path_factory.mktemp("vkitti2")))


@pytest.fixture(scope="module")
def vk_data(tmp_path_factory, vk_tree):
    """data dir with the 48x160 clone configs built through the registry (random, scene)."""
    d = str(tmp_path_factory.mktemp("tfds_vk"))
    tfds.disable_progress_bar()
    for cfg in ("48x160_clone_random", "48x160_clone_scene"):
        registry.build("vkitti2", config=cfg, data_dir=d, manual_dir=vk_tree)
    return d


def vk_split(data_dir, cfg, split):
    src = registry.open_split("vkitti2", split, config=cfg, data_dir=data_dir)
    return [src[i] for i in range(len(src))]


def vk_identity(example):
    """(scene, frame, camera) of a built example, from its grey level."""
    k = grey_id(example)
    scene = VK_SCENES[k // 12]
    return scene, (k % 12) // 2, k % 2


def test_vkitti2_configs():
    names = [c.name for c in vkitti2.MtlVkitti2.BUILDER_CONFIGS]
    assert vkitti2.MtlVkitti2.DEFAULT_CONFIG_NAME == "320x1024_clone_random"
    for name in ("320x1024_clone_random", "320x1024_clone_scene", "48x160_clone_random",
                 "48x160_clone_scene", "320x1024_fog_scene", "48x160_all_random"):
        assert name in names
    assert len(names) == len(set(names))
    cfg = vkitti2.make_config(48, 160, "rain", "scene", cameras=(1, 0))
    assert cfg.name == "48x160_rain_scene_cam01" and cfg.cameras == (0, 1)
    assert vkitti2.make_config(48, 160, cameras=(1,)).name == "48x160_clone_random_cam1"
    for bad in (dict(variation="snow"), dict(split="seq"), dict(cameras=(2,)),
                dict(height=4)):
        with pytest.raises(vkitti2.UserError):
            vkitti2.make_config(**bad)
    assert vkitti2.MtlVkitti2.NUM_CLASSES == 14 and len(vkitti2.CLASS_NAMES) == 14
    assert vkitti2.MtlVkitti2.VERSION == tfds.core.Version("1.0.0")
    assert "vkitti-2" in vkitti2.MtlVkitti2.DOWNLOAD_URL
    assert "vkitti_2.0.3_depth" in vkitti2.MtlVkitti2.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_vkitti2_random_split_sizes_disjoint_and_index(vk_data):
    cfg = "48x160_clone_random"
    train, val = vk_split(vk_data, cfg, "train"), vk_split(vk_data, cfg, "val")
    n = sum(VK_FRAMES.values())
    assert len(val) == round(0.2 * n) and len(train) + len(val) == n
    for part in (train, val):
        assert [int(ex["index"]) for ex in part] == list(range(len(part)))
    ids_train = [vk_identity(ex) for ex in train]
    ids_val = [vk_identity(ex) for ex in val]
    assert not set(ids_train) & set(ids_val)
    frames = sorted((s, f, 0) for s, m in VK_FRAMES.items() for f in range(m))
    assert sorted(ids_train + ids_val) == frames
    assert ids_train == sorted(ids_train) and ids_val == sorted(ids_val)  # sorted frames
    _, expected_val = manual.seeded_split(frames, 0.2, 0)  # one seeded permutation, seed 0
    assert ids_val == expected_val


def test_vkitti2_scene_split(vk_data):
    cfg = "48x160_clone_scene"
    train, val = vk_split(vk_data, cfg, "train"), vk_split(vk_data, cfg, "val")
    assert len(val) == VK_FRAMES["Scene20"] and len(train) == VK_FRAMES["Scene01"]
    assert {vk_identity(ex)[0] for ex in val} == {"Scene20"}
    assert {vk_identity(ex)[0] for ex in train} == {"Scene01"}
    assert [int(ex["index"]) for ex in val] == list(range(len(val)))


def test_vkitti2_fields(vk_data):
    for ex in vk_split(vk_data, "48x160_clone_random", "train"):
        scene, frame, cam = vk_identity(ex)
        assert ex["image"].shape == (48, 160, 3) and ex["image"].dtype == np.uint8
        assert ex["semseg"].shape == (48, 160) and ex["semseg"].dtype == np.int16
        assert ex["depth"].shape == (48, 160, 1) and ex["depth"].dtype == np.float32
        assert ex["normals"].shape == (48, 160, 3) and ex["normals"].dtype == np.float16
        assert ex["intrinsics"].dtype == np.float32 and np.asarray(ex["index"]).dtype.kind == "i"
        # colour -> class: every one of the 14 colours and Undefined -> -1
        expected = manual.resize_nearest(vk_classes(frame), 48, 160)
        np.testing.assert_array_equal(ex["semseg"], expected)
        assert set(np.unique(ex["semseg"]).tolist()) == set(range(-1, 14))
        # intrinsics of this frame and camera, scaled to the stored resolution
        k = manual.scale_intrinsics(vk_intrinsics(frame, cam), (VK_H, VK_W), (48, 160))
        np.testing.assert_allclose(ex["intrinsics"], k, rtol=1e-6)
        # depth: cm -> m; the far plane stays 655.35 m; a stored 0 stays invalid
        cm = manual.resize_nearest(plane_depth_cm(VK_H, VK_W, vk_intrinsics(frame, cam),
                                                  frame), 48, 160)
        np.testing.assert_allclose(ex["depth"][..., 0], cm / 100.0, rtol=1e-6)
        far = cm == 65535
        assert far.any() and np.allclose(ex["depth"][..., 0][far], 655.35)
        zero = cm == 0
        assert (frame == 0) == bool(zero.any())
        assert np.all(ex["depth"][..., 0][zero] == 0)
        assert np.all(ex["normals"][far | zero] == 0)  # no normal on sky or invalid depth


def native_normals(cm, k, h, w):
    """The definition: normals of the native depth (far plane masked) with the native
    intrinsics, resized by nearest neighbour."""
    metres = np.where(cm == 65535, 0.0, cm / 100.0)
    return manual.resize_nearest(manual.normals_for(metres, k), h, w)


def check_plane_normals(examples, frame_of, cm_of, k_of, h, w):
    seen = set()
    for ex in examples:
        frame = frame_of(ex)
        depth = ex["depth"][..., 0]
        surface = (depth > 0) & (depth < 655)
        valid = np.any(ex["normals"] != 0, -1)
        assert np.all(valid <= surface)
        np.testing.assert_allclose(ex["normals"].astype(np.float32),
                                   native_normals(cm_of(ex), k_of(ex), h, w), atol=2e-3)
        if frame == 0:  # fronto-parallel wall: (0, 0, -1) everywhere but next to the hole
            err = angle_deg(ex["normals"][valid], np.array([0.0, 0.0, -1.0]))
            assert valid.mean() > 0.6 and err.max() < 0.1
            seen.add("wall")
        else:  # tilted plane: its analytic normal, after cm rounding and nearest resizing
            assert valid[surface].mean() > 0.97
            err = angle_deg(ex["normals"][valid], PLANE_N)
            assert np.median(err) < 1.0 and np.percentile(err, 95) < 2.5, (
                np.median(err), np.percentile(err, 95))
            mean = ex["normals"][valid].astype(np.float64).mean(0)
            assert angle_deg(mean / np.linalg.norm(mean), PLANE_N) < 0.5
            seen.add("tilted")
    assert seen == {"wall", "tilted"}


def test_vkitti2_normals_from_depth(vk_data):
    exs = vk_split(vk_data, "48x160_clone_random", "train") + vk_split(
        vk_data, "48x160_clone_random", "val")

    def k_of(ex):
        _, frame, cam = vk_identity(ex)
        return vk_intrinsics(frame, cam)

    check_plane_normals(exs, lambda ex: vk_identity(ex)[1],
                        lambda ex: plane_depth_cm(VK_H, VK_W, k_of(ex), vk_identity(ex)[1]),
                        k_of, 48, 160)


def test_vkitti2_decode_dtypes(vk_data):
    ex = vk_split(vk_data, "48x160_clone_random", "val")[0]
    out = augment.decode(ex)
    assert out["image"].dtype == np.float32 and out["image"].max() <= 1.0
    assert out["semseg"].dtype == np.int32 and out["index"].dtype == np.int32
    assert out["depth"].dtype == np.float32 and out["normals"].dtype == np.float32
    assert out["intrinsics"].dtype == np.float32 and out["example_mask"] == 1.0
    norm = np.linalg.norm(out["normals"], axis=-1)
    valid = norm > 0
    np.testing.assert_allclose(norm[valid], 1.0, atol=1e-5)


def test_vkitti2_both_cameras_stay_together(tmp_path, vk_tree):
    cfg = vkitti2.make_config(48, 160, "clone", "random", cameras=(0, 1))
    b = build(vkitti2.MtlVkitti2, cfg, tmp_path, vk_tree)
    train, val = read_split(b, "train"), read_split(b, "val")
    n = sum(VK_FRAMES.values())
    assert len(val) == 2 * round(0.2 * n) and len(train) + len(val) == 2 * n
    frames_train = {vk_identity(ex)[:2] for ex in train}
    frames_val = {vk_identity(ex)[:2] for ex in val}
    assert not frames_train & frames_val  # a stereo pair never straddles the split
    for ex in val:
        _, frame, cam = vk_identity(ex)
        k = manual.scale_intrinsics(vk_intrinsics(frame, cam), (VK_H, VK_W), (48, 160))
        np.testing.assert_allclose(ex["intrinsics"], k, rtol=1e-6)


def test_vkitti2_colours_to_classes_unit():
    colours = np.array([[c for _, c in vkitti2.CLASSES] + [(0, 0, 0)]], np.uint8)
    np.testing.assert_array_equal(vkitti2.colours_to_classes("x.png", colours)[0],
                                  list(range(14)) + [-1])
    with pytest.raises(BadFileError, match=r"x\.png.*\(1, 2, 3\)"):
        vkitti2.colours_to_classes("x.png", np.array([[[0, 0, 0], [1, 2, 3]]], np.uint8))


def test_vkitti2_missing_folder(tmp_path):
    for manual_dir in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ManualDataError) as e:
            registry.build("vkitti2", config="48x160_clone_random", data_dir=str(tmp_path),
                           manual_dir=manual_dir)
        assert vkitti2.DOWNLOAD_URL in str(e.value)
        assert "vkitti_2.0.3_classSegmentation/" in str(e.value)  # the expected tree
    empty = tmp_path / "empty"
    (empty / "something").mkdir(parents=True)
    with pytest.raises(ManualDataError, match="vkitti_2.0.3_rgb"):
        registry.build("vkitti2", config="48x160_clone_random", data_dir=str(tmp_path),
                       manual_dir=str(empty))


def test_vkitti2_missing_file(tmp_path, vk_tree):
    tree = str(tmp_path / "tree")
    shutil.copytree(vk_tree, tree)
    rel = vkitti2.Frame("Scene20", "clone", 2, 0).relpaths()["depth"]
    os.remove(os.path.join(tree, rel))
    with pytest.raises(ManualDataError, match=rel):
        build(vkitti2.MtlVkitti2, "48x160_clone_random", tmp_path / "d", tree)


def test_vkitti2_scene_split_needs_val_scene(tmp_path):
    tree = write_vkitti2(str(tmp_path / "tree"), frames={"Scene01": 3, "Scene02": 2})
    with pytest.raises(ManualDataError, match="Scene20"):
        build(vkitti2.MtlVkitti2, "48x160_clone_scene", tmp_path / "d", tree)
    b = build(vkitti2.MtlVkitti2, "48x160_clone_random", tmp_path / "d", tree)
    assert len(read_split(b, "val")) == 1 and len(read_split(b, "train")) == 4


def test_vkitti2_unknown_colour(tmp_path, vk_tree):
    tree = str(tmp_path / "tree")
    shutil.copytree(vk_tree, tree)
    rel = vkitti2.Frame("Scene01", "clone", 3, 0).relpaths()["classgt"]
    colours = vk_colours(vk_classes(3)).copy()
    colours[5, 7] = (12, 34, 56)
    Image.fromarray(colours).save(os.path.join(tree, rel))
    with pytest.raises(BadFileError, match=r"classgt_00003\.png.*\(12, 34, 56\)"):
        build(vkitti2.MtlVkitti2, "48x160_clone_random", tmp_path / "d", tree)


def test_vkitti2_missing_intrinsics_row(tmp_path, vk_tree):
    tree = str(tmp_path / "tree")
    shutil.copytree(vk_tree, tree)
    path = os.path.join(tree, "vkitti_2.0.3_textgt/Scene01/clone/intrinsic.txt")
    with open(path) as fh:
        lines = [ln for ln in fh.read().splitlines() if not ln.startswith("4 0 ")]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    with pytest.raises(BadFileError, match="frame 4 and camera 0"):
        build(vkitti2.MtlVkitti2, "48x160_clone_random", tmp_path / "d", tree)


# ------------------------------------------------------------------------- SYNTHIA fakes
@pytest.fixture(scope="module")
def sy_tree(tmp_path_factory):
    return write_synthia(str(tmp_path_factory.mktemp("synthia")))


@pytest.fixture(scope="module")
def sy_data(tmp_path_factory, sy_tree):
    d = str(tmp_path_factory.mktemp("tfds_sy"))
    tfds.disable_progress_bar()
    registry.build("synthia", config="38x64", data_dir=d, manual_dir=sy_tree)
    return d


def sy_split(data_dir, split):
    src = registry.open_split("synthia", split, config="38x64", data_dir=data_dir)
    return [src[i] for i in range(len(src))]


def test_synthia_configs():
    names = [c.name for c in synthia.MtlSynthia.BUILDER_CONFIGS]
    assert synthia.MtlSynthia.DEFAULT_CONFIG_NAME == "512x1024"
    assert "38x64" in names and "512x1024" in names
    assert synthia.MtlSynthia.NUM_CLASSES == 16 and len(synthia.CLASS_NAMES) == 16
    assert sorted(synthia.SYNTHIA_TO_CLASS.values()) == list(range(16))
    assert "synthia-dataset.net" in synthia.MtlSynthia.DOWNLOAD_URL
    assert "Depth/Depth" in synthia.MtlSynthia.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_read_png_channels(tmp_path):
    rng = np.random.default_rng(0)
    for c in (1, 3, 4):
        a = rng.integers(0, 65536, size=(5, 7, c), dtype=np.uint16)
        path = str(tmp_path / f"c{c}.png")
        write_png16(path, a)
        got = synthia.read_png_channels(path)
        assert got.dtype.kind in "ui"
        np.testing.assert_array_equal(got.reshape(a.shape), a)
        np.testing.assert_array_equal(synthia.first_channel(path, bits=16), a[..., 0])
    rgb8 = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png")
    got = synthia.read_png_channels(str(tmp_path / "rgb8.png"))
    assert got.dtype == np.uint8 and np.array_equal(got, rgb8)
    with pytest.raises(BadFileError, match="16-bit"):
        synthia.first_channel(str(tmp_path / "rgb8.png"), bits=16)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BadFileError, match="junk"):
        synthia.read_png_channels(str(tmp_path / "junk.png"))


def test_synthia_ids_to_classes_unit():
    ids = np.arange(23)
    got = synthia.ids_to_classes("l.png", ids)
    expected = np.full(23, -1)
    for i, c in synthia.SYNTHIA_TO_CLASS.items():
        expected[i] = c
    np.testing.assert_array_equal(got, expected)
    assert got[3] == 0 and got[1] == 9 and got[13] == -1 and got[8] == 12 and got[0] == -1
    with pytest.raises(BadFileError, match=r"l\.png.*40"):
        synthia.ids_to_classes("l.png", np.array([[3, 40]]))


def test_synthia_split_fields_and_mapping(sy_data):
    train, val = sy_split(sy_data, "train"), sy_split(sy_data, "val")
    assert len(val) == round(0.2 * SY_FRAMES) and len(train) + len(val) == SY_FRAMES
    ids_train, ids_val = [grey_id(ex) for ex in train], [grey_id(ex) for ex in val]
    assert not set(ids_train) & set(ids_val)
    assert sorted(ids_train + ids_val) == list(range(SY_FRAMES))
    _, expected_val = manual.seeded_split(list(range(SY_FRAMES)), 0.2, 0)
    assert ids_val == expected_val
    k = manual.scale_intrinsics(synthia.INTRINSICS_760x1280, (760, 1280), (38, 64))
    table = np.full(23, -1)
    for i, c in synthia.SYNTHIA_TO_CLASS.items():
        table[i] = c
    for part in (train, val):
        assert [int(ex["index"]) for ex in part] == list(range(len(part)))
        for ex in part:
            f = grey_id(ex)
            assert ex["image"].shape == (38, 64, 3) and ex["image"].dtype == np.uint8
            assert ex["semseg"].dtype == np.int16 and ex["depth"].shape == (38, 64, 1)
            assert ex["normals"].dtype == np.float16 and np.asarray(ex["index"]).dtype.kind == "i"
            np.testing.assert_allclose(ex["intrinsics"], k, rtol=1e-6)
            np.testing.assert_array_equal(
                ex["semseg"], manual.resize_nearest(table[sy_ids(f)], 38, 64))
            cm = manual.resize_nearest(plane_depth_cm(SY_H, SY_W, SY_K, f), 38, 64)
            np.testing.assert_allclose(ex["depth"][..., 0], cm / 100.0, rtol=1e-6)
            far, zero = cm == 65535, cm == 0
            assert np.allclose(ex["depth"][..., 0][far], 655.35)
            assert np.all(ex["depth"][..., 0][zero] == 0)
            assert np.all(ex["normals"][far | zero] == 0)
    seen = set(np.concatenate([np.unique(ex["semseg"]) for ex in train + val]).tolist())
    assert seen == set(range(-1, 16))
    # intrinsics at 38x64 stay those of the 760x1280 camera, scaled
    np.testing.assert_allclose(k, [532.740352 / 20, 532.740352 / 20, 640.5 / 20 - 0.5,
                                   380.5 / 20 - 0.5], rtol=1e-6)


def test_synthia_normals_from_depth(sy_data):
    exs = sy_split(sy_data, "train") + sy_split(sy_data, "val")
    check_plane_normals(exs, grey_id, lambda ex: plane_depth_cm(SY_H, SY_W, SY_K, grey_id(ex)),
                        lambda ex: SY_K, 38, 64)


def test_synthia_decode_dtypes(sy_data):
    out = augment.decode(sy_split(sy_data, "val")[0])
    assert out["image"].dtype == np.float32 and out["semseg"].dtype == np.int32
    assert out["depth"].dtype == np.float32 and out["normals"].dtype == np.float32
    assert out["intrinsics"].dtype == np.float32 and out["index"].dtype == np.int32


def test_synthia_missing_folder_and_file(tmp_path, sy_tree):
    for manual_dir in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ManualDataError) as e:
            registry.build("synthia", config="38x64", data_dir=str(tmp_path / "d"),
                           manual_dir=manual_dir)
        assert synthia.DOWNLOAD_URL in str(e.value) and "GT/LABELS/" in str(e.value)
    tree = str(tmp_path / "tree")
    shutil.copytree(sy_tree, tree)
    os.remove(os.path.join(tree, "Depth/Depth/0000004.png"))
    with pytest.raises(ManualDataError, match=r"Depth/Depth/0000004\.png"):
        build(synthia.MtlSynthia, "38x64", tmp_path / "d", tree)
    shutil.rmtree(os.path.join(tree, "GT"))
    with pytest.raises(ManualDataError, match="GT/LABELS"):
        build(synthia.MtlSynthia, "38x64", tmp_path / "d", tree)


def test_synthia_bad_label_id(tmp_path, sy_tree):
    tree = str(tmp_path / "tree")
    shutil.copytree(sy_tree, tree)
    path = os.path.join(tree, "GT/LABELS/0000006.png")
    ids = sy_ids(6).copy()
    ids[10, 20] = 40
    write_png16(path, np.stack([ids, ids, ids], -1))
    with pytest.raises(BadFileError, match=r"0000006\.png.*40"):
        build(synthia.MtlSynthia, "38x64", tmp_path / "d", tree)


def test_synthia_wrong_size(tmp_path, sy_tree):
    tree = str(tmp_path / "tree")
    shutil.copytree(sy_tree, tree)
    Image.fromarray(np.zeros((SY_H, SY_W + 8, 3), np.uint8)).save(
        os.path.join(tree, "RGB/0000002.png"))
    with pytest.raises(BadFileError, match="0000002"):
        build(synthia.MtlSynthia, "38x64", tmp_path / "d", tree)
