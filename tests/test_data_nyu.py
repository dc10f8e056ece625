"""The ``nyuv2`` (MTAN .npy export) and ``nyud_mt`` (NYUD_MT folder) builders, on the tiny fake
folders of ``fake_datasets.nyu`` (exact on-disk formats, real stored resolutions)."""

import hashlib
import os

import numpy as np
import pytest
from fake_datasets.nyu import blocks, write_nyud, write_nyuv2
from PIL import Image

from mtl_jax.data import augment, nyud_mt, nyuv2, registry
from mtl_jax.data.manual import BadFileError, ManualDataError, read_image

KINECT = np.array([518.8579, 519.4696, 325.5824, 253.7362])


def _expected_intrinsics(h, w):
    sx, sy = w / 640, h / 480
    fx, fy, cx, cy = KINECT
    return np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5])


def _digest(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------ nyuv2
@pytest.fixture(scope="module")
def nyuv2_built(tmp_path_factory):
    manual = str(tmp_path_factory.mktemp("nyuv2_manual"))
    data = str(tmp_path_factory.mktemp("nyuv2_tfds"))
    written = write_nyuv2(manual)
    registry.build("nyuv2", data_dir=data, manual_dir=manual)
    return data, written


def test_nyuv2_fields(nyuv2_built):
    data, written = nyuv2_built
    intr = _expected_intrinsics(288, 384)
    np.testing.assert_allclose(intr, [311.31474, 311.68176, 195.14944, 152.04172], atol=1e-4)
    for split, exs in written.items():
        src = registry.open_split("nyuv2", split, data_dir=data)
        assert len(src) == len(exs)
        for i, want in enumerate(exs):
            ex = src[i]
            assert set(ex) == {"image", "semseg", "depth", "normals", "intrinsics", "index"}
            assert int(ex["index"]) == i
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (288, 384, 3)
            np.testing.assert_array_equal(ex["image"], want["image"])
            assert ex["semseg"].dtype == np.int16 and ex["semseg"].shape == (288, 384)
            np.testing.assert_array_equal(ex["semseg"], want["label"].astype(np.int16))
            assert ex["semseg"].min() == -1  # ignore kept
            assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (288, 384, 1)
            np.testing.assert_array_equal(ex["depth"], want["depth"])  # metres, as stored
            assert np.all(ex["depth"][:40] == 0) and np.all(ex["depth"][40:] > 0)
            assert ex["normals"].dtype == np.float16 and ex["normals"].shape == (288, 384, 3)
            np.testing.assert_array_equal(ex["normals"], want["normal"].astype(np.float16))
            assert np.all(ex["normals"][:, :30] == 0)
            np.testing.assert_allclose(ex["intrinsics"], intr, rtol=1e-6)


def test_nyuv2_splits_disjoint_and_decode(nyuv2_built):
    data, _ = nyuv2_built
    train = registry.open_split("nyuv2", "train", data_dir=data)
    val = registry.open_split("nyuv2", "val", data_dir=data)
    assert not {_digest(train[i]["image"]) for i in range(len(train))} & {
        _digest(val[i]["image"]) for i in range(len(val))}
    out = augment.decode(val[0])
    assert out["image"].dtype == np.float32 and 0 <= out["image"].min() <= out["image"].max() <= 1
    assert out["semseg"].dtype == np.int32 and out["depth"].dtype == np.float32
    assert out["normals"].dtype == np.float32 and out["intrinsics"].dtype == np.float32
    assert out["index"].dtype == np.int32


def test_nyuv2_class_info():
    assert nyuv2.MtlNyuv2.NUM_CLASSES == len(nyuv2.MtlNyuv2.CLASS_NAMES) == 13
    assert nyuv2.MtlNyuv2.REGISTRY_NAME == "nyuv2"
    text = nyuv2.MtlNyuv2.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "lorenmt/mtan" in text and nyuv2.MtlNyuv2.EXPECTED_TREE in text


@pytest.mark.parametrize("manual", [None, "does_not_exist", "empty"])
def test_nyuv2_no_manual_folder(tmp_path, manual):
    if manual is not None:
        manual = str(tmp_path / manual)
        if manual.endswith("empty"):
            os.makedirs(manual)
    with pytest.raises(ManualDataError) as e:
        registry.build("nyuv2", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    msg = str(e.value)
    assert nyuv2.MtlNyuv2.EXPECTED_TREE in msg and "https://github.com/lorenmt/mtan" in msg


def test_nyuv2_missing_file(tmp_path):
    manual = str(tmp_path / "m")
    write_nyuv2(manual, (("train", 2), ("val", 2)))
    os.remove(os.path.join(manual, "val", "depth", "1.npy"))
    with pytest.raises(ManualDataError, match=r"val/depth/1\.npy"):
        registry.build("nyuv2", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_nyuv2_bad_label(tmp_path):
    manual = str(tmp_path / "m")
    write_nyuv2(manual, (("train", 1), ("val", 1)))
    path = os.path.join(manual, "val", "label", "0.npy")
    label = np.load(path)
    label[5, 7] = 13
    np.save(path, label)
    with pytest.raises(BadFileError, match=r"val/label/0\.npy.*13"):
        registry.build("nyuv2", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    # nothing half-written stays behind: once the file is fixed the build succeeds
    label[5, 7] = 12
    np.save(path, label)
    registry.build("nyuv2", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    assert len(registry.open_split("nyuv2", "val", data_dir=str(tmp_path / "tfds"))) == 1


def test_nyuv2_bad_depth_unit(tmp_path):
    manual = str(tmp_path / "m")
    write_nyuv2(manual, (("train", 1), ("val", 1)))
    path = os.path.join(manual, "train", "depth", "0.npy")
    np.save(path, np.load(path) * 1000.0)  # millimetres
    with pytest.raises(BadFileError, match=r"train/depth/0\.npy"):
        registry.build("nyuv2", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


# ---------------------------------------------------------------------------------- nyud_mt
#: Normal-map colours: left half grey (invalid), upper right (255,128,0), lower right blue.
N_UPPER = np.array([1.0, 2 * 128 / 255 - 1, -1.0])
N_LOWER = np.array([2 * 128 / 255 - 1, 2 * 128 / 255 - 1, 1.0])


def _unit(v):
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def nyud_built(tmp_path_factory):
    manual = str(tmp_path_factory.mktemp("nyud_manual"))
    data = str(tmp_path_factory.mktemp("nyud_tfds"))
    written = write_nyud(manual)
    for config in ("60x80", "480x640"):
        registry.build("nyud_mt", config, data_dir=data, manual_dir=manual)
    return data, manual, written


def _names(manual, split):
    with open(os.path.join(manual, "gt_sets", f"{split}.txt")) as f:
        return f.read().split()


def _check_small(ex, want, i):
    assert int(ex["index"]) == i
    shapes = {"image": (60, 80, 3), "semseg": (60, 80), "depth": (60, 80, 1),
              "normals": (60, 80, 3), "edges": (60, 80), "intrinsics": (4,)}
    for key, shape in shapes.items():
        assert ex[key].shape == shape, key
    assert ex["semseg"].dtype == np.int16
    np.testing.assert_array_equal(ex["semseg"], want["seg"].astype(np.int16) - 1)
    assert ex["depth"].dtype == np.float32
    np.testing.assert_array_equal(ex["depth"][..., 0], want["depth"])  # metres; 0 stays 0
    assert ex["edges"].dtype == np.int8
    np.testing.assert_array_equal(ex["edges"], (want["edge"] > 0).astype(np.int8))
    n = ex["normals"].astype(np.float32)
    assert ex["normals"].dtype == np.float16
    assert np.all(n[:, :40] == 0)  # grey (128,128,128) is invalid
    np.testing.assert_allclose(np.linalg.norm(n[:, 40:], axis=-1), 1.0, atol=2e-3)
    # the invalid zeros on the left never tilt the valid normals at the border (column 40)
    np.testing.assert_allclose(n[:28, 40:], np.broadcast_to(_unit(N_UPPER), (28, 40, 3)),
                               atol=2e-3)
    np.testing.assert_allclose(n[32:, 40:], np.broadcast_to(_unit(N_LOWER), (28, 40, 3)),
                               atol=2e-3)
    np.testing.assert_allclose(ex["intrinsics"], _expected_intrinsics(60, 80), rtol=1e-6)


def test_nyud_fields_60x80(nyud_built):
    data, manual, written = nyud_built
    for split in ("train", "val"):
        names = _names(manual, split)
        src = registry.open_split("nyud_mt", split, "60x80", data_dir=data)
        assert len(src) == len(names)
        for i, name in enumerate(names):
            _check_small(src[i], written[name], i)


def test_nyud_native_480x640(nyud_built):
    data, manual, written = nyud_built
    src = registry.open_split("nyud_mt", "train", "480x640", data_dir=data)
    names = _names(manual, "train")
    assert len(src) == len(names)
    for i, name in enumerate(names):
        ex = src[i]
        assert int(ex["index"]) == i
        # record i is line i of the list: the image is the decoded JPEG, unresized
        np.testing.assert_array_equal(
            ex["image"], read_image(os.path.join(manual, "images", name + ".jpg")))
        sem = ex["semseg"]
        assert sem.shape == (480, 640)
        np.testing.assert_array_equal(sem, blocks(written[name]["seg"].astype(np.int16) - 1))
        assert sem.min() >= -1 and sem.max() <= 39
        assert ex["depth"].shape == (480, 640, 1) and ex["edges"].shape == (480, 640)
        n = ex["normals"].astype(np.float32)
        # PNG (255,128,0) -> (1, 1/255, -1), renormalised: about (0.7071, 0.0028, -0.7071)
        np.testing.assert_allclose(n[10, 400], [0.70710, 0.00277, -0.70710], atol=1e-3)
        np.testing.assert_allclose(n[300, 600], _unit(N_LOWER), atol=1e-3)
        assert np.all(n[:, :320] == 0)
        np.testing.assert_allclose(ex["intrinsics"], KINECT, rtol=1e-6)


def test_nyud_splits_disjoint_and_decode(nyud_built):
    data, _, _ = nyud_built
    train = registry.open_split("nyud_mt", "train", "480x640", data_dir=data)
    val = registry.open_split("nyud_mt", "val", "480x640", data_dir=data)
    assert not {_digest(train[i]["image"]) for i in range(len(train))} & {
        _digest(val[i]["image"]) for i in range(len(val))}
    out = augment.decode(val[1])
    assert out["image"].dtype == np.float32
    for key in ("semseg", "edges", "index"):
        assert out[key].dtype == np.int32, key
    for key in ("depth", "normals", "intrinsics"):
        assert out[key].dtype == np.float32, key
    assert set(np.unique(out["edges"])) <= {0, 1}


def test_nyud_configs_and_default_448x576(tmp_path):
    cls = nyud_mt.MtlNyudMt
    assert {c.name for c in cls.BUILDER_CONFIGS} == {"448x576", "480x640", "60x80"}
    assert cls.NUM_CLASSES == len(cls.CLASS_NAMES) == 40
    builder = registry.get_builder("nyud_mt", data_dir=str(tmp_path / "tfds"))
    assert builder.builder_config.name == "448x576"
    manual = str(tmp_path / "m")
    write_nyud(manual, train=("a",), val=("b",))
    registry.build("nyud_mt", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    ex = registry.open_split("nyud_mt", "val", data_dir=str(tmp_path / "tfds"))[0]
    assert ex["image"].shape == (448, 576, 3) and ex["semseg"].shape == (448, 576)
    assert ex["depth"].shape == (448, 576, 1) and ex["normals"].shape == (448, 576, 3)
    assert ex["edges"].shape == (448, 576)
    np.testing.assert_allclose(ex["intrinsics"], _expected_intrinsics(448, 576), rtol=1e-6)
    np.testing.assert_allclose(ex["intrinsics"][:2], [466.97211, 484.83829], rtol=1e-6)
    n = ex["normals"].astype(np.float32)
    norm = np.linalg.norm(n, axis=-1)
    assert np.all((norm == 0) | (np.abs(norm - 1) < 2e-3))


def test_nyud_mti_net_variant(tmp_path):
    """Images as .png, normals and edges as .npy (the MTI-Net export) read the same."""
    manual = str(tmp_path / "m")
    written = write_nyud(manual, train=("a", "c"), val=("b",), mti_variant=True)
    data = str(tmp_path / "tfds")
    registry.build("nyud_mt", "60x80", data_dir=data, manual_dir=manual)
    for split in ("train", "val"):
        src = registry.open_split("nyud_mt", split, "60x80", data_dir=data)
        for i, name in enumerate(_names(manual, split)):
            _check_small(src[i], written[name], i)


@pytest.mark.parametrize("manual", [None, "does_not_exist"])
def test_nyud_no_manual_folder(tmp_path, manual):
    if manual is not None:
        manual = str(tmp_path / manual)
    with pytest.raises(ManualDataError) as e:
        registry.build("nyud_mt", "60x80", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    msg = str(e.value)
    assert nyud_mt.MtlNyudMt.EXPECTED_TREE in msg
    assert "https://github.com/SimonVandenhende/Multi-Task-Learning-PyTorch" in msg


def test_nyud_missing_file(tmp_path):
    manual = str(tmp_path / "m")
    write_nyud(manual, train=("a", "c"), val=("b",))
    os.remove(os.path.join(manual, "depth", "c.npy"))
    with pytest.raises(ManualDataError, match=r"depth/c\.npy"):
        registry.build("nyud_mt", "60x80", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_nyud_missing_list(tmp_path):
    manual = str(tmp_path / "m")
    write_nyud(manual, train=("a",), val=("b",))
    os.remove(os.path.join(manual, "gt_sets", "val.txt"))
    with pytest.raises(ManualDataError, match=r"gt_sets/val\.txt"):
        registry.build("nyud_mt", "60x80", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_nyud_bad_label(tmp_path):
    manual = str(tmp_path / "m")
    write_nyud(manual, train=("a",), val=("b",))
    path = os.path.join(manual, "segmentation", "b.png")
    seg = np.asarray(Image.open(path)).copy()
    seg[100, 100] = 41
    Image.fromarray(seg).save(path)
    with pytest.raises(BadFileError, match=r"segmentation/b\.png"):
        registry.build("nyud_mt", "60x80", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_nyud_lists_overlap(tmp_path):
    manual = str(tmp_path / "m")
    write_nyud(manual, train=("a", "b"), val=("b",))
    with pytest.raises(BadFileError, match="share"):
        registry.build("nyud_mt", "60x80", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
