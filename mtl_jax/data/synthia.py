"""TFDS builder of SYNTHIA-RAND-CITYSCAPES (``synthia``) read from the official folder tree.

Reads ``RGB/{id:07d}.png`` (8-bit RGB), ``GT/LABELS/{id:07d}.png`` (16-bit, the SYNTHIA class id
in the first channel, an instance id in the second) and ``Depth/Depth/{id:07d}.png`` (16-bit
depth in the first channel) of the 9,400 frames. Every example is resized to the builder
config's resolution: the image bilinearly, labels and depth by nearest neighbour, the
intrinsics rescaled.

**Classes** (``semseg``): the 16 Cityscapes classes of the domain-adaptation literature
(:data:`CLASS_NAMES`, Cityscapes train-id order without terrain, truck and train), mapped from
the SYNTHIA ids by :data:`SYNTHIA_TO_CLASS`; the other SYNTHIA ids (void 0, parking-slot 13,
road-work 14, terrain 16, truck 18, train 20, lanemarking 22) are ``-1``. An id above 22 is an
error naming the file.

**Depth** is in **metres**: the stored value is read as z-depth in centimetres, the unit the
released DenseMTL code (which multiplies by 0.01) and other public SYNTHIA loaders (which
divide by 100) assume; z-depth, not distance along the ray, is assumed as for the normals of
VKITTI2 (the dataset's README was not at hand to confirm either). A stored 0 is invalid
(``0``); 65535, the largest value the format holds, is treated like VKITTI2's far plane: kept
as 655.35 m, but without a surface normal. Depth PNGs with one channel or with three (the first
is read) are accepted.

**Normals** are computed from the depth with the intrinsics of the SYNTHIA RAND camera,
``fx = fy = 532.740352``, ``(cx, cy) = (640, 380)`` at 760×1280 (:data:`INTRINSICS_760x1280`),
at the resolution of the files, then resized by nearest neighbour like the depth (so every
stored normal is that of the surface point whose depth is stored; see :mod:`.vkitti2` for why
they are not computed from the resized depth). The stored ``intrinsics`` are rescaled to the
stored resolution.

**Split** (the dataset has none): one permutation of the frames drawn with seed 0, cut once,
20 % to val (:func:`mtl_jax.data.manual.seeded_split`): 7,520 train / 1,880 val of the 9,400
frames. RAND frames are independent random views, not video, so a random split does not put
neighbouring frames on both sides. (The released DenseMTL code shuffled the list separately
for train and val and so evaluated mostly on training images.)

**Builder configs** by resolution: ``512x1024`` (default; DenseMTL's 1024×512, which changes the
aspect ratio: the intrinsics are rescaled per axis), ``256x512`` and ``38x64`` (tests).

The files may have any size with the aspect ratio of 760×1280 (a resized copy of the frames) as
long as an example's three files agree; the intrinsics are rescaled from 760×1280.

16-bit PNGs with several channels are read with :func:`read_png_channels`: Pillow decodes them
to 8 bits per channel only, so the file is decoded twice, once with Pillow's big-endian and
once with its little-endian 16-bit unpacker, which yield the high and the low byte of every
sample (the PNG unfiltering is the same in both).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mtl_jax.data.manual import (
    DEPTH_RANGE_KITTI,
    BadFileError,
    ManualBuilder,
    check_shape,
    read_image,
    read_png,
    resize_example,
    scale_intrinsics,
    seeded_split,
)
from mtl_jax.data.vkitti2 import depth_and_normals
from mtl_jax.errors import UserError

#: SYNTHIA class ids 0..22 (the dataset's README).
SYNTHIA_CLASSES = ("void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole",
                   "car", "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot",
                   "road-work", "traffic light", "terrain", "rider", "truck", "bus", "train",
                   "wall", "lanemarking")
MAX_SYNTHIA_ID = len(SYNTHIA_CLASSES) - 1
#: The 16 classes, in Cityscapes train-id order (without terrain, truck and train).
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
               "motorcycle", "bicycle")
NUM_CLASSES = len(CLASS_NAMES)
#: SYNTHIA id -> class of :data:`CLASS_NAMES`; the ids not listed are ``-1``.
SYNTHIA_TO_CLASS = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10,
                    17: 11, 8: 12, 19: 13, 12: 14, 11: 15}

FULL_HW = (760, 1280)
#: ``(fx, fy, cx, cy)`` of the SYNTHIA RAND camera at 760×1280.
INTRINSICS_760x1280 = (532.740352, 532.740352, 640.0, 380.0)
VAL_FRACTION = 0.2
SPLIT_SEED = 0
NUM_FRAMES = 9400
RESOLUTIONS = ((512, 1024), (256, 512), (38, 64))
DEFAULT_HEIGHT, DEFAULT_WIDTH = RESOLUTIONS[0]

DOWNLOAD_URL = "https://synthia-dataset.net/downloads/"
EXPECTED_TREE = """\
FOLDER/           (RAND_CITYSCAPES of SYNTHIA_RAND_CITYSCAPES, unpacked)
  RGB/{id:07d}.png          RGB, 760x1280 (9400 frames, ids 0000000..0009399)
  GT/LABELS/{id:07d}.png    16-bit, class id 0..22 in the first channel, instance id in the second
  Depth/Depth/{id:07d}.png  16-bit, z-depth in cm in the first channel
  (GT/COLOR is not read)"""

_FRAME_FILE = re.compile(r"(\d{7})\.png")
_RELPATHS = {"rgb": "RGB/{}.png", "labels": "GT/LABELS/{}.png", "depth": "Depth/Depth/{}.png"}


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass
class SynthiaConfig(tfds.core.BuilderConfig):
    """Stored resolution of one variant."""

    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH


def config_name(height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH) -> str:
    return f"{height}x{width}"


def make_config(height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH) -> SynthiaConfig:
    """A validated :class:`SynthiaConfig` with its canonical name."""
    if height < 8 or width < 8:
        raise UserError(f"synthia: resolution must be at least 8x8, got {height}x{width}")
    return SynthiaConfig(
        name=config_name(height, width), height=height, width=width,
        description=f"SYNTHIA-RAND-CITYSCAPES at {height}x{width}, 16 classes, depth in metres, "
                    "normals from depth, seeded random 80/20 split")


# -------------------------------------------------------------------------- file formats
def read_png_channels(path: str) -> np.ndarray:
    """A PNG's samples at their stored bit depth: ``[H, W]`` or ``[H, W, C]``, uint8 or uint16
    (int32 for Pillow's 32-bit grey). 16-bit RGB and RGBA are decoded exactly (see the module
    docstring); BadFileError for an unreadable file or a 16-bit grey+alpha PNG."""
    try:
        with Image.open(path) as im:
            tile = im.tile[0] if im.format == "PNG" and len(im.tile) == 1 else None
            rawmode = tile.args if tile is not None else None
            if rawmode not in ("RGB;16B", "RGBA;16B"):
                wide = None
            else:
                im.tile = [tile._replace(args=rawmode[:-1] + "L")]
                im.load()
                wide = np.asarray(im)
    except (OSError, ValueError, AttributeError) as e:
        raise BadFileError(f"cannot read {path}: {e}") from e
    if rawmode == "LA;16B":
        raise BadFileError(f"{path}: 16-bit grey+alpha PNGs are not supported; expected a "
                           "16-bit grey, RGB or RGBA PNG")
    if wide is None:
        return read_png(path)
    high = read_png(path)  # Pillow's own decoding: the high byte of every sample
    if high.shape != wide.shape:
        raise BadFileError(f"{path}: inconsistent 16-bit decoding ({high.shape} vs "
                           f"{wide.shape})")
    return (high.astype(np.uint16) << 8) | wide.astype(np.uint16)


def first_channel(path: str, *, bits: int | None = None) -> np.ndarray:
    """The first channel ``[H, W]`` of a PNG (the only one of a grey PNG); ``bits`` (8 or 16)
    checks the stored bit depth."""
    samples = read_png_channels(path)
    if bits == 16 and samples.dtype == np.uint8:
        raise BadFileError(f"{path}: expected a 16-bit PNG, got 8 bits per sample")
    if samples.ndim == 3:
        samples = samples[..., 0]
    if samples.ndim != 2:
        raise BadFileError(f"{path}: expected an image, got an array of shape {samples.shape}")
    return samples


def ids_to_classes(path: str, ids: np.ndarray) -> np.ndarray:
    """int16 ``[H, W]`` classes (``-1`` ignore) of SYNTHIA ids; BadFileError naming ``path``
    for ids above 22."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SYNTHIA_ID):
        bad = np.unique(ids[(ids < 0) | (ids > MAX_SYNTHIA_ID)])
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        raise BadFileError(f"{path}: label ids {shown} are not SYNTHIA class ids "
                           f"(0..{MAX_SYNTHIA_ID}, first channel)")
    table = np.full(MAX_SYNTHIA_ID + 1, -1, np.int16)
    for synthia_id, cls in SYNTHIA_TO_CLASS.items():
        table[synthia_id] = cls
    return table[ids.astype(np.int64)]


