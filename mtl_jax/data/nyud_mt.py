"""TFDS builder of NYUD-MT (``nyud_mt``): NYUDv2 for multi-task learning, four tasks.

The ``NYUD_MT`` folder released with ASTMT / MTI-Net and used by the multi-task survey code,
ATRC and DenseMTL holds the 1,449 labelled NYUDv2 frames at 480×640 with the official
795 train / 654 test lists (the test list is our ``val`` split): RGB images, 40-class
segmentation, depth, surface normals and edges (from HED). It cannot be downloaded by code;
see :attr:`MtlNyudMt.DOWNLOAD_URL`.

Builder configs are named by the stored resolution: ``448x576`` (the default; DenseMTL's
training resolution), ``480x640`` (native, as MTI-Net / ATRC train) and ``60x80`` (a small
variant for smoke tests and quick looks). Per example (record ``i`` = line ``i`` of
``gt_sets/{split}.txt``):

* ``image`` uint8 -- resized bilinearly (antialiased when shrinking);
* ``semseg`` int16 -- PNG value ``0`` (unlabelled) -> ``-1`` ignore, value ``v > 0`` -> class
  ``v - 1`` (the 40 classes of :data:`CLASS_NAMES`); resized nearest;
* ``depth`` float32 ``[H,W,1]`` -- metres as stored in ``depth/*.npy``, ``0`` invalid;
  resized nearest (no invalid 0 is averaged into a valid depth);
* ``normals`` float16 ``[H,W,3]`` -- PNG ``n = 2·x/255 − 1`` (or float ``.npy``), renormalised
  to unit length; a vector shorter than 0.5 before renormalising (e.g. PNG grey ``128``, the
  zero vector) is invalid and stored all-zero. Stored in the files' own axis convention.
  Resizing: bilinear over the valid normals only (invalid ones count as zero vectors, so they
  never tilt a valid one), renormalised, and zeroed where the nearest-resized validity mask is
  invalid -- the rule the training augmentation uses (:mod:`mtl_jax.data.augment`);
* ``edges`` int8 -- ``1`` where the edge map is ``> 0``, else ``0``; resized nearest (a
  one-pixel edge may lose pixels where rows/columns are dropped);
* ``intrinsics`` float32 ``(fx, fy, cx, cy)`` -- the NYUv2 Kinect colour camera at 480×640,
  rescaled to the config's resolution;
* ``index`` int32.

Variants of the export are accepted: images as ``.jpg`` or ``.png``, normals as ``.png`` or
``.npy``, edges as ``.png`` or ``.npy``. Every file is validated (native 480×640 shape, label
range, finite depth in [0, 20] m, normals range); a bad file raises
:class:`~mtl_jax.data.manual.BadFileError` naming it, a missing one
:class:`~mtl_jax.data.manual.ManualDataError`.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mtl_jax.data import nyuv2
from mtl_jax.data.manual import (
    DEPTH_RANGE_NYU,
    BadFileError,
    ManualBuilder,
    check_labels,
    check_normals,
    check_shape,
    read_image,
    read_npy,
    read_png,
    resize_image,
    resize_nearest,
    scale_intrinsics,
)
from mtl_jax.data.nyuv2 import KINECT_HW, KINECT_INTRINSICS, NORMALS_BOUND

SPLITS = ("train", "val")
#: Field -> (folder, accepted file extensions, the first one preferred).
LAYOUT = {
    "image": ("images", (".jpg", ".png")),
    "semseg": ("segmentation", (".png",)),
    "depth": ("depth", (".npy",)),
    "normals": ("normals", (".png", ".npy")),
    "edges": ("edge", (".png", ".npy")),
}
#: A stored normal shorter than this (before renormalising) is invalid.
MIN_NORMAL_LENGTH = 0.5


@dataclasses.dataclass
class NyudMtConfig(tfds.core.BuilderConfig):
    """The stored resolution of one prepared variant."""

    height: int = 448
    width: int = 576


def make_config(height: int, width: int, description: str) -> NyudMtConfig:
    return NyudMtConfig(name=f"{height}x{width}", height=height, width=width,
                        description=description)


# -------------------------------------------------------------------------------- field loaders
def load_image(path: str, hw: tuple[int, int]) -> np.ndarray:
    x = read_image(path)
    check_shape(path, x, (*KINECT_HW, 3))
    return resize_image(x, *hw)


def load_semseg(path: str, hw: tuple[int, int], num_classes: int) -> np.ndarray:
    raw = read_png(path, bits=8)
    check_shape(path, raw, KINECT_HW)
    labels = raw.astype(np.int16) - 1  # 0 (unlabelled) -> -1, v -> v - 1
    try:
        check_labels(path, labels, num_classes)
    except BadFileError as e:
        raise BadFileError(f"{e} (after mapping the stored value v to class v - 1; stored "
                           f"values must be in [0, {num_classes}])") from None
    return resize_nearest(labels, *hw)


def load_depth(path: str, hw: tuple[int, int]) -> np.ndarray:
    return resize_nearest(nyuv2.load_depth(path, KINECT_HW), *hw)


def decode_normals_png(x: np.ndarray) -> np.ndarray:
    """8-bit RGB normal map -> float32 vectors ``2·x/255 − 1`` (not yet renormalised)."""
    return 2.0 * x.astype(np.float32) / 255.0 - 1.0


def unit_normals(n: np.ndarray) -> np.ndarray:
    """Renormalise ``[H,W,3]``; vectors shorter than :data:`MIN_NORMAL_LENGTH` -> all-zero."""
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = norm >= MIN_NORMAL_LENGTH
    return np.where(valid, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def resize_normals(n: np.ndarray, height: int, width: int) -> np.ndarray:
    """Unit normals (all-zero invalid) resized: bilinear (antialiased like the image) over the
    valid vectors, renormalised, zeroed where the nearest-resized validity mask is invalid or
    where the average of the valid vectors (nearly) cancels."""
    if n.shape[:2] == (height, width):
        return n
    valid = np.any(n != 0, axis=-1)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(n[..., c], np.float32))
                           .resize((width, height), Image.BILINEAR), np.float32)
                for c in range(3)]
    r = np.stack(channels, axis=-1)
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    keep = resize_nearest(valid, height, width)[..., None] & (norm > 1e-3)
    return np.where(keep, r / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def load_normals(path: str, hw: tuple[int, int]) -> np.ndarray:
    if path.endswith(".npy"):
        x = read_npy(path)
        check_shape(path, x, (*KINECT_HW, 3))
        check_normals(path, x, NORMALS_BOUND)
        n = x.astype(np.float32)
    else:
        x = read_png(path, bits=8)
        check_shape(path, x, (*KINECT_HW, 3))
        n = decode_normals_png(x)
    return resize_normals(unit_normals(n), *hw).astype(np.float16)


def load_edges(path: str, hw: tuple[int, int]) -> np.ndarray:
    x = read_npy(path) if path.endswith(".npy") else read_png(path, bits=8)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    check_shape(path, x, KINECT_HW)
    if x.dtype.kind not in "fiub":
        raise BadFileError(f"{path}: expected a numeric edge map, got {x.dtype}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise BadFileError(f"{path}: edge map has NaN or infinite values")
    return resize_nearest((x > 0).astype(np.int8), *hw)


_LOADERS = {"image": load_image, "depth": load_depth, "normals": load_normals,
            "edges": load_edges}


class MtlNyudMt(ManualBuilder):
    """NYUD-MT (ASTMT / MTI-Net export): 40-class semseg, depth (m), normals, edges."""

    REGISTRY_NAME = "nyud_mt"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        make_config(448, 576, "448x576, DenseMTL's resolution (default)"),
        make_config(480, 640, "480x640, the native resolution (MTI-Net, ATRC)"),
        make_config(60, 80, "60x80, a small variant for smoke tests and quick looks"),
    ]
    DEFAULT_CONFIG_NAME = "448x576"
    DOWNLOAD_URL = "https://github.com/SimonVandenhende/Multi-Task-Learning-PyTorch"
    EXPECTED_TREE = (
        "FOLDER/                   (NYUD_MT: the archive the NYUD loader data/nyud.py of\n"
        "                          the repository below downloads; the ATRC/DenseMTL copy\n"
        "                          with .png images also works)\n"
        "  images/NAME.jpg         RGB 480x640 (.png accepted)\n"
        "  segmentation/NAME.png   8-bit, 0 = unlabelled, v = class v-1 (40 classes)\n"
        "  depth/NAME.npy          float [480,640] or [480,640,1], metres, 0 = invalid\n"
        "  normals/NAME.png        8-bit RGB, n = 2*x/255 - 1 (float .npy in [-1,1] accepted)\n"
        "  edge/NAME.png           8-bit, > 0 = edge (.npy accepted)\n"
        "  gt_sets/train.txt       one NAME per line (795 lines)\n"
        "  gt_sets/val.txt         one NAME per line (654 lines)")
    NUM_CLASSES = 40
    CLASS_NAMES = (
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
        "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
        "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator",
        "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
        "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
        "otherfurniture", "otherprop")

    FEATURES = dict(edges=True)
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_NYU}

    def _read_list(self, root: str, split: str) -> list[str]:
        path = os.path.join(root, "gt_sets", f"{split}.txt")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise BadFileError(f"{path}: the list of {split} examples is empty")
        dup = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        if dup:
            raise BadFileError(f"{path}: names listed more than once: {dup[:5]}")
        return names

    def _resolve(self, root: str, name: str) -> dict[str, str]:
        """The file of every field of example ``name``; ManualDataError for the first missing
        (named by its preferred extension)."""
        files = {}
        for field, (folder, exts) in LAYOUT.items():
            for ext in exts:
                path = os.path.join(root, folder, name + ext)
                if os.path.isfile(path):
                    files[field] = path
                    break
            else:
                alt = f" (or {', '.join(exts[1:])})" if len(exts) > 1 else ""
                raise self.missing(f"'{folder}/{name}{exts[0]}'{alt}", root)
        return files

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, [folder for folder, _ in LAYOUT.values()]
                         + [os.path.join("gt_sets", f"{s}.txt") for s in SPLITS])
        names = {s: self._read_list(root, s) for s in SPLITS}
        shared = sorted(set(names["train"]) & set(names["val"]))
        if shared:
            raise BadFileError(f"{os.path.join(root, 'gt_sets')}: train.txt and val.txt share "
                               f"{len(shared)} names, e.g. {shared[:5]}")
        files = {s: [self._resolve(root, n) for n in names[s]] for s in SPLITS}
        return {s: self._generate_examples(files[s]) for s in SPLITS}

    def _generate_examples(self, files: list[dict[str, str]]):
        c = self.builder_config
        hw = (c.height, c.width)
        intrinsics = scale_intrinsics(KINECT_INTRINSICS, KINECT_HW, hw)
        for i, paths in enumerate(files):
            example = {field: load(paths[field], hw) for field, load in _LOADERS.items()}
            example["semseg"] = load_semseg(paths["semseg"], hw, self.NUM_CLASSES)
            example["intrinsics"] = intrinsics
            example["index"] = np.int32(i)
            yield i, example


MtlNyudMt.MANUAL_DOWNLOAD_INSTRUCTIONS = MtlNyudMt.instructions()
