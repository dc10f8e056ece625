"""TFDS builder of the official Cityscapes release (``cityscapes``), as XTasC-Net and DenseMTL
read it.

Reads ``leftImg8bit`` (RGB), ``gtFine/*_gtFine_labelIds.png`` (8-bit label ids 0..33),
``disparity/*_disparity.png`` (16-bit) and ``camera/*_camera.json`` of the official train
(2,975) and val (500) folders; the test folders (no labels) are not read. Every example is
resized to the builder config's resolution: the image bilinearly, labels and depth by nearest
neighbour.

**Labels.** Three label sets, all with ``-1`` ignore, all from the official label table
(:data:`LABELS`):

* 19 -- the standard train ids (road 0 ... bicycle 18);
* 16 -- DenseMTL's: the 19 without terrain, truck and train, renumbered in order;
* 7 -- the categories of the 19 evaluated classes (flat, construction, object, nature, sky,
  human, vehicle); ids without a train id (parking, rail track, guard rail, caravan, ...) are
  ignored even though they have a category, as are the 'void' ids.

A labelIds value above 33 is an error (the official PNGs hold 0..33; license plates, id -1,
are not drawn into them).

**Depth** is z-depth in **metres** from the stereo disparity and the image's own camera file:
``depth = baseline · fx / d`` with ``d = (p − 1) / 256`` for a stored value ``p > 1``;
``p ≤ 1`` is invalid and stored as ``0``. It is computed at the resolution of the files and
then resized by nearest neighbour (so every stored value is one measured disparity). Far
points are not capped (a disparity of a few pixels is hundreds of metres); DenseMTL's released
code fills invalid pixels with the image's largest depth instead of marking them invalid.

**Normals** (DenseMTL's normal labels) are computed from the stored depth with the camera
intrinsics ``(fx, fy, u0, v0)`` of the camera file rescaled to the stored resolution
(:func:`mtl_jax.data.manual.normals_for`); those intrinsics are stored too. Stereo noise makes
them noisy; grazing surfaces far down the road lose theirs to the depth-jump rule of
:func:`mtl_jax.data.geometry.normals_from_depth`.

The files may have any size (the official ones are 1024×2048) as long as an example's image,
labels and disparity agree; the camera file is taken to describe that size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data.manual import (
    DEPTH_RANGE_KITTI,
    BadFileError,
    ManualBuilder,
    check_shape,
    normals_for,
    read_image,
    read_png,
    resize_image,
    resize_nearest,
    scale_intrinsics,
)


class Label(NamedTuple):
    """One row of the official Cityscapes label table."""

    id: int
    name: str
    category: str
    train_id: int | None  # None: not evaluated (255 in the official table)


#: The official label table (cityscapesScripts ``labels.py``), ids 0..33; license plate (-1)
#: is never drawn into the labelIds PNGs and is left out.
LABELS: tuple[Label, ...] = (
    Label(0, "unlabeled", "void", None),
    Label(1, "ego vehicle", "void", None),
    Label(2, "rectification border", "void", None),
    Label(3, "out of roi", "void", None),
    Label(4, "static", "void", None),
    Label(5, "dynamic", "void", None),
    Label(6, "ground", "void", None),
    Label(7, "road", "flat", 0),
    Label(8, "sidewalk", "flat", 1),
    Label(9, "parking", "flat", None),
    Label(10, "rail track", "flat", None),
    Label(11, "building", "construction", 2),
    Label(12, "wall", "construction", 3),
    Label(13, "fence", "construction", 4),
    Label(14, "guard rail", "construction", None),
    Label(15, "bridge", "construction", None),
    Label(16, "tunnel", "construction", None),
    Label(17, "pole", "object", 5),
    Label(18, "polegroup", "object", None),
    Label(19, "traffic light", "object", 6),
    Label(20, "traffic sign", "object", 7),
    Label(21, "vegetation", "nature", 8),
    Label(22, "terrain", "nature", 9),
    Label(23, "sky", "sky", 10),
    Label(24, "person", "human", 11),
    Label(25, "rider", "human", 12),
    Label(26, "car", "vehicle", 13),
    Label(27, "truck", "vehicle", 14),
    Label(28, "bus", "vehicle", 15),
    Label(29, "caravan", "vehicle", None),
    Label(30, "trailer", "vehicle", None),
    Label(31, "train", "vehicle", 16),
    Label(32, "motorcycle", "vehicle", 17),
    Label(33, "bicycle", "vehicle", 18),
)
MAX_LABEL_ID = 33

#: The 19 evaluated classes in train-id order.
CLASSES_19 = tuple(lab.name for lab in sorted((x for x in LABELS if x.train_id is not None),
                                              key=lambda x: x.train_id))
#: DenseMTL's 16 classes: the 19 without terrain, truck and train.
CLASSES_16 = tuple(n for n in CLASSES_19 if n not in ("terrain", "truck", "train"))
#: The 7 categories of the evaluated classes, in the official category order.
CATEGORIES_7 = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CLASS_NAMES = {7: CATEGORIES_7, 16: CLASSES_16, 19: CLASSES_19}


def label_lookup(num_classes: int) -> np.ndarray:
    """int16 ``[256]``: labelIds value -> class of the ``num_classes`` label set (-1 ignore)."""
    if num_classes not in CLASS_NAMES:
        raise ValueError(f"Cityscapes label sets have 7, 16 or 19 classes, not {num_classes}")
    lut = np.full(256, -1, np.int16)
    for lab in LABELS:
        if lab.train_id is None:
            continue
        if num_classes == 7:
            lut[lab.id] = CATEGORIES_7.index(lab.category)
        elif lab.name in CLASS_NAMES[num_classes]:
            lut[lab.id] = CLASS_NAMES[num_classes].index(lab.name)
    return lut


def disparity_to_depth(stored: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """z-depth in metres (float32, ``0`` invalid) of a stored 16-bit disparity map:
    ``baseline · fx / ((p − 1) / 256)`` where ``p > 1``."""
    p = np.asarray(stored, np.float64)
    valid = p > 1
    disparity = np.where(valid, (p - 1.0) / 256.0, 1.0)
    return np.where(valid, baseline * fx / disparity, 0.0).astype(np.float32)


def read_label_ids(path: str, hw: tuple[int, int]) -> np.ndarray:
    """The 8-bit label ids (0..33) of a ``*_gtFine_labelIds.png`` of size ``hw``;
    BadFileError naming the file for another size or an id above 33."""
    ids = read_png(path, bits=8)
    check_shape(path, ids, hw)
    if ids.max(initial=0) > MAX_LABEL_ID:
        bad = np.unique(ids[ids > MAX_LABEL_ID])
        raise BadFileError(f"{path}: label ids {', '.join(map(str, bad[:8]))} "
                           f"are not Cityscapes ids (0..{MAX_LABEL_ID})")
    return ids


def read_camera(path: str) -> tuple[float, np.ndarray]:
    """``(baseline in metres, intrinsics (fx, fy, u0, v0))`` of a Cityscapes camera file."""
    try:
        with open(path) as f:
            cam = json.load(f)
        baseline = float(cam["extrinsic"]["baseline"])
        k = [float(cam["intrinsic"][key]) for key in ("fx", "fy", "u0", "v0")]
    except OSError as e:
        raise BadFileError(f"cannot read {path}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise BadFileError(f"{path}: a camera file needs the numbers extrinsic.baseline and "
                           f"intrinsic.fx, fy, u0, v0 ({type(e).__name__}: {e})") from e
    if not (all(math.isfinite(x) for x in [baseline, *k]) and baseline > 0 and k[0] > 0
            and k[1] > 0):
        raise BadFileError(f"{path}: baseline {baseline:g} and focal lengths {k[0]:g}, {k[1]:g} "
                           "must be finite and positive")
    return baseline, np.asarray(k, np.float64)


SPLITS = ("train", "val")
RESOLUTIONS = ((128, 256), (256, 512), (512, 1024))
_SUFFIX = {  # package folder -> file-name suffix after "{city}_{seq}_{frame}"
    "leftImg8bit": "_leftImg8bit.png",
    "gtFine": "_gtFine_labelIds.png",
    "disparity": "_disparity.png",
    "camera": "_camera.json",
}

DOWNLOAD_URL = "https://www.cityscapes-dataset.com/downloads/"
EXPECTED_TREE = """\
FOLDER/          (the four official packages unpacked side by side)
  leftImg8bit/   from leftImg8bit_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_leftImg8bit.png    RGB, 1024x2048 (2975 images)
    val/{city}/{city}_{seq}_{frame}_leftImg8bit.png      (500 images)
  gtFine/        from gtFine_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png    8-bit label ids 0..33
    val/...
  disparity/     from disparity_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_disparity.png      16-bit, (p - 1) / 256 pixels
    val/...
  camera/        from camera_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_camera.json        extrinsic.baseline, intrinsic fx fy u0 v0
    val/...
