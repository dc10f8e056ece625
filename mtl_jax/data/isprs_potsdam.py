"""TFDS builder of ISPRS Potsdam (2D semantic labelling) cut into tiles (``isprs_potsdam``).

Reads the folder the user downloaded from the ISPRS benchmark page (registration needed,
nothing is downloaded here) and writes ``array_record``: semantic segmentation (6 classes)
and a height target in ``depth``, no normals, edges or intrinsics (an orthophoto has no
pinhole camera).

**Files read** (one source image per tile id ``a_b``, e.g. ``2_10``):

* ``2_Ortho_RGB/top_potsdam_{a}_{b}_RGB.tif`` -- the true orthophoto, 8-bit RGB TIFF,
  6000 × 6000 pixels at 5 cm;
* ``5_Labels_all/top_potsdam_{a}_{b}_label.tif`` (or the same names in
  ``5_Labels_for_participants/``) -- the colour-coded reference labels, RGB TIFF;
* ``1_DSM_normalisation/dsm_potsdam_{aa}_{bb}_normalized_lastools.jpg`` -- the normalised DSM
  (nDSM, height above the ground), 8-bit greyscale JPEG. The release zero-pads both parts of
  the tile id to two digits (``dsm_potsdam_02_10_...`` for tile ``2_10``, ``06_07`` for
  ``6_7``); unpadded names (``dsm_potsdam_2_10_...``) are accepted too.

**Classes** (``semseg``, int16) by the label colour, matched exactly:

==  ====================  ===============
id  class                 colour (R, G, B)
==  ====================  ===============
0   impervious surfaces   (255, 255, 255)
1   building              (0, 0, 255)
2   low vegetation        (0, 255, 255)
3   tree                  (0, 255, 0)
4   car                   (255, 255, 0)
5   clutter/background    (255, 0, 0)
==  ====================  ===============

Any other colour makes the label file a :class:`~mtl_jax.data.manual.BadFileError` (the
message names the file, the number of such pixels and the most frequent colours); there is
no ignore value in this dataset.

**Height target** (``depth``, float32 ``[H, W, 1]``): ``depth = 1 + g / 255`` where ``g`` is
the nDSM's 8-bit grey level. The nDSM JPEG is a *relative* height above ground: the release
does not give the metres per grey level, so ``g / 255`` (in [0, 1], 0 = ground) is the
height as a fraction of the file's full range. The constant offset ``DEPTH_OFFSET = 1`` keeps
ground pixels valid: the depth task treats values ``<= 0`` as invalid, and ground (``g = 0``)
is a large and meaningful part of the target, so every pixel is valid (values in [1, 2]).
Consequences: ``abs_err`` and ``rmse`` are errors of the normalised height ``g / 255``
(the offset cancels); ``abs_rel`` and the ``delta`` ratios are computed on ``1 + g / 255``
and are therefore not comparable with relative errors published for metric heights. To get
the grey level back: ``g = 255 · (depth − 1)``. The training augmentation's scale-crop divides
``depth`` by the zoom factor (right for perspective depth, not for a height map seen from
above); consider training this dataset without scale augmentation (flip only).

**Tiles**: each source image is cut into non-overlapping ``T × T`` tiles (``T`` = the builder
config's tile size), ``floor(H / T) · floor(W / T)`` per image in row-major order; the
remainder at the right and bottom is dropped. At ``T = 256`` a 6000 × 6000 image gives
23 × 23 = 529 tiles and its last 6000 − 23 · 256 = 112 columns and rows are not used. Any
image size is accepted (the label and nDSM must have the photo's size).

**Splits** (the benchmark's): ``train`` = the 24 tiles with released labels used for
training, ``val`` = the benchmark's 14 test tiles. At ``T = 256``: 24 · 529 = 12,696 train
and 14 · 529 = 7,406 val examples. Tile ``7_10``'s label in the original release has a known
error; it is kept (as in the usual protocol). Tiles whose photo is absent are skipped with a
warning, but a split with none of its tiles present is an error, and a tile with a photo but
no label or nDSM is an error naming the missing file.

**Records** (record ``i`` of a split is example ``i``, ``disable_shuffling``): ``image``
uint8 ``[T, T, 3]``, ``semseg`` int16 ``[T, T]``, ``depth`` float32 ``[T, T, 1]``, ``index``
int32, and the tile's origin: ``source_tile`` int32 (``100 · a + b``, e.g. 210 for
``2_10``), ``tile_row`` / ``tile_col`` int32 (its position in the source image's grid; pixel
rows ``tile_row · T ...`` and columns ``tile_col · T ...``).

Builder configs: ``256`` (default, 256 × 256 tiles) and ``tile32`` (32 × 32 tiles, for tests
with small fake images).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data.manual import (
    BadFileError,
    ManualBuilder,
    check_depth,
    check_labels,
    check_shape,
    read_image,
    read_png,
)

log = logging.getLogger(__name__)

DOWNLOAD_URL = "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx"

#: The benchmark's training tiles (labels released to participants).
TRAIN_TILES: tuple[str, ...] = (
    "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12",
    "5_10", "5_11", "5_12", "6_7", "6_8", "6_9", "6_10", "6_11", "6_12",
    "7_7", "7_8", "7_9", "7_10", "7_11", "7_12",
)
#: The benchmark's test tiles, used as the ``val`` split.
VAL_TILES: tuple[str, ...] = (
    "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15",
    "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13",
)
SPLIT_TILES: dict[str, tuple[str, ...]] = {"train": TRAIN_TILES, "val": VAL_TILES}

RGB_DIR = "2_Ortho_RGB"
LABEL_DIRS = ("5_Labels_all", "5_Labels_for_participants")
DSM_DIR = "1_DSM_normalisation"

CLASS_NAMES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
#: Label colour (R, G, B) of each class id.
CLASS_COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0),
                 (255, 0, 0))
NUM_CLASSES = len(CLASS_NAMES)

#: ``depth = DEPTH_OFFSET + grey / DSM_MAX`` (see the module docstring).
DEPTH_OFFSET = 1.0
DSM_MAX = 255.0

EXPECTED_TREE = f"""\
FOLDER/
  {RGB_DIR}/top_potsdam_{{a}}_{{b}}_RGB.tif          orthophoto, 8-bit RGB TIFF (6000x6000)
  {LABEL_DIRS[0]}/top_potsdam_{{a}}_{{b}}_label.tif       colour-coded labels, RGB TIFF
      (the folder may also be named {LABEL_DIRS[1]}/)
  {DSM_DIR}/dsm_potsdam_{{aa}}_{{bb}}_normalized_lastools.jpg
      normalised DSM, 8-bit grey JPEG; tile ids zero-padded (tile 2_10 -> 02_10)
