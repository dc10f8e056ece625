"""Cityscapes builders (MTAN's pre-processed ``.npy`` and the official release) on the tiny fake
folder trees of ``fake_datasets.cityscapes`` (exact file formats): label mappings, depth units and
conversion, normals from depth, intrinsics, splits, and the errors for bad folders/files."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_datasets.cityscapes import MTAN_SIZES, RAW_EXAMPLES, SLANT, H, W, write_mtan, write_raw
from PIL import Image

from mtl_jax.data import augment, registry
from mtl_jax.data import cityscapes as raw_mod
from mtl_jax.data import cityscapes_mtan as mtan_mod
from mtl_jax.data.manual import BadFileError, ManualDataError, resize_image, resize_nearest

# --------------------------------------------------------------------------- expected labels
# Written out by hand from the official label table (not computed by the module under test):
# labelIds value -> class, for ids 0..33.
_ = -1
EXPECTED_19 = [_, _, _, _, _, _, _, 0, 1, _, _, 2, 3, 4, _, _, _, 5, _, 6, 7, 8, 9, 10, 11, 12,
               13, 14, 15, _, _, 16, 17, 18]
EXPECTED_16 = [_, _, _, _, _, _, _, 0, 1, _, _, 2, 3, 4, _, _, _, 5, _, 6, 7, 8, _, 9, 10, 11,
               12, _, 13, _, _, _, 14, 15]
EXPECTED_7 = [_, _, _, _, _, _, _, 0, 0, _, _, 1, 1, 1, _, _, _, 2, _, 2, 2, 3, 3, 4, 5, 5,
              6, 6, 6, _, _, 6, 6, 6]
EXPECTED = {7: EXPECTED_7, 16: EXPECTED_16, 19: EXPECTED_19}


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bar():
    tfds.disable_progress_bar()


def _tree_text(message: str) -> bool:
    return all(line in message for line in ("leftImg8bit/", "gtFine/", "disparity/", "camera/"))


# ================================================================ MTAN's pre-processed version
@pytest.fixture(scope="module")
def mtan(tmp_path_factory):
    manual = str(tmp_path_factory.mktemp("mtan_manual"))
    written = write_mtan(manual)
    data_dir = str(tmp_path_factory.mktemp("mtan_tfds"))
    for config in ("128x256_7cls", "128x256_19cls"):
        registry.build("cityscapes_mtan", config, data_dir=data_dir, manual_dir=manual)
    return manual, data_dir, written


def test_mtan_configs():
    cls = mtan_mod.MtlCityscapesMtan
    assert sorted(cls.builder_configs) == ["128x256_19cls", "128x256_7cls", "256x512_19cls",
                                          "256x512_7cls"]
    assert cls.DEFAULT_CONFIG_NAME == "128x256_7cls"
    assert cls.NUM_CLASSES == {"128x256_7cls": 7, "128x256_19cls": 19, "256x512_7cls": 7,
                               "256x512_19cls": 19}
    assert len(cls.CLASS_NAMES[7]) == 7 and len(cls.CLASS_NAMES[19]) == 19
    assert cls.CLASS_NAMES[7][0] == "flat" and cls.CLASS_NAMES[19][-1] == "bicycle"
    assert cls.registry_name() == "cityscapes_mtan"
    # the unit is documented where users look
    assert "inverse depth" in mtan_mod.__doc__ and "inverse" in cls.__doc__


@pytest.mark.parametrize("n", [7, 19])
def test_mtan_examples_stored_unchanged(mtan, n):
    _, data_dir, written = mtan
    config = f"128x256_{n}cls"
    for split, size in MTAN_SIZES.items():
        src = registry.open_split("cityscapes_mtan", split, config, data_dir)
        assert len(src) == size
        for i in range(size):
            ex, w = src[i], written[split, i]
            assert set(ex) == {"image", "semseg", "depth", "index"}  # no normals/intrinsics
            assert int(ex["index"]) == i
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
            expected = np.rint(w["image"].astype(np.float64) * 255).astype(np.uint8)
            np.testing.assert_array_equal(ex["image"], expected)
            assert ex["image"][0, 0].tolist() == [0, 128, 255]
            assert ex["semseg"].dtype == np.int16
            np.testing.assert_array_equal(ex["semseg"], w[f"label_{n}"].astype(np.int16))
            assert ex["semseg"].min() == -1 and ex["semseg"].max() == n - 1
            # inverse depth, not metres: the stored values are the file's, bit for bit
            assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (H, W, 1)
            np.testing.assert_array_equal(ex["depth"], w["depth"])
            assert ex["depth"].max() <= 0.4922 and np.all(ex["depth"][:10] == 0)


def test_mtan_splits_disjoint_and_decode(mtan):
    _, data_dir, _ = mtan
    train = registry.open_split("cityscapes_mtan", "train", None, data_dir)  # default config
    val = registry.open_split("cityscapes_mtan", "val", None, data_dir)
    train_images = {train[i]["image"].tobytes() for i in range(len(train))}
    assert not train_images & {val[i]["image"].tobytes() for i in range(len(val))}
    b = augment.decode(train[0])
    assert b["image"].dtype == np.float32 and 0 <= b["image"].min() and b["image"].max() <= 1
    assert b["semseg"].dtype == np.int32 and b["depth"].dtype == np.float32
    assert b["index"].dtype == np.int32


def test_mtan_accepts_uint8_images_and_2d_depth(tmp_path):
    manual = str(tmp_path / "m")
    written = write_mtan(manual)
    image = np.rint(written["train", 0]["image"] * 255).astype(np.uint8)
    np.save(os.path.join(manual, "train", "image", "0.npy"), image)
    np.save(os.path.join(manual, "train", "depth", "0.npy"), written["train", 0]["depth"][..., 0])
    registry.build("cityscapes_mtan", "128x256_7cls", data_dir=str(tmp_path / "d"),
                   manual_dir=manual)
    ex = registry.open_split("cityscapes_mtan", "train", "128x256_7cls", str(tmp_path / "d"))[0]
    np.testing.assert_array_equal(ex["image"], image)
    np.testing.assert_array_equal(ex["depth"], written["train", 0]["depth"])


def test_mtan_numeric_file_order(tmp_path):
    for name in ("10.npy", "2.npy", "0.npy", "1.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert mtan_mod._sorted_npy(str(tmp_path)) == ["0.npy", "1.npy", "2.npy", "10.npy"]


def test_mtan_missing_folder(tmp_path):
    for manual in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ManualDataError) as e:
            registry.build("cityscapes_mtan", data_dir=str(tmp_path / "d"), manual_dir=manual)
        assert mtan_mod.EXPECTED_TREE in str(e.value)
        assert "https://github.com/lorenmt/mtan" in str(e.value)


def _mtan_error(tmp_path, edit, config="128x256_7cls"):
    manual = str(tmp_path / "m")
    write_mtan(manual)
    edit(manual)
    registry.build("cityscapes_mtan", config, data_dir=str(tmp_path / "d"), manual_dir=manual)


def test_mtan_missing_files(tmp_path):
    def drop_depth(manual):
        os.remove(os.path.join(manual, "val", "depth", "1.npy"))
    with pytest.raises(ManualDataError, match=r"val/depth/1\.npy"):
        _mtan_error(tmp_path / "a", drop_depth)

    def drop_label_folder(manual):
        shutil.rmtree(os.path.join(manual, "train", "label_19"))
    with pytest.raises(ManualDataError, match="train/label_19"):
        _mtan_error(tmp_path / "b", drop_label_folder, "128x256_19cls")


def test_mtan_bad_labels(tmp_path):
    def label_7(manual):
        lab = np.zeros((H, W), np.float32)
        lab[3, 4] = 7  # 7 classes: ids 0..6
        np.save(os.path.join(manual, "train", "label_7", "1.npy"), lab)
    with pytest.raises(BadFileError, match=r"train/label_7/1\.npy.*7"):
        _mtan_error(tmp_path / "a", label_7)

    def fractional(manual):
        np.save(os.path.join(manual, "val", "label_7", "0.npy"), np.full((H, W), 0.5))
    with pytest.raises(BadFileError, match=r"val/label_7/0\.npy"):
        _mtan_error(tmp_path / "b", fractional)


def test_mtan_bad_depth_and_image(tmp_path):
    def metres(manual):  # metric depth where inverse depth is expected
        np.save(os.path.join(manual, "train", "depth", "2.npy"), np.full((H, W, 1), 12.0))
    with pytest.raises(BadFileError, match=r"train/depth/2\.npy.*exceed"):
        _mtan_error(tmp_path / "a", metres)

    def image_255(manual):  # float image in 0..255
        np.save(os.path.join(manual, "val", "image", "1.npy"), np.full((H, W, 3), 200.0))
    with pytest.raises(BadFileError, match=r"val/image/1\.npy"):
        _mtan_error(tmp_path / "b", image_255)


def test_mtan_wrong_resolution_names_the_right_config(tmp_path):
    with pytest.raises(BadFileError, match="128x256_19cls"):
        _mtan_error(tmp_path, lambda manual: None, "256x512_19cls")


# =================================================================== the official release
@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes_manual"))
    return root, write_raw(root)


@pytest.fixture(scope="module")
def raw(raw_tree, tmp_path_factory):
    manual, written = raw_tree
    data_dir = str(tmp_path_factory.mktemp("cityscapes_tfds"))
    for n in (7, 16, 19):
        registry.build("cityscapes", f"128x256_{n}cls", data_dir=data_dir, manual_dir=manual)
    return data_dir, written


def _stored(data_dir, n=19):
    """{name: stored example} over both splits, checking sizes and order."""
    out = {}
    for split in ("train", "val"):
        src = registry.open_split("cityscapes", split, f"128x256_{n}cls", data_dir)
        names = [name for s, _, name, _ in RAW_EXAMPLES if s == split]
        assert len(src) == len(names)
        for i, name in enumerate(names):
            out[name] = src[i]
            assert int(src[i]["index"]) == i
    return out


def test_raw_configs():
    cls = raw_mod.MtlCityscapes
    names = [f"{h}x{w}_{n}cls" for h, w in ((128, 256), (256, 512), (512, 1024))
             for n in (7, 16, 19)]
    assert sorted(cls.builder_configs) == sorted(names)
    assert cls.DEFAULT_CONFIG_NAME == "512x1024_16cls"
    assert cls.NUM_CLASSES["512x1024_16cls"] == 16 and cls.NUM_CLASSES["128x256_7cls"] == 7
    assert cls.CLASS_NAMES[16] == ("road", "sidewalk", "building", "wall", "fence", "pole",
                                   "traffic light", "traffic sign", "vegetation", "sky",
                                   "person", "rider", "car", "bus", "motorcycle", "bicycle")
    assert cls.CLASS_NAMES[7] == ("flat", "construction", "object", "nature", "sky", "human",
                                  "vehicle")
    assert cls.CLASS_NAMES[19][9] == "terrain" and cls.CLASS_NAMES[19][16] == "train"
    assert cls.registry_name() == "cityscapes"


@pytest.mark.parametrize("n", [7, 16, 19])
def test_raw_label_mapping(raw, n):
    data_dir, written = raw
    lut = np.array(EXPECTED[n], np.int16)
    for name, ex in _stored(data_dir, n).items():
        ids = resize_nearest(written[name]["ids"], H, W)
        assert ex["semseg"].dtype == np.int16 and ex["semseg"].shape == (H, W)
        np.testing.assert_array_equal(ex["semseg"], lut[ids])
    # the brief's spot checks: ids 7 (road), 22 (terrain), 27 (truck), 0 (unlabeled),
    # 9 (parking: a 'flat' id without a train id)
    spot = {7: {7: 0, 22: 3, 27: 6, 0: -1, 9: -1},
            16: {7: 0, 22: -1, 27: -1, 0: -1, 9: -1, 26: 12, 33: 15},
            19: {7: 0, 22: 9, 27: 14, 0: -1, 9: -1, 31: 16}}[n]
    ex = _stored(data_dir, n)["aachen_000000_000019"]
    ids = resize_nearest(written["aachen_000000_000019"]["ids"], H, W)
    for label_id, cls in spot.items():
        assert np.all(ex["semseg"][ids == label_id] == cls), (label_id, cls)
    assert raw_mod.label_lookup(n)[:34].tolist() == EXPECTED[n]


def test_raw_depth_in_metres(raw):
    data_dir, written = raw
    stored = _stored(data_dir)
    ex = stored["aachen_000000_000019"]
    assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (H, W, 1)
    p = resize_nearest(written["aachen_000000_000019"]["disparity"], H, W)
    depth = ex["depth"][..., 0]
    # p = 769: disparity 3 px, 0.2 m * 150 px / 3 px = 10 m
    np.testing.assert_allclose(depth[p == 769], 10.0, rtol=1e-6)
    assert np.all(depth[p <= 1] == 0) and np.any(p == 0) and np.any(p == 1)
    # every example: baseline * fx / ((p - 1) / 256) at the pixel nearest-resized from
    for name, ex in stored.items():
        w = written[name]
        p = resize_nearest(w["disparity"], H, W).astype(np.float64)
        cam = w["camera"]
        expected = np.where(p > 1, cam["extrinsic"]["baseline"] * cam["intrinsic"]["fx"]
                            * 256.0 / np.maximum(p - 1, 1), 0.0)
        np.testing.assert_allclose(ex["depth"][..., 0], expected, rtol=1e-5)
    # the far end of the random maps: p = 2 is 0.2 * 150 * 256 = 7680 m, stored uncapped
    assert raw_mod.disparity_to_depth(np.array([0, 1, 2, 257]), 0.2, 150.0).tolist() == [
        0.0, 0.0, 7680.0, 30.0]


def test_raw_intrinsics_scaled(raw):
    data_dir, written = raw
    for name, ex in _stored(data_dir).items():
        k = written[name]["camera"]["intrinsic"]
        h, w = written[name]["ids"].shape
        s = W / w  # 2 for the 64x128 files, 1 for the 128x256 one
        assert H / h == s
        expected = [k["fx"] * s, k["fy"] * s, (k["u0"] + 0.5) * s - 0.5, (k["v0"] + 0.5) * s - 0.5]
        assert ex["intrinsics"].dtype == np.float32
        np.testing.assert_allclose(ex["intrinsics"], expected, rtol=1e-6)


def _angles_deg(n, expected):
    n = n.astype(np.float64)
    cos = np.clip(np.sum(n * np.asarray(expected, np.float64), -1)
                  / np.linalg.norm(n, axis=-1), -1, 1)
    return np.degrees(np.arccos(cos))


def test_raw_normals_from_depth(raw):
    data_dir, _ = raw
    stored = _stored(data_dir)
    # fronto-parallel plane: normals face the camera, (0, 0, -1); zero where depth is invalid
    ex = stored["aachen_000000_000019"]
    assert ex["normals"].dtype == np.float16 and ex["normals"].shape == (H, W, 3)
    valid = ex["depth"][..., 0] > 0
    assert np.all(ex["normals"][~valid] == 0)
    assert np.all(np.linalg.norm(ex["normals"][valid].astype(np.float32), axis=-1) > 0.99)
    assert _angles_deg(ex["normals"][valid], [0, 0, -1]).max() < 0.1
    # slanted plane Z = z0 + t X (needs the right intrinsics): normal (t, 0, -1)/|.|
    ex = stored["aachen_000001_000019"]
    t = SLANT["t"]
    expected = np.array([t, 0.0, -1.0]) / np.hypot(t, 1.0)
    err = _angles_deg(ex["normals"].reshape(-1, 3), expected)
    assert np.median(err) < 1.0 and np.mean(err < 3.0) > 0.95


def test_raw_images_splits_and_decode(raw):
    data_dir, written = raw
    stored = _stored(data_dir)
    for name, ex in stored.items():  # each record is its file, in sorted order
        assert ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], resize_image(written[name]["image"], H, W))
    train = {stored[n]["image"].tobytes() for s, _, n, _ in RAW_EXAMPLES if s == "train"}
    val = {stored[n]["image"].tobytes() for s, _, n, _ in RAW_EXAMPLES if s == "val"}
    assert len(train) == 3 and len(val) == 2 and not train & val
    b = augment.decode(stored["aachen_000000_000019"])
    assert b["image"].dtype == np.float32 and b["image"].max() <= 1.0
    assert b["semseg"].dtype == np.int32 and b["index"].dtype == np.int32
    assert b["depth"].dtype == np.float32 and b["depth"].shape == (H, W, 1)
    assert b["normals"].dtype == np.float32 and b["intrinsics"].dtype == np.float32
    valid = b["depth"][..., 0] > 0
    np.testing.assert_allclose(np.linalg.norm(b["normals"][valid], axis=-1), 1.0, atol=1e-5)


def test_raw_missing_folder(tmp_path):
    for manual in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ManualDataError) as e:
            registry.build("cityscapes", "128x256_7cls", data_dir=str(tmp_path / "d"),
                           manual_dir=manual)
        assert _tree_text(str(e.value)) and raw_mod.EXPECTED_TREE in str(e.value)
        assert "https://www.cityscapes-dataset.com/downloads/" in str(e.value)


def _raw_error(tmp_path, raw_tree, edit):
    manual = str(tmp_path / "m")
    shutil.copytree(raw_tree[0], manual)
    edit(manual)
    registry.build("cityscapes", "128x256_19cls", data_dir=str(tmp_path / "d"),
                   manual_dir=manual)


def _path(manual, package, k):
    split, city, name, _ = RAW_EXAMPLES[k]
    return os.path.join(manual, raw_mod._relpath(package, split, city, name))


def test_raw_missing_files(tmp_path, raw_tree):
    with pytest.raises(ManualDataError, match="frankfurt_000001_000538_disparity.png") as e:
        _raw_error(tmp_path / "a", raw_tree,
                   lambda m: os.remove(_path(m, "disparity", 4)))
    assert _tree_text(str(e.value))
    with pytest.raises(ManualDataError, match="bochum_000000_000313_camera.json"):
        _raw_error(tmp_path / "b", raw_tree, lambda m: os.remove(_path(m, "camera", 2)))
    with pytest.raises(ManualDataError, match="disparity/val"):
        _raw_error(tmp_path / "c", raw_tree,
                   lambda m: shutil.rmtree(os.path.join(m, "disparity", "val")))


def test_raw_bad_files(tmp_path, raw_tree):
    def label_200(manual):
        ids = np.full((64, 128), 7, np.uint8)
        ids[5, 5] = 200
        Image.fromarray(ids).save(_path(manual, "gtFine", 3))
    with pytest.raises(BadFileError, match="frankfurt_000000_000294_gtFine_labelIds.png.*200"):
        _raw_error(tmp_path / "a", raw_tree, label_200)

    def disparity_8bit(manual):
        Image.fromarray(np.full((64, 128), 9, np.uint8)).save(_path(manual, "disparity", 2))
    with pytest.raises(BadFileError, match="bochum_000000_000313_disparity.png.*16-bit"):
        _raw_error(tmp_path / "b", raw_tree, disparity_8bit)

    def no_baseline(manual):
        with open(_path(manual, "camera", 0), "w") as f:
            json.dump({"extrinsic": {}, "intrinsic": {"fx": 1, "fy": 1, "u0": 0, "v0": 0}}, f)
    with pytest.raises(BadFileError, match="aachen_000000_000019_camera.json.*baseline"):
        _raw_error(tmp_path / "c", raw_tree, no_baseline)

    def size_mismatch(manual):
        Image.fromarray(np.full((32, 64), 7, np.uint8)).save(_path(manual, "gtFine", 0))
    with pytest.raises(BadFileError, match="aachen_000000_000019_gtFine_labelIds.png.*shape"):
        _raw_error(tmp_path / "d", raw_tree, size_mismatch)


def test_raw_example_in_both_splits(tmp_path, raw_tree):
    def leak(manual):
        for package in raw_mod._SUFFIX:
            src = _path(manual, package, 0)
            dst = src.replace(os.sep + "train" + os.sep, os.sep + "val" + os.sep)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)
    with pytest.raises(BadFileError, match="both train and val.*aachen_000000_000019"):
        _raw_error(tmp_path, raw_tree, leak)
