"""TFDS builder of Virtual KITTI 2 (``vkitti2``) read from the official folder tree.

Reads, for the chosen variation(s) and camera(s) of every scene found (officially Scene01,
Scene02, Scene06, Scene18 and Scene20), the JPEG frames of ``vkitti_2.0.3_rgb``, the colour-coded
class PNGs of ``vkitti_2.0.3_classSegmentation``, the 16-bit depth PNGs of
``vkitti_2.0.3_depth`` and the per-frame camera intrinsics of ``vkitti_2.0.3_textgt``
(``intrinsic.txt``). Every example is resized to the builder config's resolution: the image
bilinearly, the labels and the depth by nearest neighbour, the intrinsics rescaled.

**Classes** (``semseg``): the 14 classes of the dataset's ``colors.txt``, in its order
(:data:`CLASSES`); ``Undefined`` (0, 0, 0) is ``-1``. Any other colour is an error naming the
file and the colour (the official PNGs hold only these 15 colours).

**Depth** is z-depth (distance to the camera plane) in **metres**: the stored value is in
centimetres. The value 65535 marks the renderer's far plane (sky and anything beyond 655.35 m).
*Decision:* it is kept as a valid depth of 655.35 m, the defined far depth the dataset gives it
(DenseMTL's inverse-depth encoding maps it to about 1, so its training saw sky as far, not as
unlabelled); evaluation code that wants sky out of the depth metrics must cap depth itself. A
stored 0 (never written by the renderer) would be invalid (``0``).

**Normals** are computed from the depth at the resolution of the files, with the frame's own
intrinsics (:func:`mtl_jax.data.manual.normals_for`), and then resized by nearest neighbour like
the depth, so that every stored normal is the normal of the surface point whose depth is stored.
(Computing them from the resized depth with rescaled intrinsics instead mixes two grids: a
non-integer nearest resize samples source pixels up to half a pixel away from the centres
the rescaled intrinsics assume, which tilts the normals of slanted surfaces in bands. With the
official camera, 375×1242 → 320×1024, median errors from the resized depth / computed first:
a plane tilted by 30° at 20 m, exact depth 4.7° / 0.01°, depth rounded to cm as stored 5.4° /
4.4° (the rounding dominates there); the road plane 1.5° / 0.0°, rounded 1.4° / 0.07°.)
The far plane is masked out first: sky has no surface, so its normals are all-zero
(invalid), and the pixels of an object next to the sky keep a normal from their one-sided
differences. The stored ``intrinsics`` are those of the stored resolution.
(``dataset.normals_from_depth = True`` recomputes normals from the stored depth and intrinsics
instead: without the sky mask, which gives sky the normal of a fronto-parallel plane, and with
the banding above.)

**Splits** (train / val; the dataset has none of its own). The split unit is a *frame*, i.e. a
``(scene, frame number)`` pair: all variations and cameras of a frame go to the same side, so a
stereo pair or a re-rendering of a frame never straddles the split.

* ``random``: one permutation of all frames drawn with seed 0, cut once, 20 % to val
  (:func:`mtl_jax.data.manual.seeded_split`). The released DenseMTL code shuffled the file list
  separately for train and val and so evaluated on about 80 % training images; this split
  does not. Consecutive video frames are near-duplicates, so random-split val numbers are
  optimistic all the same.
* ``scene``: whole scenes to val, Scene20 (837 of the 2,126 frames of one variation and camera,
  a 61/39 split) and the other scenes to train (:func:`mtl_jax.data.manual.scene_split`).

Real split sizes for one variation (e.g. ``clone``) and ``Camera_0``: 2,126 frames (Scene01 447,
Scene02 233, Scene06 270, Scene18 339, Scene20 837); ``random``: 1,701 train / 425 val;
``scene``: 1,289 train / 837 val. Both cameras double them, ``all`` variations multiply them by
ten.

**Builder configs** are named ``{H}x{W}_{variation}_{split}`` (a ``_cam1`` / ``_cam01`` suffix for
other cameras than Camera_0, available through :func:`make_config`); predefined are 320×1024
(DenseMTL's 1024×320) and 48×160 (tests) for each of the ten variations and ``all``, with both
split schemes and Camera_0. The default is ``320x1024_clone_random``.

The files may have any size (the official ones are 375×1242) as long as an example's image,
class PNG and depth PNG agree; ``intrinsic.txt`` is taken to describe that size.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
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
    resize_example,
    scale_intrinsics,
    scene_split,
    seeded_split,
)
from mtl_jax.errors import UserError

#: The scenes of the official release (others found in the folder are read too).
SCENES = ("Scene01", "Scene02", "Scene06", "Scene18", "Scene20")
#: The rendering variations of every scene.
VARIATIONS = ("clone", "15-deg-left", "15-deg-right", "30-deg-left", "30-deg-right", "fog",
              "morning", "overcast", "rain", "sunset")
ALL_VARIATIONS = "all"
SPLIT_SCHEMES = ("random", "scene")
#: Scenes of the val split of the ``scene`` scheme.
VAL_SCENES = ("Scene20",)
VAL_FRACTION = 0.2
SPLIT_SEED = 0
CAMERAS = (0, 1)
NATIVE_HW = (375, 1242)
#: Stored depth value of the far plane (655.35 m).
FAR_PLANE_CM = 65535
RESOLUTIONS = ((320, 1024), (48, 160))
DEFAULT_HEIGHT, DEFAULT_WIDTH = RESOLUTIONS[0]

#: ``(name, (r, g, b))`` of the 14 classes, in the order of the dataset's ``colors.txt``.
CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Terrain", (210, 0, 200)),
    ("Sky", (90, 200, 255)),
    ("Tree", (0, 199, 0)),
    ("Vegetation", (90, 240, 0)),
    ("Building", (140, 140, 140)),
    ("Road", (100, 60, 100)),
    ("GuardRail", (250, 100, 255)),
    ("TrafficSign", (255, 255, 0)),
    ("TrafficLight", (200, 200, 0)),
    ("Pole", (255, 130, 0)),
    ("Misc", (80, 80, 80)),
    ("Truck", (160, 60, 60)),
    ("Car", (255, 127, 80)),
    ("Van", (0, 139, 139)),
)
#: The colour of unlabelled pixels (class ``-1``).
UNDEFINED_COLOUR = (0, 0, 0)
CLASS_NAMES = tuple(name for name, _ in CLASSES)
NUM_CLASSES = len(CLASSES)

DOWNLOAD_URL = "https://europe.naverlabs.com/research/computer-vision/proxy-virtual-worlds-vkitti-2/"
EXPECTED_TREE = """\
FOLDER/          (the official archives unpacked side by side)
  vkitti_2.0.3_rgb/                 from vkitti_2.0.3_rgb.tar
    {Scene}/{variation}/frames/rgb/Camera_{0,1}/rgb_{frame:05d}.jpg       JPEG, 375x1242
  vkitti_2.0.3_classSegmentation/   from vkitti_2.0.3_classSegmentation.tar
    {Scene}/{variation}/frames/classSegmentation/Camera_{0,1}/classgt_{frame:05d}.png
                                    RGB colour codes of colors.txt
  vkitti_2.0.3_depth/               from vkitti_2.0.3_depth.tar
    {Scene}/{variation}/frames/depth/Camera_{0,1}/depth_{frame:05d}.png
                                    16-bit z-depth in cm (65535 = far plane)
  vkitti_2.0.3_textgt/              from vkitti_2.0.3_textgt.tar.gz
    {Scene}/{variation}/intrinsic.txt    frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]
  Scenes: Scene01 Scene02 Scene06 Scene18 Scene20; variations: clone 15-deg-left
  15-deg-right 30-deg-left 30-deg-right fog morning overcast rain sunset
  (only the variation(s) and camera(s) of the builder config are read)"""

_PACKAGES = ("vkitti_2.0.3_rgb", "vkitti_2.0.3_classSegmentation", "vkitti_2.0.3_depth",
             "vkitti_2.0.3_textgt")
_FRAME_FILE = re.compile(r"rgb_(\d{5})\.jpg")
_SCENE_DIR = re.compile(r"Scene\d+")


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass
class Vkitti2Config(tfds.core.BuilderConfig):
    """Stored resolution, variation(s), camera(s) and split scheme of one variant."""

    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    variation: str = "clone"
    split: str = "random"
    cameras: tuple[int, ...] = (0,)

    @property
    def variations(self) -> tuple[str, ...]:
        return VARIATIONS if self.variation == ALL_VARIATIONS else (self.variation,)


def config_name(height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                variation: str = "clone", split: str = "random",
                cameras: Iterable[int] = (0,)) -> str:
    """``{H}x{W}_{variation}_{split}``, plus ``_cam{ids}`` unless the cameras are (0,)."""
    cams = tuple(cameras)
    suffix = "" if cams == (0,) else "_cam" + "".join(str(c) for c in cams)
    return f"{height}x{width}_{variation}_{split}{suffix}"


def make_config(height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                variation: str = "clone", split: str = "random",
                cameras: Iterable[int] = (0,)) -> Vkitti2Config:
    """A validated :class:`Vkitti2Config` with its canonical name."""
    if variation not in (*VARIATIONS, ALL_VARIATIONS):
        raise UserError(f"vkitti2: variation must be one of {VARIATIONS} or "
                        f"{ALL_VARIATIONS!r}, got {variation!r}")
    if split not in SPLIT_SCHEMES:
        raise UserError(f"vkitti2: split must be one of {SPLIT_SCHEMES}, got {split!r}")
    cams = tuple(sorted(set(int(c) for c in cameras)))
    if not cams or not set(cams) <= set(CAMERAS):
        raise UserError(f"vkitti2: cameras must be a non-empty subset of {CAMERAS}, "
                        f"got {tuple(cameras)}")
    if height < 8 or width < 8:
        raise UserError(f"vkitti2: resolution must be at least 8x8, got {height}x{width}")
    how = ("seeded random 80/20 frame split" if split == "random"
           else f"{', '.join(VAL_SCENES)} as val")
    return Vkitti2Config(
        name=config_name(height, width, variation, split, cams), height=height, width=width,
        variation=variation, split=split, cameras=cams,
        description=f"VKITTI2 {variation} variation(s), Camera {cams}, {height}x{width}, {how}")


def _predefined_configs() -> list[Vkitti2Config]:
    return [make_config(h, w, v, s) for h, w in RESOLUTIONS
            for v in (*VARIATIONS, ALL_VARIATIONS) for s in SPLIT_SCHEMES]


# -------------------------------------------------------------------------- file formats
def _colour_code(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


_CODE_TO_CLASS = {int(_colour_code(np.array(colour))): i for i, (_, colour) in enumerate(CLASSES)}
_CODE_TO_CLASS[int(_colour_code(np.array(UNDEFINED_COLOUR)))] = -1


def colours_to_classes(path: str, colours: np.ndarray) -> np.ndarray:
    """int16 ``[H, W]`` classes (``-1`` Undefined) of a colour-coded ``[H, W, 3]`` class PNG;
    BadFileError naming ``path`` and the first colour that is not in :data:`CLASSES`."""
    code = _colour_code(colours)
    keys, inverse = np.unique(code.reshape(-1), return_inverse=True)
    table = np.empty(keys.shape, np.int16)
    for j, key in enumerate(keys.tolist()):
        if key not in _CODE_TO_CLASS:
            row, col = np.unravel_index(int(np.argmax(code == key)), code.shape)
            colour = (key >> 16, (key >> 8) & 255, key & 255)
            raise BadFileError(
                f"{path}: colour {colour} (first at row {row}, column {col}) is not one of the "
                f"{NUM_CLASSES} VKITTI2 class colours nor Undefined {UNDEFINED_COLOUR}")
        table[j] = _CODE_TO_CLASS[key]
    return table[inverse].reshape(code.shape)


def centimetres_to_metres(stored: np.ndarray) -> np.ndarray:
    """float32 metres of stored centimetres (the far plane 65535 becomes 655.35 m)."""
    return (np.asarray(stored, np.float64) / 100.0).astype(np.float32)


def depth_and_normals(stored: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(depth in metres, normals)`` of a stored centimetre depth map at its own resolution
    with the intrinsics ``k`` of that resolution; the far plane (:data:`FAR_PLANE_CM`) keeps
    its depth but gets no normal (all-zero). Also used by :mod:`.synthia`."""
    depth = centimetres_to_metres(stored)
    return depth, normals_for(np.where(stored == FAR_PLANE_CM, 0.0, depth), k)


