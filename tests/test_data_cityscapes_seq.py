"""The Cityscapes sequence builder (``cityscapes_seq``) on the tiny fake folder of
``fake_datasets.cityscapes.write_seq``: fields and shapes of the triplets, the frames chosen,
labels, intrinsics scaled to the stored size, depth from disparity (optional), and one-line
errors for a folder without frames or camera files, a missing neighbour frame and camera files
that do not describe the images read."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_datasets.cityscapes import SEQ_EXAMPLES, SEQ_H, SEQ_W, write_seq

from mtl_jax.data import augment, registry
from mtl_jax.data import cityscapes_seq as seq_mod
from mtl_jax.data.manual import BadFileError, ManualDataError, resize_image, resize_nearest
from mtl_jax.errors import UserError

CONFIG = "128x256_16cls"
H, W = 128, 256  # stored: twice the 64x128 files

# Hand-written from the official label table (as in test_data_cityscapes): labelIds -> DenseMTL's
# 16 classes.
_ = -1
EXPECTED_16 = [_, _, _, _, _, _, _, 0, 1, _, _, 2, 3, 4, _, _, _, 5, _, 6, 7, 8, _, 9, 10, 11,
               12, _, 13, _, _, _, 14, 15]


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bar():
    tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def seq_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes_seq_manual"))
    return root, write_seq(root)


@pytest.fixture(scope="module")
def built(seq_tree, tmp_path_factory):
    manual, written = seq_tree
    data_dir = str(tmp_path_factory.mktemp("cityscapes_seq_tfds"))
    registry.build("cityscapes_seq", CONFIG, data_dir=data_dir, manual_dir=manual)
    return data_dir, written


def test_configs():
    cls = seq_mod.MtlCityscapesSeq
    assert cls.DEFAULT_CONFIG_NAME == "512x1024_16cls"  # the released code's 1024x512 frames
    assert CONFIG in cls.builder_configs and cls.NUM_CLASSES["512x1024_16cls"] == 16
    assert len(cls.CLASS_NAMES[16]) == 16 and cls.registry_name() == "cityscapes_seq"
    assert seq_mod.frame_name("bochum_000000_000313", -1) == "bochum_000000_000312"


def test_triplets_fields_frames_labels_intrinsics_depth(built):
    data_dir, written = built
    for split in ("train", "val"):
        src = registry.open_split("cityscapes_seq", split, CONFIG, data_dir)
        names = [n for s, _, n in SEQ_EXAMPLES if s == split]
        assert len(src) == len(names)
        for i, name in enumerate(names):
            ex, w = src[i], written[name]
            assert set(ex) == {"image", "image_prev", "image_next", "semseg", "depth",
                               "intrinsics", "index"}
            assert int(ex["index"]) == i
            # frames t-1, t, t+1 of the snippet (not t-2 / t+2), resized bilinearly
            for key, offset in (("image_prev", -1), ("image", 0), ("image_next", 1)):
                assert ex[key].dtype == np.uint8 and ex[key].shape == (H, W, 3)
                np.testing.assert_array_equal(ex[key], resize_image(w["frames"][offset], H, W))
            assert ex["semseg"].dtype == np.int16 and ex["semseg"].shape == (H, W)
            lut = np.array(EXPECTED_16, np.int16)
            np.testing.assert_array_equal(ex["semseg"], lut[resize_nearest(w["ids"], H, W)])
            k, s = w["camera"]["intrinsic"], W / SEQ_W
            assert H / SEQ_H == s == 2
            assert ex["intrinsics"].dtype == np.float32
            np.testing.assert_allclose(ex["intrinsics"], [k["fx"] * s, k["fy"] * s,
                                                          (k["u0"] + 0.5) * s - 0.5,
                                                          (k["v0"] + 0.5) * s - 0.5], rtol=1e-6)
            p = resize_nearest(w["disparity"], H, W).astype(np.float64)
            expected = np.where(p > 1, w["camera"]["extrinsic"]["baseline"] * k["fx"] * 256.0
                                / np.maximum(p - 1, 1), 0.0)
            assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (H, W, 1)
            np.testing.assert_allclose(ex["depth"][..., 0], expected, rtol=1e-5)
            assert np.all(ex["depth"][:8] == 0)  # invalid rows stay invalid
    b = augment.decode(src[0])
    for key in ("image", "image_prev", "image_next"):
        assert b[key].dtype == np.float32 and b[key].max() <= 1.0


def test_disparity_is_optional(tmp_path):
    manual = str(tmp_path / "m")
    write_seq(manual, disparity=False)
    data_dir = str(tmp_path / "d")
    registry.build("cityscapes_seq", CONFIG, data_dir=data_dir, manual_dir=manual)
    ex = registry.open_split("cityscapes_seq", "val", CONFIG, data_dir)[0]
    assert ex["depth"].shape == (H, W, 1) and np.all(ex["depth"] == 0)  # all invalid


def _error(tmp_path, seq_tree, edit):
    manual = str(tmp_path / "m")
    shutil.copytree(seq_tree[0], manual)
    edit(manual)
    registry.build("cityscapes_seq", CONFIG, data_dir=str(tmp_path / "d"), manual_dir=manual)


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("package,zip_name", [
    ("leftImg8bit_sequence", "leftImg8bit_sequence_trainvaltest.zip"),
    ("camera", "camera_trainvaltest.zip"),
])
def test_folder_without_frames_or_cameras(tmp_path, seq_tree, package, zip_name):
    with pytest.raises(ManualDataError) as e:
        _error(tmp_path, seq_tree, lambda m: shutil.rmtree(os.path.join(m, package)))
    _one_line(e, f"has no {package}/ folder", zip_name, "unpack it into")
    with pytest.raises(ManualDataError) as e:
        _error(tmp_path / "val", seq_tree,
               lambda m: shutil.rmtree(os.path.join(m, package, "val")))
    _one_line(e, f"has no {package}/val/ folder", zip_name)


@pytest.mark.parametrize("offset,which", [(-1, "t-1"), (1, "t+1")])
def test_missing_neighbour_frame(tmp_path, seq_tree, offset, which):
    split, city, name = SEQ_EXAMPLES[2]
    frame = seq_mod.frame_name(name, offset)
    rel = f"leftImg8bit_sequence/{split}/{city}/{frame}_leftImg8bit.png"
    with pytest.raises(ManualDataError) as e:
        _error(tmp_path, seq_tree, lambda m: os.remove(os.path.join(m, rel)))
    _one_line(e, f"frame {which} of the annotated frame {name}", rel,
              "leftImg8bit_sequence_trainvaltest.zip")


def test_missing_camera_file(tmp_path, seq_tree):
    split, city, name = SEQ_EXAMPLES[3]
    rel = f"camera/{split}/{city}/{name}_camera.json"
    with pytest.raises(ManualDataError) as e:
        _error(tmp_path, seq_tree, lambda m: os.remove(os.path.join(m, rel)))
    _one_line(e, rel, "camera_trainvaltest.zip")


def test_intrinsics_that_do_not_match_the_images(tmp_path, seq_tree):
    """The full-resolution camera file with a resized (here 64x128) image: the principal point
    (1096.98, 513.14) lies outside the image read."""
    split, city, name = SEQ_EXAMPLES[1]
    rel = f"camera/{split}/{city}/{name}_camera.json"

    def full_resolution_camera(manual):
        with open(os.path.join(manual, rel), "w") as f:
            json.dump({"extrinsic": {"baseline": 0.209},
                       "intrinsic": {"fx": 2262.52, "fy": 2265.30, "u0": 1096.98,
                                     "v0": 513.137}}, f)
    with pytest.raises(BadFileError) as e:
        _error(tmp_path, seq_tree, full_resolution_camera)
    _one_line(e, rel, "(1096.98, 513.137)", f"outside the {SEQ_W}x{SEQ_H} image",
              f"{name}_leftImg8bit.png", "full-resolution 2048x1024")


def test_frames_of_different_sizes(tmp_path, seq_tree):
    split, city, name = SEQ_EXAMPLES[0]
    rel = f"leftImg8bit_sequence/{split}/{city}/{seq_mod.frame_name(name, 1)}_leftImg8bit.png"

    def small_next_frame(manual):
        from PIL import Image
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(os.path.join(manual, rel))
    with pytest.raises(BadFileError) as e:
        _error(tmp_path, seq_tree, small_next_frame)
    _one_line(e, rel, "shape")
