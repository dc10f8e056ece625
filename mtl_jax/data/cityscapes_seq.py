"""TFDS builder of Cityscapes frame triplets (``cityscapes_seq``), for semantic segmentation with
self-supervised depth from video (DenseMTL's "Cityscapes SDE" setting).

One example per finely annotated frame ``t`` of the official train (2,975) and val (500)
splits: the frames ``t-1``, ``t``, ``t+1`` of its 30-frame snippet in
``leftImg8bit_sequence`` (the annotated frame is the snippet's 20th, ``..._000019`` for the
snippets that start at ``..._000000``), its ``gtFine`` labels and the intrinsics of its
``camera`` file. Stored fields, at the builder config's resolution (default 512×1024, the
released code's; images bilinear, labels and depth nearest):

* ``image``, ``image_prev``, ``image_next``: uint8 ``[H,W,3]``, frames t, t-1, t+1;
* ``semseg``: int16 ``[H,W]``, frame t's labels in the config's label set (default DenseMTL's
  16 classes; see :mod:`mtl_jax.data.cityscapes`), ``-1`` ignore;
* ``intrinsics``: float32 ``[4]`` ``(fx, fy, cx, cy)`` of the camera file rescaled to the
  stored resolution (half-pixel-centre convention, :func:`mtl_jax.data.geometry.scale_intrinsics`);
* ``depth``: float32 ``[H,W,1]`` z-depth of frame t in metres from ``disparity`` as the
  ``cityscapes`` builder converts it (``baseline · fx / ((p − 1) / 256)``, ``p ≤ 1`` invalid),
  for **evaluation only**; all ``0`` (invalid) when the folder has no ``disparity/``.

The camera files describe the full-resolution 2048×1024 images: the images read must be those
(a resized copy such as the ``leftImg8bit_sequence_small`` the released code reads would
silently get wrong geometry), so a principal point outside the image read is an error. There
are no camera poses: the self-supervised loss estimates them.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.data.cityscapes import (
    CLASS_NAMES,
    DOWNLOAD_URL,
    RESOLUTIONS,
    SPLITS,
    LabelSetsMixin,
    config_name,
    disparity_to_depth,
    label_lookup,
    make_configs,
    read_camera,
    read_label_ids,
)
from mtl_jax.data.manual import (
    DEPTH_RANGE_KITTI,
    BadFileError,
    ManualBuilder,
    ManualDataError,
    check_shape,
    read_image,
    read_png,
    resize_image,
    resize_nearest,
    scale_intrinsics,
)

SEQUENCE = "leftImg8bit_sequence"
#: package folder -> (file-name suffix after "{city}_{seq}_{frame}", the zip it comes from)
PACKAGES = {
    SEQUENCE: ("_leftImg8bit.png", "leftImg8bit_sequence_trainvaltest.zip"),
    "gtFine": ("_gtFine_labelIds.png", "gtFine_trainvaltest.zip"),
    "camera": ("_camera.json", "camera_trainvaltest.zip"),
    "disparity": ("_disparity.png", "disparity_trainvaltest.zip"),
}
#: The neighbours of the annotated frame: (name in messages, frame offset).
NEIGHBOURS = (("t-1", -1), ("t+1", 1))

EXPECTED_TREE = """\
FOLDER/                     (the official packages unpacked side by side)
  leftImg8bit_sequence/     from leftImg8bit_sequence_trainvaltest.zip (the 30-frame snippets)
    train/{city}/{city}_{seq}_{frame}_leftImg8bit.png    RGB, 1024x2048
    val/...
  gtFine/                   from gtFine_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png    the annotated frames (t)
    val/...
  camera/                   from camera_trainvaltest.zip
    train/{city}/{city}_{seq}_{frame}_camera.json    intrinsic fx fy u0 v0 (of 1024x2048)
    val/...
  disparity/                optional, from disparity_trainvaltest.zip (depth for evaluation)
    train/{city}/{city}_{seq}_{frame}_disparity.png
    val/...