def read_intrinsics(path: str) -> dict[tuple[int, int], np.ndarray]:
    """``{(frame, camera): (fx, fy, cx, cy)}`` of an ``intrinsic.txt`` (a header line
    ``frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]``, then one row per frame and camera)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BadFileError(f"cannot read {path}: {e}") from e
    table: dict[tuple[int, int], np.ndarray] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or (number == 1 and fields[0] == "frame"):
            continue
        try:
            if len(fields) != 6:
                raise ValueError(f"{len(fields)} fields")
            frame, camera = int(fields[0]), int(fields[1])
            k = np.array([float(x) for x in fields[2:]], np.float64)
        except ValueError as e:
            raise BadFileError(f"{path}, line {number}: expected 'frame cameraID fx fy cx cy', "
                               f"got {line!r} ({e})") from e
        if not (np.all(np.isfinite(k)) and k[0] > 0 and k[1] > 0):
            raise BadFileError(f"{path}, line {number}: focal lengths must be positive and "
                               f"all values finite, got {line!r}")
        table[frame, camera] = k
    if not table:
        raise BadFileError(f"{path}: no intrinsics rows")
    return table


# ------------------------------------------------------------------------------- helpers
class Frame(NamedTuple):
    """One example: a frame of one variation seen by one camera."""

    scene: str
    variation: str
    frame: int
    camera: int

    def relpaths(self) -> dict[str, str]:
        s, v, c, n = self.scene, self.variation, self.camera, self.frame
        return {
            "rgb": f"vkitti_2.0.3_rgb/{s}/{v}/frames/rgb/Camera_{c}/rgb_{n:05d}.jpg",
            "classgt": (f"vkitti_2.0.3_classSegmentation/{s}/{v}/frames/classSegmentation/"
                        f"Camera_{c}/classgt_{n:05d}.png"),
            "depth": f"vkitti_2.0.3_depth/{s}/{v}/frames/depth/Camera_{c}/depth_{n:05d}.png",
        }


def _intrinsics_relpath(scene: str, variation: str) -> str:
    return f"vkitti_2.0.3_textgt/{scene}/{variation}/intrinsic.txt"


# ------------------------------------------------------------------------------- builder
class MtlVkitti2(ManualBuilder):
    """Virtual KITTI 2: semseg (14 classes), depth in metres, normals from depth, intrinsics.

    See the module docstring for the classes, the depth unit and far plane, the split schemes
    and the builder configs.
    """

    REGISTRY_NAME = "vkitti2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = _predefined_configs()
    DEFAULT_CONFIG_NAME = config_name()
    DOWNLOAD_URL = DOWNLOAD_URL
    EXPECTED_TREE = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download vkitti_2.0.3_rgb.tar, vkitti_2.0.3_classSegmentation.tar, "
        f"vkitti_2.0.3_depth.tar and vkitti_2.0.3_textgt.tar.gz from {DOWNLOAD_URL}, unpack "
        f"them into one folder and pass it as --manual_dir. Expected tree:\n{EXPECTED_TREE}")
    NUM_CLASSES = NUM_CLASSES
    CLASS_NAMES = CLASS_NAMES

    FEATURES = dict(normals=True, intrinsics=True)
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_KITTI}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        self.check_files(root, _PACKAGES)
        frames = self._list_frames(root)
        intrinsics = self._read_intrinsics(root, frames)
        train, val = self._split(root, frames)
        return {"train": self._generate_examples(root, train, intrinsics),
                "val": self._generate_examples(root, val, intrinsics)}

    def _list_frames(self, root: str) -> list[Frame]:
        """Every example of the config in (scene, variation, frame, camera) order (scenes
        sorted by name, variations in :data:`VARIATIONS` order, frames by number), after
        checking that each has its image, class PNG and depth PNG."""
        c = self.builder_config
        rgb_root = os.path.join(root, _PACKAGES[0])
        scenes = sorted(d for d in os.listdir(rgb_root)
                        if _SCENE_DIR.fullmatch(d) and os.path.isdir(os.path.join(rgb_root, d)))
        if not scenes:
            raise self.missing(f"'{_PACKAGES[0]}/SceneNN' (no scene folder)", root)
        frames: list[Frame] = []
        for scene in scenes:
            for variation in c.variations:
                first = Frame(scene, variation, 0, c.cameras[0]).relpaths()["rgb"]
                folder = os.path.dirname(first)
                self.check_files(root, [folder])
                numbers = sorted(int(m.group(1)) for m in map(
                    _FRAME_FILE.fullmatch, os.listdir(os.path.join(root, folder))) if m)
                if not numbers:
                    raise self.missing(f"'{first}' (no rgb_NNNNN.jpg in {folder})", root)
                frames += [Frame(scene, variation, n, cam) for n in numbers
                           for cam in c.cameras]
        self.check_files(root, (rel for f in frames for rel in f.relpaths().values()))
        return frames

    def _read_intrinsics(self, root: str, frames: list[Frame]
                         ) -> dict[tuple[str, str], dict[tuple[int, int], np.ndarray]]:
        """The intrinsics table of every (scene, variation), checked to hold a row for every
        example."""
        tables = {}
        for scene, variation in sorted({(f.scene, f.variation) for f in frames}):
            rel = _intrinsics_relpath(scene, variation)
            self.check_files(root, [rel])
            tables[scene, variation] = read_intrinsics(os.path.join(root, rel))
        for f in frames:
            if (f.frame, f.camera) not in tables[f.scene, f.variation]:
                raise BadFileError(
                    f"{os.path.join(root, _intrinsics_relpath(f.scene, f.variation))}: no row "
                    f"for frame {f.frame} and camera {f.camera}")
        return tables

    def _split(self, root: str, frames: list[Frame]) -> tuple[list[Frame], list[Frame]]:
        """``(train, val)`` examples: the split unit is the frame ``(scene, frame number)``."""
        c = self.builder_config
        units = sorted({(f.scene, f.frame) for f in frames})
        if c.split == "random":
            _, val_units = seeded_split(units, VAL_FRACTION, SPLIT_SEED)
        else:
            try:
                _, val_units = scene_split(units, lambda u: u[0], VAL_SCENES)
            except ValueError as e:
                raise self.missing(f"the val scene(s) {', '.join(VAL_SCENES)} of the 'scene' "
                                   f"split ({e})", root) from e
        val_set = set(val_units)
        train = [f for f in frames if (f.scene, f.frame) not in val_set]
        val = [f for f in frames if (f.scene, f.frame) in val_set]
        return train, val

    def _generate_examples(self, root: str, frames: list[Frame], intrinsics):
        def load(frame: Frame) -> dict[str, np.ndarray]:
            k = intrinsics[frame.scene, frame.variation][frame.frame, frame.camera]
            return self._load_example(root, frame, k)

        yield from self.indexed_examples(load, frames)

    def _load_example(self, root: str, frame: Frame,
                      k_native: np.ndarray) -> dict[str, np.ndarray]:
        c = self.builder_config
        paths = {key: os.path.join(root, rel) for key, rel in frame.relpaths().items()}
        image = read_image(paths["rgb"])
        hw = image.shape[:2]
        colours = read_png(paths["classgt"], bits=8)
        if colours.ndim == 3 and colours.shape[-1] == 4:  # an alpha channel is ignored
            colours = colours[..., :3]
        check_shape(paths["classgt"], colours, (*hw, 3))
        semseg = colours_to_classes(paths["classgt"], colours)
        stored = read_png(paths["depth"], bits=16)
        check_shape(paths["depth"], stored, hw)

        depth, normals = depth_and_normals(stored, k_native)
        example = resize_example(c.height, c.width, image=image, semseg=semseg, depth=depth,
                                 normals=normals)
        example["intrinsics"] = scale_intrinsics(k_native, hw, (c.height, c.width))
        return example
