"""The ISPRS Potsdam builder on the tiny fake download of ``fake_datasets.potsdam`` (70x100
images, 32x32 tiles)."""

import os

import numpy as np
import pytest
from fake_datasets.potsdam import TRAIN, VAL, H, W, write_tree
from PIL import Image

from mtl_jax.data import augment, registry
from mtl_jax.data import isprs_potsdam as P
from mtl_jax.data.manual import BadFileError, ManualDataError

T = 32
PER_IMAGE = (H // T) * (W // T)  # 2 * 3 = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    manual = str(tmp_path_factory.mktemp("potsdam_manual"))
    data = write_tree(manual)
    data_dir = str(tmp_path_factory.mktemp("potsdam_tfds"))
    registry.build("isprs_potsdam", config="tile32", data_dir=data_dir, manual_dir=manual)
    src = {s: registry.open_split("isprs_potsdam", s, config="tile32", data_dir=data_dir)
           for s in ("train", "val")}
    return data, src


def test_names_and_constants():
    assert P.dsm_names("2_10")[0] == "1_DSM_normalisation/dsm_potsdam_02_10_normalized_lastools.jpg"
    assert P.dsm_names("6_7") == (
        "1_DSM_normalisation/dsm_potsdam_06_07_normalized_lastools.jpg",
        "1_DSM_normalisation/dsm_potsdam_6_7_normalized_lastools.jpg")
    assert P.rgb_name("7_13") == "2_Ortho_RGB/top_potsdam_7_13_RGB.tif"
    assert len(P.TRAIN_TILES) == 24 and len(P.VAL_TILES) == 14
    assert not set(P.TRAIN_TILES) & set(P.VAL_TILES)
    # 6000x6000 at 256: 23 x 23 tiles, 112 pixels dropped at the right and bottom.
    assert P.tile_grid(6000, 6000, 256) == (23, 23) and 6000 - 23 * 256 == 112
    assert 24 * 23 * 23 == 12_696 and 14 * 23 * 23 == 7_406
    assert P.tile_grid(H, W, T) == (2, 3)
    cls = registry.get_builder("isprs_potsdam").__class__
    assert cls.REGISTRY_NAME == "isprs_potsdam" and cls.NUM_CLASSES == 6
    assert set(cls.builder_configs) == {"256", "tile32"}
    assert registry.get_builder("isprs_potsdam").builder_config.tile_size == 256


def test_split_sizes_fields_and_order(built):
    _, src = built
    assert len(src["train"]) == len(TRAIN) * PER_IMAGE == 12
    assert len(src["val"]) == len(VAL) * PER_IMAGE == 6
    ex = src["train"][0]
    assert set(ex) == {"image", "semseg", "depth", "index", "source_tile", "tile_row",
                       "tile_col"}
    assert ex["image"].shape == (T, T, 3) and ex["image"].dtype == np.uint8
    assert ex["semseg"].shape == (T, T) and ex["semseg"].dtype == np.int16
    assert ex["depth"].shape == (T, T, 1) and ex["depth"].dtype == np.float32
    for split, tiles in (("train", TRAIN), ("val", VAL)):
        origins = [(int(src[split][i]["source_tile"]), int(src[split][i]["tile_row"]),
                    int(src[split][i]["tile_col"])) for i in range(len(src[split]))]
        expected = [(100 * P._parse_tile(t)[0] + P._parse_tile(t)[1], r, c)
                    for t in tiles for r in range(2) for c in range(3)]  # row-major
        assert origins == expected
        assert [int(src[split][i]["index"]) for i in range(len(src[split]))] == list(
            range(len(src[split])))
    train_src = {int(src["train"][i]["source_tile"]) for i in range(len(src["train"]))}
    val_src = {int(src["val"][i]["source_tile"]) for i in range(len(src["val"]))}
    assert train_src == {210, 607} and val_src == {713} and not train_src & val_src


def test_tile_content_matches_source_crop(built):
    data, src = built
    seen_classes = set()
    for split, tiles in (("train", TRAIN), ("val", VAL)):
        for i in range(len(src[split])):
            ex = src[split][i]
            tile = tiles[i // PER_IMAGE]
            r, c = int(ex["tile_row"]), int(ex["tile_col"])
            ys, xs = slice(r * T, (r + 1) * T), slice(c * T, (c + 1) * T)
            d = data[tile]
            np.testing.assert_array_equal(ex["image"], d["image"][ys, xs])
            np.testing.assert_array_equal(ex["semseg"], d["classes"][ys, xs])
            seen_classes |= set(np.unique(ex["semseg"]).tolist())
            # Exactly the documented conversion of what the JPEG decodes to ...
            np.testing.assert_allclose(ex["depth"][..., 0],
                                       1.0 + d["grey_read"][ys, xs] / 255.0, atol=1e-6)
            # ... and close to the grey levels written (JPEG is lossy).
            err = np.abs(ex["depth"][..., 0] - (1.0 + d["grey"][ys, xs] / 255.0))
            assert err.mean() < 2.0 / 255 and err.max() < 24.0 / 255
            assert ex["depth"].min() >= 1.0 and ex["depth"].max() <= 2.0  # ground stays valid
    assert seen_classes == set(range(6))
    # Some tiles reach the ground (grey 0 -> depth 1.0): no pixel is invalid (<= 0).
    assert min(float(src["train"][i]["depth"].min()) for i in range(12)) < 1.0 + 3 / 255


def test_decode_dtypes(built):
    _, src = built
    out = augment.decode(src["val"][3])
    assert out["image"].dtype == np.float32 and 0.0 <= out["image"].min() <= 1.0
    assert out["image"].max() <= 1.0
    assert out["semseg"].dtype == np.int32 and out["semseg"].shape == (T, T)
    assert out["depth"].dtype == np.float32 and out["depth"].shape == (T, T, 1)
    assert out["index"].dtype == np.int32 and int(out["index"]) == 3
    assert out["example_mask"] == 1.0
    assert "normals" not in out and "intrinsics" not in out and "edges" not in out


def test_labels_for_participants_folder_name(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), label_dir="5_Labels_for_participants", tiles=("2_10", "2_13"))
    d = str(tmp_path / "tfds")
    registry.build("isprs_potsdam", config="tile32", data_dir=d, manual_dir=str(manual))
    assert len(registry.open_split("isprs_potsdam", "train", config="tile32", data_dir=d)) == 6
    assert len(registry.open_split("isprs_potsdam", "val", config="tile32", data_dir=d)) == 6


# ----------------------------------------------------------------------------------- errors
def _build(manual, tmp_path):
    return registry.build("isprs_potsdam", config="tile32", data_dir=str(tmp_path / "tfds"),
                          manual_dir=None if manual is None else str(manual))


@pytest.mark.parametrize("manual", [None, "does/not/exist"])
def test_missing_manual_folder(tmp_path, manual):
    if manual is not None:
        manual = tmp_path / manual
    with pytest.raises(ManualDataError) as e:
        _build(manual, tmp_path)
    msg = str(e.value)
    assert P.DOWNLOAD_URL in msg and "Expected tree" in msg
    assert "dsm_potsdam_{aa}_{bb}_normalized_lastools.jpg" in msg


def test_missing_label_file(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual))
    os.remove(manual / P.label_name("6_7"))
    with pytest.raises(ManualDataError, match="5_Labels_all/top_potsdam_6_7_label.tif"):
        _build(manual, tmp_path)