(frames t-1 and t+1 of every annotated frame t are read from leftImg8bit_sequence; the test/
folders are not read)"""


def _relpath(package: str, split: str, city: str, name: str) -> str:
    return f"{package}/{split}/{city}/{name}{PACKAGES[package][0]}"


def frame_name(name: str, offset: int) -> str:
    """``"{city}_{seq}_{frame}"`` of the frame ``offset`` frames after ``name``'s."""
    prefix, frame = name.rsplit("_", 1)
    return f"{prefix}_{int(frame) + offset:06d}"


def check_principal_point(camera_path: str, intrinsics: np.ndarray, image_path: str,
                          hw: tuple[int, int]) -> None:
    """BadFileError unless the camera file's principal point ``(u0, v0)`` lies inside the
    ``hw`` image it goes with (a camera file of the full-resolution image paired with a
    resized image puts it outside)."""
    u0, v0 = float(intrinsics[2]), float(intrinsics[3])
    h, w = hw
    if not (0.0 <= u0 <= w - 1 and 0.0 <= v0 <= h - 1):
        raise BadFileError(
            f"{camera_path}: principal point (u0, v0) = ({u0:g}, {v0:g}) lies outside the "
            f"{w}x{h} image {image_path}; Cityscapes camera files describe the full-resolution "
            f"2048x1024 images: unpack the full-resolution {PACKAGES[SEQUENCE][1]} (not a "
            "resized or _small copy)")


