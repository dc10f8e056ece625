"""TFDS builder of NYUv2 as pre-processed by MTAN (``nyuv2``): 13 classes, depth, normals.

MTAN (Liu et al., CVPR 2019) released NYUv2 as one ``.npy`` file per field and example, at
288×384, with the official 795 train / 654 test images (the test images form our ``val``
split, as in every paper that uses this data: MTAN, ATI-Net, AdaMT-Net, XTasC-Net). The
builder reads that folder (it cannot be downloaded by code; the link is in MTAN's README) and
stores, per example ``i`` of a split (record ``i`` = file ``i.npy``):

* ``image`` uint8 ``[288,384,3]`` -- MTAN stores float RGB in [0, 1] (scaled by 255 and
  rounded here); uint8 files are taken as they are;
* ``semseg`` int16 ``[288,384]`` -- the 13-class labels (:data:`CLASS_NAMES`), ``-1`` ignore,
  kept as stored (MTAN's files already use ``-1``);
* ``depth`` float32 ``[288,384,1]`` -- metres, ``0`` invalid, as stored;
* ``normals`` float16 ``[288,384,3]`` -- as stored (values in [-1, 1], all-zero invalid, the
  axis convention of MTAN's files; the pipeline renormalises them when reading);
* ``intrinsics`` float32 ``(fx, fy, cx, cy)`` -- the NYUv2 Kinect colour camera at 480×640
  rescaled to 288×384 with :func:`mtl_jax.data.manual.scale_intrinsics`, taking MTAN's frames
  as a resize of the full 480×640 frame (same 3:4 aspect ratio). MTAN's maintainer mentions a
  crop of invalid border pixels (lorenmt/mtan#42), so treat them as approximate;
* ``index`` int32.

Every file is validated (shape, finite values, label range, depth in [0, 20] m, normals in
[-1.01, 1.01], image range); a bad one raises :class:`~mtl_jax.data.manual.BadFileError`
naming it, a missing one :class:`~mtl_jax.data.manual.ManualDataError`.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data.manual import (
    DEPTH_RANGE_NYU,
    BadFileError,
    ManualBuilder,
    check_depth,
    check_labels,
    check_normals,
    check_shape,
    read_npy,
    scale_intrinsics,
)

#: NYUv2 Kinect colour camera ``(fx, fy, cx, cy)`` in pixels of the native 480×640 frame.
KINECT_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)
#: Native resolution of the NYUv2 frames.
KINECT_HW = (480, 640)
#: Depth above this (metres) is taken for a unit error (the Kinect reaches about 10 m).
MAX_DEPTH = 20.0
#: Tolerance on the range of the stored normal components.
NORMALS_BOUND = 1.01

HEIGHT, WIDTH = 288, 384
FIELDS = ("image", "label", "depth", "normal")
SPLITS = ("train", "val")

_NPY_NAME = re.compile(r"^(\d+)\.npy$")


def _count_examples(folder: str) -> int:
    """Number of ``{i}.npy`` files in ``folder`` (the split's size)."""
    return sum(1 for name in os.listdir(folder) if _NPY_NAME.match(name))


def load_image(path: str) -> np.ndarray:
    """MTAN image file -> uint8 ``[288,384,3]`` (float in [0, 1] scaled by 255, or uint8)."""
    x = read_npy(path)
    check_shape(path, x, (HEIGHT, WIDTH, 3))
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise BadFileError(f"{path}: expected a float image in [0, 1] or uint8, got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise BadFileError(f"{path}: image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise BadFileError(f"{path}: float image values in [{lo:g}, {hi:g}], expected [0, 1]")
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_label(path: str, num_classes: int) -> np.ndarray:
    """MTAN label file (float or int, ``-1`` ignore) -> int16 ``[288,384]``, range-checked."""
    x = read_npy(path)
    check_shape(path, x, (HEIGHT, WIDTH))
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)):
            raise BadFileError(f"{path}: labels have NaN or infinite values")
        if np.any(x != np.round(x)):
            raise BadFileError(f"{path}: labels are not whole numbers")
    elif x.dtype.kind not in "iu":
        raise BadFileError(f"{path}: expected integer-valued labels, got {x.dtype}")
    x = x.astype(np.int64)  # whole numbers: exact, and shown as such in errors
    check_labels(path, x, num_classes)
    return x.astype(np.int16)


