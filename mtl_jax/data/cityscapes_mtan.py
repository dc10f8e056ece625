"""TFDS builder of MTAN's pre-processed Cityscapes (``cityscapes_mtan``).

MTAN (Liu et al., https://github.com/lorenmt/mtan, whose README links the data) released
Cityscapes already resized and converted to ``.npy``: ``{train,val}/{image,label_7,label_19,
depth}/{i}.npy`` (a ``label_2`` folder may also be present; it is not read), 2,975 train and
500 val examples at 128×256, and a larger 256×512 version. This builder copies them into the
batch contract of ``docs/datasets.md`` without resizing (the resolution of the builder config
is the stored one and is validated).

Fields: ``image`` uint8 (the stored floats in [0, 1] times 255, rounded; uint8 files are taken
as they are), ``semseg`` int16 with ``-1`` ignore (7 or 19 classes, the builder config's label
set), ``depth`` float32 ``[H,W,1]`` and ``index``. No normals, no intrinsics.

**Depth unit.** MTAN's ``depth`` is *not* metric: it is Cityscapes' stereo disparity turned
into an inverse depth in ``[0, 0.4922]`` (larger = nearer), ``0`` = invalid. It is stored
unchanged, so the depth task's losses and metrics (abs error, abs-rel, RMSE, δ) are in these
inverse units, exactly as in the MTAN, ATI-Net and AdaMT-Net tables; they are not comparable
with metric-depth numbers (use the raw ``cityscapes`` builder for metres). Values outside
``[0, 0.5]`` are rejected as a wrong file.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data.cityscapes import (
    CATEGORIES_7,
    CLASSES_19,
    LabelSetsMixin,
    config_name,
    make_configs,
)
from mtl_jax.data.manual import (
    BadFileError,
    ManualBuilder,
    check_depth,
    check_labels,
    check_shape,
    read_npy,
)

SPLITS = ("train", "val")
#: Resolutions MTAN released, (height, width).
RESOLUTIONS = ((128, 256), (256, 512))
#: Largest inverse depth accepted (MTAN's maximum is 0.4922).
MAX_INVERSE_DEPTH = 0.5
#: Class names of the two label sets: MTAN's 7 are the Cityscapes categories of the evaluated
#: classes, its 19 the standard train ids (the tables of :mod:`mtl_jax.data.cityscapes`).
CLASS_NAMES = {7: CATEGORIES_7, 19: CLASSES_19}

DOWNLOAD_URL = "https://github.com/lorenmt/mtan"
EXPECTED_TREE = """\
FOLDER/                      (the unpacked pre-processed Cityscapes of MTAN)
  train/
    image/0.npy ...          float [H,W,3] in [0, 1] (2975 files)
    label_7/0.npy ...        [H,W] class ids 0..6, -1 ignore     (the *_7cls configs)
    label_19/0.npy ...       [H,W] class ids 0..18, -1 ignore    (the *_19cls configs)
    depth/0.npy ...          [H,W,1] inverse depth in [0, 0.4922], 0 invalid
  val/
    image/ label_7/ label_19/ depth/   (same files, 500 of each)