class MtlCityscapesSeq(LabelSetsMixin, ManualBuilder):
    """Cityscapes frame triplets (t-1, t, t+1) around every annotated frame, with semseg of
    frame t, intrinsics and (optionally) disparity-derived depth for evaluation.

    Builder configs ``{H}x{W}_{N}cls`` as ``cityscapes``'s; the default ``512x1024_16cls`` is
    the released DenseMTL code's setting (1024×512 frames, 16 classes). See the module
    docstring.
    """

    REGISTRY_NAME = "cityscapes_seq"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = make_configs(RESOLUTIONS, CLASS_NAMES,
                                   "Cityscapes frame triplets, intrinsics, depth for evaluation")
    DEFAULT_CONFIG_NAME = config_name(512, 1024, 16)
    DOWNLOAD_URL = DOWNLOAD_URL
    EXPECTED_TREE = EXPECTED_TREE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Register at {DOWNLOAD_URL} and download leftImg8bit_sequence_trainvaltest.zip, "
        "gtFine_trainvaltest.zip, camera_trainvaltest.zip and (optional: depth for evaluation) "
        "disparity_trainvaltest.zip; unpack them into one folder and pass it as --manual_dir. "
        f"Expected tree:\n{EXPECTED_TREE}")
    NUM_CLASSES = {c.name: c.num_classes for c in BUILDER_CONFIGS}
    CLASS_NAMES = CLASS_NAMES

    FEATURES = dict(normals=False)
    TASK_DEFAULTS = {"depth": DEPTH_RANGE_KITTI}

    def extra_features(self):
        h, w = self.stored_size()
        return {key: tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8)
                for key in ("image_prev", "image_next")}

    def _missing_package(self, root: str, package: str, split: str | None = None
                         ) -> ManualDataError:
        folder = f"{package}/{split}/" if split else f"{package}/"
        return ManualDataError(
            f"{self.registry_name()}: {root} has no {folder} folder; download "
            f"{PACKAGES[package][1]} from {DOWNLOAD_URL} and unpack it into {root}")

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        for package in (SEQUENCE, "camera", "gtFine"):
            for split in (None, *SPLITS):
                if not os.path.isdir(os.path.join(root, package, *([split] if split else []))):
                    raise self._missing_package(root, package, split)
        with_depth = os.path.isdir(os.path.join(root, "disparity"))
        found = {split: self._list_split(root, split, with_depth) for split in SPLITS}
        shared = sorted({n for _, n in found["train"]} & {n for _, n in found["val"]})
        if shared:
            raise BadFileError(f"{root}: {len(shared)} annotated frames are in both train and "
                               f"val, e.g. {shared[0]}; the official splits share none")
        return {split: self._generate_examples(root, split, found[split], with_depth)
                for split in SPLITS}

    def _list_split(self, root: str, split: str, with_depth: bool) -> list[tuple[str, str]]:
        """``(city, "{city}_{seq}_{frame}")`` of every annotated frame of ``split``, sorted by
        name, after checking that its three frames, camera and disparity files exist."""
        label_dir = os.path.join(root, "gtFine", split)
        suffix = PACKAGES["gtFine"][0]
        items = sorted(
            ((city, f[:-len(suffix)]) for city in os.listdir(label_dir)
             if os.path.isdir(os.path.join(label_dir, city))
             for f in os.listdir(os.path.join(label_dir, city)) if f.endswith(suffix)),
            key=lambda item: (item[1], item[0]))
        if not items:
            raise ManualDataError(f"{self.registry_name()}: no '*{suffix}' files in "
                                  f"{label_dir}/{{city}}/; unpack gtFine_trainvaltest.zip there")
        for city, name in items:
            for package in ("camera", "disparity") if with_depth else ("camera",):
                rel = _relpath(package, split, city, name)
                if not os.path.isfile(os.path.join(root, rel)):
                    raise ManualDataError(
                        f"{self.registry_name()}: {rel} (of the annotated frame {name}) is "
                        f"missing in {root}; unpack the whole {PACKAGES[package][1]}")
            for which, offset in (("t", 0), *NEIGHBOURS):
                rel = _relpath(SEQUENCE, split, city, frame_name(name, offset))
                if not os.path.isfile(os.path.join(root, rel)):
                    raise ManualDataError(
                        f"{self.registry_name()}: frame {which} of the annotated frame {name}, "
                        f"{rel}, is missing in {root}; unpack the whole "
                        f"{PACKAGES[SEQUENCE][1]} (30 frames per snippet, the annotated one "
                        "is the 20th)")
        return items

    def _generate_examples(self, root: str, split: str, items: list[tuple[str, str]],
                           with_depth: bool):
        def load(item: tuple[str, str]) -> dict[str, np.ndarray]:
            return self._load_example(root, split, *item, with_depth=with_depth)

        yield from self.indexed_examples(load, items)

    def _load_example(self, root: str, split: str, city: str, name: str, *,
                      with_depth: bool) -> dict[str, np.ndarray]:
        c = self.builder_config
        size = (c.height, c.width)

        def path(package: str, frame: str = name) -> str:
            return os.path.join(root, _relpath(package, split, city, frame))

        centre = path(SEQUENCE)
        image = read_image(centre)
        hw = image.shape[:2]
        frames = {}
        for key, (_, offset) in zip(("image_prev", "image_next"), NEIGHBOURS):
            frame_path = path(SEQUENCE, frame_name(name, offset))
            frames[key] = read_image(frame_path)
            check_shape(frame_path, frames[key], (*hw, 3))
        ids = read_label_ids(path("gtFine"), hw)
        baseline, k_full = read_camera(path("camera"))
        check_principal_point(path("camera"), k_full, centre, hw)
        if with_depth:
            disparity = read_png(path("disparity"), bits=16)
            check_shape(path("disparity"), disparity, hw)
            depth = resize_nearest(disparity_to_depth(disparity, baseline, k_full[0]), *size)
        else:
            depth = np.zeros(size, np.float32)
        return {
            "image": resize_image(image, *size),
            **{key: resize_image(frame, *size) for key, frame in frames.items()},
            "semseg": resize_nearest(label_lookup(c.num_classes)[ids], *size).astype(np.int16),
            "depth": depth[..., None].astype(np.float32),
            "intrinsics": scale_intrinsics(k_full, hw, size).astype(np.float32),
        }