def load_depth(path: str, hw: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """Depth ``.npy`` file (``[H,W,1]`` or ``[H,W]``, metres, ``hw`` = (288, 384) for MTAN's
    files) -> float32 ``[H,W,1]``, checked to be finite and within [0, MAX_DEPTH]."""
    x = read_npy(path)
    if x.ndim == 2:
        x = x[..., None]
    check_shape(path, x, (*hw, 1))
    if x.dtype.kind not in "fiu":
        raise BadFileError(f"{path}: expected a numeric depth map, got {x.dtype}")
    check_depth(path, x, MAX_DEPTH)
    return x.astype(np.float32)


def load_normals(path: str) -> np.ndarray:
    """MTAN normal file (``[288,384,3]`` in [-1, 1]) -> float16, stored as given."""
    x = read_npy(path)
    check_shape(path, x, (HEIGHT, WIDTH, 3))
    check_normals(path, x, NORMALS_BOUND)
    return x.astype(np.float16)


class MtlNyuv2(ManualBuilder):
    """NYUv2 (MTAN's 288×384 ``.npy`` export): 13-class semseg, depth (m), normals."""

    REGISTRY_NAME = "nyuv2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DOWNLOAD_URL = "https://github.com/lorenmt/mtan"
    EXPECTED_TREE = (
        "FOLDER/                      (MTAN's pre-processed NYUv2, link in its README)\n"
        "  train/                     (795 examples)\n"
        "    image/0.npy ... 794.npy  float32 [288,384,3] RGB in [0, 1] (or uint8)\n"
        "    label/0.npy ...          [288,384] classes 0..12, -1 = ignore\n"
        "    depth/0.npy ...          [288,384,1] (or [288,384]) metres, 0 = invalid\n"
        "    normal/0.npy ...         [288,384,3] in [-1, 1], all-zero = invalid\n"
        "  val/                       (654 examples, the official test images)\n"
        "    image/ label/ depth/ normal/   as in train/")
    NUM_CLASSES = 13
    CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                   "painting", "sofa", "table", "tv", "wall", "window")

    FEATURES = dict(edges=False)
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_NYU}

    def stored_size(self) -> tuple[int, int]:
        return HEIGHT, WIDTH

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, [os.path.join(s, f) for s in SPLITS for f in FIELDS])
        sizes = {}
        for split in SPLITS:
            # the largest count over the fields: indices 0..n-1 must exist in every field,
            # so a file missing in one field (or a gap) is reported, never silently dropped
            n = max(_count_examples(os.path.join(root, split, f)) for f in FIELDS)
            if n == 0:
                raise self.missing(f"'{split}/image/0.npy' (no example files)", root)
            self.check_files(root, [os.path.join(split, f, f"{i}.npy")
                                    for i in range(n) for f in FIELDS])
            sizes[split] = n
        return {split: self._generate_examples(root, split, n) for split, n in sizes.items()}

    def _generate_examples(self, root: str, split: str, num: int):
        intrinsics = scale_intrinsics(KINECT_INTRINSICS, KINECT_HW, (HEIGHT, WIDTH))
        for i in range(num):
            path = {f: os.path.join(root, split, f, f"{i}.npy") for f in FIELDS}
            yield i, {
                "image": load_image(path["image"]),
                "semseg": load_label(path["label"], self.NUM_CLASSES),
                "depth": load_depth(path["depth"]),
                "normals": load_normals(path["normal"]),
                "intrinsics": intrinsics,
                "index": np.int32(i),
            }


MtlNyuv2.MANUAL_DOWNLOAD_INSTRUCTIONS = MtlNyuv2.instructions()