# ------------------------------------------------------------------------------- builder
class MtlSynthia(ManualBuilder):
    """SYNTHIA-RAND-CITYSCAPES: semseg (16 classes), depth in metres, normals from depth,
    intrinsics. See the module docstring."""

    REGISTRY_NAME = "synthia"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config(h, w) for h, w in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = config_name()
    DOWNLOAD_URL = DOWNLOAD_URL
    EXPECTED_TREE = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download SYNTHIA-RAND-CITYSCAPES (CVPR16) from {DOWNLOAD_URL}, unpack it and pass "
        f"its RAND_CITYSCAPES folder as --manual_dir. Expected tree:\n{EXPECTED_TREE}")
    NUM_CLASSES = NUM_CLASSES
    CLASS_NAMES = CLASS_NAMES

    FEATURES = dict(normals=True, intrinsics=True)
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_KITTI}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, [os.path.dirname(rel) for rel in _RELPATHS.values()])
        frames = self._list_frames(root)
        train, val = seeded_split(frames, VAL_FRACTION, SPLIT_SEED)
        return {"train": self._generate_examples(root, train),
                "val": self._generate_examples(root, val)}

    def _list_frames(self, root: str) -> list[str]:
        """The 7-digit ids of ``RGB/*.png``, sorted, after checking that each has its label and
        depth PNGs."""
        frames = sorted(m.group(1) for m in map(
            _FRAME_FILE.fullmatch, os.listdir(os.path.join(root, "RGB"))) if m)
        if not frames:
            raise self.missing("'RGB/0000000.png' (no RGB/NNNNNNN.png)", root)
        self.check_files(root, (_RELPATHS[key].format(f) for f in frames
                                for key in ("labels", "depth")))
        return frames

    def _generate_examples(self, root: str, frames: list[str]):
        yield from self.indexed_examples(lambda f: self._load_example(root, f), frames)

    def _load_example(self, root: str, frame: str) -> dict[str, np.ndarray]:
        c = self.builder_config
        paths = {key: os.path.join(root, rel.format(frame)) for key, rel in _RELPATHS.items()}
        image = read_image(paths["rgb"])
        hw = image.shape[:2]
        full_aspect = FULL_HW[0] / FULL_HW[1]
        if abs(hw[0] / hw[1] - full_aspect) > 0.01 * full_aspect:
            raise BadFileError(f"{paths['rgb']}: {hw[0]}x{hw[1]} does not have the aspect ratio "
                               f"of the {FULL_HW[0]}x{FULL_HW[1]} SYNTHIA frames, so the camera "
                               "intrinsics would not apply")
        ids = first_channel(paths["labels"])
        check_shape(paths["labels"], ids, hw)
        semseg = ids_to_classes(paths["labels"], ids)
        stored = first_channel(paths["depth"], bits=16)
        check_shape(paths["depth"], stored, hw)

        depth, normals = depth_and_normals(
            stored, scale_intrinsics(INTRINSICS_760x1280, FULL_HW, hw))
        example = resize_example(c.height, c.width, image=image, semseg=semseg, depth=depth,
                                 normals=normals)
        example["intrinsics"] = scale_intrinsics(INTRINSICS_760x1280, FULL_HW,
                                                 (c.height, c.width))
        return example