(the test/ folders and the other gtFine files are not read)"""


@dataclasses.dataclass
class CityscapesConfig(tfds.core.BuilderConfig):
    """Stored resolution and label set (number of classes) of one variant."""

    height: int = 512
    width: int = 1024
    num_classes: int = 16


def config_name(height: int, width: int, num_classes: int) -> str:
    return f"{height}x{width}_{num_classes}cls"


def make_configs(resolutions, class_counts, what: str) -> list[CityscapesConfig]:
    """One config per resolution × label set, named by :func:`config_name` (also used by
    ``cityscapes_mtan``)."""
    return [CityscapesConfig(
        name=config_name(h, w, n), height=h, width=w, num_classes=n,
        description=f"{what} at {h}x{w}, {n} classes")
        for h, w in resolutions for n in sorted(class_counts)]


class LabelSetsMixin:
    """``num_classes`` and ``class_names`` of a builder whose configs choose a label set
    (``builder_config.num_classes``; ``CLASS_NAMES`` keyed by the number of classes)."""

    CLASS_NAMES: dict[int, tuple[str, ...]]

    @property
    def num_classes(self) -> int:
        return self.builder_config.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.CLASS_NAMES[self.builder_config.num_classes]


class MtlCityscapes(LabelSetsMixin, ManualBuilder):
    """Official Cityscapes: semseg (7 categories / DenseMTL's 16 / 19 train ids), depth in
    metres from disparity and camera, normals from depth, intrinsics.

    Builder configs ``{H}x{W}_{N}cls`` for H×W in 128×256, 256×512, 512×1024 and N in 7, 16,
    19; the default ``512x1024_16cls`` is DenseMTL's setting. See the module docstring for the
    label sets and the depth conversion.
    """

    REGISTRY_NAME = "cityscapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = make_configs(
        RESOLUTIONS, CLASS_NAMES, "Cityscapes, depth in metres, normals from depth")
    DEFAULT_CONFIG_NAME = config_name(512, 1024, 16)
    DOWNLOAD_URL = DOWNLOAD_URL
    EXPECTED_TREE = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Register at {DOWNLOAD_URL} and download leftImg8bit_trainvaltest.zip, "
        "gtFine_trainvaltest.zip, disparity_trainvaltest.zip and camera_trainvaltest.zip; "
        f"unpack them into one folder and pass it as --manual_dir. Expected tree:\n"
        f"{EXPECTED_TREE}")
    #: Number of classes of each builder config.
    NUM_CLASSES = {c.name: c.num_classes for c in BUILDER_CONFIGS}
    #: Class names of each label set (keyed by the number of classes).
    CLASS_NAMES = CLASS_NAMES

    FEATURES = dict()
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_KITTI}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, [f"{p}/{s}" for p in _SUFFIX for s in SPLITS])
        found = {split: self._list_split(root, split) for split in SPLITS}
        shared = sorted({n for _, n in found["train"]} & {n for _, n in found["val"]})
        if shared:
            raise BadFileError(f"{root}: {len(shared)} examples are in both train and val, e.g. "
                               f"{shared[0]}; the official splits share none")
        return {split: self._generate_examples(root, split, found[split]) for split in SPLITS}

    def _list_split(self, root: str, split: str) -> list[tuple[str, str]]:
        """``(city, "{city}_{seq}_{frame}")`` of every image of ``split``, sorted by file name,
        after checking that each has its label, disparity and camera files."""
        image_dir = os.path.join(root, "leftImg8bit", split)
        suffix = _SUFFIX["leftImg8bit"]
        items = sorted(
            ((city, f[:-len(suffix)]) for city in os.listdir(image_dir)
             if os.path.isdir(os.path.join(image_dir, city))
             for f in os.listdir(os.path.join(image_dir, city)) if f.endswith(suffix)),
            key=lambda item: (item[1], item[0]))
        if not items:
            raise self.missing(f"'leftImg8bit/{split}/{{city}}/*{suffix}'", root)
        self.check_files(root, (_relpath(p, split, city, name) for city, name in items
                                for p in ("gtFine", "disparity", "camera")))
        return items

    def _generate_examples(self, root: str, split: str, items: list[tuple[str, str]]):
        def load(item: tuple[str, str]) -> dict[str, np.ndarray]:
            return self._load_example(root, split, *item)

        yield from self.indexed_examples(load, items)

    def _load_example(self, root: str, split: str, city: str,
                      name: str) -> dict[str, np.ndarray]:
        c = self.builder_config
        paths = {p: os.path.join(root, _relpath(p, split, city, name)) for p in _SUFFIX}
        image = read_image(paths["leftImg8bit"])
        hw = image.shape[:2]
        ids = read_label_ids(paths["gtFine"], hw)
        disparity = read_png(paths["disparity"], bits=16)
        check_shape(paths["disparity"], disparity, hw)
        baseline, k_full = read_camera(paths["camera"])

        depth = disparity_to_depth(disparity, baseline, k_full[0])
        depth = resize_nearest(depth, c.height, c.width)
        k = scale_intrinsics(k_full, hw, (c.height, c.width))
        semseg = resize_nearest(label_lookup(c.num_classes)[ids], c.height, c.width)
        return {
            "image": resize_image(image, c.height, c.width),
            "semseg": semseg.astype(np.int16),
            "depth": depth[..., None].astype(np.float32),
            "normals": normals_for(depth, k),
            "intrinsics": k.astype(np.float32),
        }


def _relpath(package: str, split: str, city: str, name: str) -> str:
    return f"{package}/{split}/{city}/{name}{_SUFFIX[package]}"