for the tiles a_b of
  train: {", ".join(TRAIN_TILES)}
  val (the benchmark's test tiles): {", ".join(VAL_TILES)}
(unzip 2_Ortho_RGB.zip, 5_Labels_all.zip and 1_DSM_normalisation.zip into FOLDER)"""


@dataclasses.dataclass
class PotsdamConfig(tfds.core.BuilderConfig):
    """Size ``tile_size × tile_size`` of the non-overlapping tiles cut from each image."""

    tile_size: int = 256


def _parse_tile(tile: str) -> tuple[int, int]:
    a, b = tile.split("_")
    return int(a), int(b)


def rgb_name(tile: str) -> str:
    return f"{RGB_DIR}/top_potsdam_{tile}_RGB.tif"


def label_name(tile: str, label_dir: str = LABEL_DIRS[0]) -> str:
    return f"{label_dir}/top_potsdam_{tile}_label.tif"


def dsm_names(tile: str) -> tuple[str, str]:
    """The nDSM's relative path as released (zero-padded ids) and the unpadded variant."""
    a, b = _parse_tile(tile)
    return (f"{DSM_DIR}/dsm_potsdam_{a:02d}_{b:02d}_normalized_lastools.jpg",
            f"{DSM_DIR}/dsm_potsdam_{a}_{b}_normalized_lastools.jpg")


def labels_from_colours(path: str, rgb: np.ndarray) -> np.ndarray:
    """Colour-coded label image uint8 ``[H, W, 3]`` -> class ids int16 ``[H, W]``.

    Raises :class:`BadFileError` naming ``path``, the number of pixels whose colour is not one
    of :data:`CLASS_COLOURS` and the most frequent such colours.
    """
    c = rgb.astype(np.int32)
    code = (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]
    out = np.full(code.shape, -2, np.int16)  # -2: not yet matched
    for k, (r, g, b) in enumerate(CLASS_COLOURS):
        out[code == ((r << 16) | (g << 8) | b)] = k
    bad = out == -2
    n_bad = int(bad.sum())
    if n_bad:
        values, counts = np.unique(code[bad], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:5]
        shown = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) x {n}"
                          for v, n in zip(values[order].tolist(), counts[order].tolist()))
        more = f" and {values.size - order.size} other colours" if values.size > 5 else ""
        raise BadFileError(
            f"{path}: {n_bad} of {code.size} pixels ({n_bad / code.size:.4%}) have colours that "
            f"are none of the {NUM_CLASSES} ISPRS classes {CLASS_COLOURS}: {shown}{more}")
    check_labels(path, out, NUM_CLASSES)
    return out