def test_missing_dsm_file(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), tiles=("2_10", "7_13"))
    os.remove(manual / P.dsm_names("2_10")[0])
    with pytest.raises(ManualDataError, match="dsm_potsdam_02_10_normalized_lastools.jpg"):
        _build(manual, tmp_path)


def test_missing_label_folder(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), tiles=("2_10", "7_13"))
    os.rename(manual / "5_Labels_all", manual / "labels")
    with pytest.raises(ManualDataError, match="5_Labels_all"):
        _build(manual, tmp_path)


def test_split_without_any_tile(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), tiles=("2_10",))  # no val tile at all
    with pytest.raises(ManualDataError) as e:
        _build(manual, tmp_path)
    assert "val tile" in str(e.value) and "2_13" in str(e.value) and "7_13" in str(e.value)


def test_wrong_label_colour(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), tiles=("2_10", "7_13"))
    path = manual / P.label_name("7_13")
    with Image.open(path) as im:
        labels = np.asarray(im).copy()
    labels[5, 7] = (12, 34, 56)
    labels[6, 7] = (12, 34, 56)
    Image.fromarray(labels).save(path)
    with pytest.raises(BadFileError) as e:
        _build(manual, tmp_path)
    msg = str(e.value)
    assert "top_potsdam_7_13_label.tif" in msg and "(12, 34, 56) x 2" in msg
    assert "2 of 7000 pixels" in msg


def test_dsm_of_wrong_size(tmp_path):
    manual = tmp_path / "manual"
    write_tree(str(manual), tiles=("2_10", "7_13"))
    path = manual / P.dsm_names("2_10")[0]
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(path)
    with pytest.raises(BadFileError, match="dsm_potsdam_02_10"):
        _build(manual, tmp_path)


def test_labels_from_colours_all_classes():
    rgb = np.array([P.CLASS_COLOURS], np.uint8)  # [1, 6, 3]
    np.testing.assert_array_equal(P.labels_from_colours("x.tif", rgb), [[0, 1, 2, 3, 4, 5]])
    assert P.labels_from_colours("x.tif", rgb).dtype == np.int16
    with pytest.raises(BadFileError, match=r"x\.tif.*\(0, 0, 0\) x 1"):
        P.labels_from_colours("x.tif", np.zeros((1, 1, 3), np.uint8))