H×W is 128×256 (the standard download) or 256×512 (the large one); label_2/ is ignored."""


def _sorted_npy(folder: str) -> list[str]:
    """The ``.npy`` file names of ``folder`` in numerical order (``2.npy`` before ``10.npy``)."""
    names = [f for f in os.listdir(folder) if f.endswith(".npy")]
    stem = [f[:-4] for f in names]
    return [n for _, n in sorted(
        ((int(s) if s.isdigit() else -1, s), n) for s, n in zip(stem, names))]


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """MTAN's image ``.npy`` (float in [0, 1], or uint8) as uint8 ``[H,W,3]``."""
    x = read_npy(path)
    check_shape(path, x, (height, width, 3))
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "fiu":
        raise BadFileError(f"{path}: image dtype {x.dtype} is not a number type")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise BadFileError(f"{path}: image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise BadFileError(f"{path}: image values lie in [{lo:g}, {hi:g}], expected [0, 1]")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def load_labels(path: str, height: int, width: int, num_classes: int) -> np.ndarray:
    """A label ``.npy`` (float or integer class ids, ``-1`` ignore) as int16 ``[H,W]``."""
    x = read_npy(path)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    check_shape(path, x, (height, width))
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            raise BadFileError(f"{path}: labels must be whole numbers (class ids or -1)")
    elif x.dtype.kind not in "iu":
        raise BadFileError(f"{path}: label dtype {x.dtype} is not a number type")
    x = x.astype(np.int64)
    check_labels(path, x, num_classes)
    return x.astype(np.int16)


def load_depth(path: str, height: int, width: int) -> np.ndarray:
    """A depth ``.npy`` (inverse depth, ``[H,W,1]`` or ``[H,W]``) as float32 ``[H,W,1]``."""
    x = read_npy(path)
    if x.ndim == 2:
        x = x[..., None]
    check_shape(path, x, (height, width, 1))
    if x.dtype.kind not in "fiu":
        raise BadFileError(f"{path}: depth dtype {x.dtype} is not a number type")
    x = x.astype(np.float32)
    check_depth(path, x, MAX_INVERSE_DEPTH)
    return x


class MtlCityscapesMtan(LabelSetsMixin, ManualBuilder):
    """MTAN's pre-processed Cityscapes: semseg (7 or 19 classes) and *inverse* depth.

    ``depth`` holds MTAN's disparity-derived inverse depth in ``[0, 0.4922]`` (``0`` invalid),
    not metres: depth metrics on this dataset are in these inverse units, as in MTAN's tables.
    Builder configs ``{H}x{W}_{N}cls``: ``128x256_7cls`` (default), ``128x256_19cls``,
    ``256x512_7cls``, ``256x512_19cls``; the resolution must be the one of the files.
    """

    REGISTRY_NAME = "cityscapes_mtan"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = make_configs(RESOLUTIONS, CLASS_NAMES, "MTAN's Cityscapes, inverse depth")
    DEFAULT_CONFIG_NAME = config_name(128, 256, 7)
    DOWNLOAD_URL = DOWNLOAD_URL
    EXPECTED_TREE = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download MTAN's pre-processed Cityscapes (linked from the README of {DOWNLOAD_URL}), "
        f"unpack it and pass its folder as --manual_dir. Expected tree:\n{EXPECTED_TREE}")
    #: Number of classes of each builder config.
    NUM_CLASSES = {c.name: c.num_classes for c in BUILDER_CONFIGS}
    #: Class names of each label set (keyed by the number of classes).
    CLASS_NAMES = CLASS_NAMES

    FEATURES = dict(normals=False, intrinsics=False)

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        label_dir = f"label_{self.builder_config.num_classes}"
        folders = ("image", label_dir, "depth")
        self.check_files(root, [f"{s}/{d}" for s in SPLITS for d in folders])
        names = {}
        for split in SPLITS:
            names[split] = _sorted_npy(os.path.join(root, split, "image"))
            if not names[split]:
                raise self.missing(f"'{split}/image/*.npy'", root)
            self.check_files(root, (f"{split}/{d}/{n}" for n in names[split]
                                    for d in folders[1:]))
        self._check_resolution(os.path.join(root, "train", "image", names["train"][0]))
        return {split: self._generate_examples(root, split, names[split]) for split in SPLITS}

    def _check_resolution(self, path: str) -> None:
        """A clear error when the files have another resolution than the builder config."""
        c = self.builder_config
        hw = tuple(read_npy(path).shape[:2])
        if hw != (c.height, c.width):
            hint = (f"; use the builder config {config_name(*hw, c.num_classes)!r}"
                    if hw in RESOLUTIONS else "")
            raise BadFileError(f"{path}: images are {'x'.join(map(str, hw))}, the builder "
                               f"config {c.name!r} reads {c.height}x{c.width}{hint}")

    def _generate_examples(self, root: str, split: str, names: list[str]):
        c = self.builder_config
        label_dir = f"label_{c.num_classes}"
        for i, name in enumerate(names):
            def path(folder: str, name: str = name) -> str:
                return os.path.join(root, split, folder, name)

            yield i, {
                "image": load_image(path("image"), c.height, c.width),
                "semseg": load_labels(path(label_dir), c.height, c.width, c.num_classes),
                "depth": load_depth(path("depth"), c.height, c.width),
                "index": np.int32(i),
            }