def height_from_dsm(path: str, grey: np.ndarray) -> np.ndarray:
    """nDSM grey levels uint8 ``[H, W]`` (or ``[H, W, 3]`` with equal channels) -> the stored
    ``depth`` float32 ``[H, W, 1]`` = ``DEPTH_OFFSET + grey / DSM_MAX`` (module docstring)."""
    if grey.ndim == 3:
        if grey.shape[-1] not in (3, 4) or not (np.array_equal(grey[..., 0], grey[..., 1])
                                                and np.array_equal(grey[..., 0], grey[..., 2])):
            raise BadFileError(f"{path}: expected a greyscale nDSM, got a colour image of "
                               f"shape {grey.shape}")
        grey = grey[..., 0]
    if grey.ndim != 2:
        raise BadFileError(f"{path}: expected a greyscale nDSM [H, W], got shape {grey.shape}")
    depth = (DEPTH_OFFSET + grey.astype(np.float32) / np.float32(DSM_MAX))[..., None]
    check_depth(path, depth, DEPTH_OFFSET + 1.0)
    return depth


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Rows and columns of non-overlapping ``tile × tile`` tiles in a ``height × width``
    image (the remainder is dropped)."""
    return height // tile, width // tile


class MtlIsprsPotsdam(ManualBuilder):
    """ISPRS Potsdam: 6-class semseg + normalised height (``depth = 1 + grey/255``) on
    non-overlapping tiles; see the module docstring for files, classes, unit and splits."""

    REGISTRY_NAME = "isprs_potsdam"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PotsdamConfig(name="256", tile_size=256,
                      description="non-overlapping 256x256 tiles (529 per 6000x6000 image)"),
        PotsdamConfig(name="tile32", tile_size=32,
                      description="non-overlapping 32x32 tiles (for tests with small images)"),
    ]
    DEFAULT_CONFIG_NAME = "256"
    DOWNLOAD_URL: ClassVar[str] = DOWNLOAD_URL
    EXPECTED_TREE: ClassVar[str] = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Register and download the Potsdam data from {DOWNLOAD_URL} (nothing is downloaded "
        f"for you) and arrange it as:\n{EXPECTED_TREE}\n"
        "then run: mtl-jax data build isprs_potsdam --manual_dir=FOLDER")
    NUM_CLASSES = NUM_CLASSES
    CLASS_NAMES = CLASS_NAMES
    TRAIN_TILES = TRAIN_TILES
    VAL_TILES = VAL_TILES

    FEATURES = dict(normals=False, intrinsics=False)

    def stored_size(self) -> tuple[int, int]:
        t = self.builder_config.tile_size
        return t, t

    def extra_features(self) -> dict:
        scalar = tfds.features.Scalar(dtype=np.int32)
        return {"source_tile": scalar, "tile_row": scalar, "tile_col": scalar}

    # ------------------------------------------------------------------------------ files
    def _label_dir(self, root: str) -> str:
        for d in LABEL_DIRS:
            if os.path.isdir(os.path.join(root, d)):
                return d
        raise self.missing(f"the label folder '{LABEL_DIRS[0]}' (or '{LABEL_DIRS[1]}')", root)

    def _dsm_path(self, root: str, tile: str) -> str:
        for rel in dsm_names(tile):
            if os.path.isfile(os.path.join(root, rel)):
                return rel
        raise self.missing(f"'{dsm_names(tile)[0]}' (the nDSM of tile {tile}, whose photo "
                           f"'{rgb_name(tile)}' is present)", root)

    def _split_files(self, root: str, split: str, label_dir: str
                     ) -> list[tuple[str, str, str, str]]:
        """``(tile, rgb, label, dsm)`` relative paths of the split's tiles that are present."""
        tiles = SPLIT_TILES[split]
        present = [t for t in tiles if os.path.isfile(os.path.join(root, rgb_name(t)))]
        if not present:
            raise self.missing(
                f"every {split} tile's photo ({RGB_DIR}/top_potsdam_{{a}}_{{b}}_RGB.tif for the "
                f"tiles {', '.join(tiles)})", root)
        absent = [t for t in tiles if t not in present]
        if absent:
            log.warning("isprs_potsdam: %d of the %d %s tiles have no photo in %s and are "
                        "skipped: %s", len(absent), len(tiles), split, root, ", ".join(absent))
        files = []
        for t in present:
            label = label_name(t, label_dir)
            if not os.path.isfile(os.path.join(root, label)):
                raise self.missing(f"'{label}' (the label of tile {t}, whose photo "
                                   f"'{rgb_name(t)}' is present)", root)
            files.append((t, rgb_name(t), label, self._dsm_path(root, t)))
        return files

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, [RGB_DIR, DSM_DIR])
        label_dir = self._label_dir(root)
        # Both splits' files are checked before anything is written.
        files = {split: self._split_files(root, split, label_dir) for split in SPLIT_TILES}
        return {split: self._generate_examples(root, f) for split, f in files.items()}

    # ---------------------------------------------------------------------------- examples
    def _read_source(self, root: str, rgb_rel: str, label_rel: str, dsm_rel: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Photo, class ids and height of one source image, validated."""
        t = self.builder_config.tile_size
        rgb_path, label_path, dsm_path = (os.path.join(root, p)
                                          for p in (rgb_rel, label_rel, dsm_rel))
        image = read_image(rgb_path)
        h, w = image.shape[:2]
        if h < t or w < t:
            raise BadFileError(f"{rgb_path}: the image ({h}x{w}) is smaller than one "
                               f"{t}x{t} tile")
        colours = read_image(label_path)
        check_shape(label_path, colours, (h, w, 3))
        semseg = labels_from_colours(label_path, colours)
        del colours
        grey = read_png(dsm_path, bits=8)
        check_shape(dsm_path, grey[..., 0] if grey.ndim == 3 else grey, (h, w))
        depth = height_from_dsm(dsm_path, grey)
        return image, semseg, depth

    def _generate_examples(self, root: str, files: list[tuple[str, str, str, str]]):
        t = self.builder_config.tile_size
        i = 0
        for tile, rgb_rel, label_rel, dsm_rel in files:
            a, b = _parse_tile(tile)
            image, semseg, depth = self._read_source(root, rgb_rel, label_rel, dsm_rel)
            rows, cols = tile_grid(*image.shape[:2], t)
            for r in range(rows):
                for c in range(cols):
                    ys, xs = slice(r * t, (r + 1) * t), slice(c * t, (c + 1) * t)
                    yield i, {
                        "image": np.ascontiguousarray(image[ys, xs]),
                        "semseg": np.ascontiguousarray(semseg[ys, xs]),
                        "depth": np.ascontiguousarray(depth[ys, xs]),
                        "index": np.int32(i),
                        "source_tile": np.int32(100 * a + b),
                        "tile_row": np.int32(r),
                        "tile_col": np.int32(c),
                    }
                    i += 1
