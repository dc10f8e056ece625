"""Shared machinery of the builders that read a folder the user downloaded (issue 6).

None of the papers' datasets can be downloaded by code (licences, registration), so each is a
TFDS builder with ``MANUAL_DOWNLOAD_INSTRUCTIONS`` that reads ``manual_dir`` and writes
``array_record`` in the batch contract of ``docs/datasets.md``. This module gives them:

* :class:`ManualBuilder` -- the base class: names the download page and the expected tree,
  checks that the folder and the files a builder needs exist (``check_files``), and builds the
  features dict of the contract (:meth:`ManualBuilder.dense_features`);
* :class:`ManualDataError` -- a missing folder/file (the message shows the expected tree, the
  first missing path and the download page) and :class:`BadFileError` -- a file that exists but
  holds wrong data (named in the message);
* readers that validate what they read (``read_png``, ``read_image``, ``read_npy``) and
  validation helpers (``check_shape``, ``check_labels``, ``check_depth``);
* resizing to the builder config's resolution (``resize_image`` bilinear, ``resize_nearest``
  for labels and depth) with the intrinsics rescaled;
* ``ordered_map``: threaded decoding in order with bounded look-ahead;
* splits: ``seeded_split`` (one seeded permutation cut once, so train and val never share an
  example) and ``scene_split`` (whole scenes/sequences to val, for video frames whose
  neighbours are near-duplicates).

Every builder's examples hold: ``image`` uint8 ``[H,W,3]``; where the dataset has them
``semseg`` int16 ``[H,W]`` (``-1`` ignore), ``depth`` float32 ``[H,W,1]`` (metres unless the
dataset's docs say otherwise, ``0`` invalid), ``normals`` float16 ``[H,W,3]`` (camera frame,
all-zero invalid), ``edges`` int8 ``[H,W]``, ``intrinsics`` float32 ``[4]`` (at the stored
resolution), and ``index`` int32 (the record's position in its split).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mtl_jax.data import geometry

# Re-exported for the builders: one nearest resize (half-pixel centres) and one intrinsics
# rescaling for the whole library.
from mtl_jax.data.augment import resize_nearest  # noqa: F401
from mtl_jax.data.geometry import scale_intrinsics  # noqa: F401
from mtl_jax.errors import UserError


class ManualDataError(UserError, FileNotFoundError):
    """The manually downloaded folder, or a file in it, is missing."""


class BadFileError(UserError, ValueError):
    """A file of the manual folder exists but its content is not what the dataset stores."""


#: Depth evaluation ranges (metres): metrics keep ground truth in (min, max) and clamp the
#: prediction to it. Outdoor driving sets (VKITTI2, Synthia, Cityscapes): KITTI's convention,
#: also DenseMTL's; indoor (NYUv2, NYUD-MT): the Kinect's ~10 m.
DEPTH_RANGE_KITTI: dict[str, float] = dict(min_depth=1e-3, max_depth=80.0)
DEPTH_RANGE_NYU: dict[str, float] = dict(min_depth=1e-3, max_depth=10.0)


class ManualBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the builders that read ``manual_dir`` (see the module docstring).

    Subclasses set ``DOWNLOAD_URL`` (the official page), ``EXPECTED_TREE`` (the folder layout
    as text, shown in errors), ``FEATURES`` (which contract fields they store) and implement
    ``_split_generators`` / ``_generate_examples`` as usual, calling :meth:`manual_root` first
    thing in ``_split_generators``. ``_info`` is shared: the module docstring, the features at
    :meth:`stored_size` plus :meth:`extra_features`, ``disable_shuffling`` (record i of a split
    is example i) and the download page.
    """

    GENERATED: ClassVar[bool] = False
    DOWNLOAD_URL: ClassVar[str] = ""
    EXPECTED_TREE: ClassVar[str] = ""
    #: Keyword arguments of :meth:`dense_features` (which fields the dataset stores).
    FEATURES: ClassVar[dict[str, Any]] = {}
    #: Task options this dataset implies, ``{task: {option: value}}`` (e.g. the depth
    #: evaluation range); ``config.tasks`` options override them (``experiment.build_tasks``).
    TASK_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Threads that decode examples (``ordered_map``) while TFDS serialises earlier ones.
    NUM_WORKERS: ClassVar[int] = min(8, os.cpu_count() or 1)

    def stored_size(self) -> tuple[int, int]:
        """``(H, W)`` of the stored examples (default: the builder config's height/width)."""
        c = self.builder_config
        return int(c.height), int(c.width)

    def extra_features(self) -> dict[str, Any]:
        """Features beyond the contract's (e.g. where a tile came from); default none."""
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        h, w = self.stored_size()
        return tfds.core.DatasetInfo(
            builder=self,
            description=sys.modules[type(self).__module__].__doc__,
            features=self.dense_features(h, w, **self.FEATURES, extra=self.extra_features()),
            disable_shuffling=True,
            homepage=self.DOWNLOAD_URL,
        )

    @classmethod
    def instructions(cls) -> str:
        return (f"Download the dataset from {cls.DOWNLOAD_URL} (registration may be needed; "
                f"nothing is downloaded for you) and arrange it as:\n{cls.EXPECTED_TREE}\n"
                f"then run: mtl-jax data build {cls.registry_name()} --manual_dir=FOLDER")

    @classmethod
    def registry_name(cls) -> str:
        return getattr(cls, "REGISTRY_NAME", cls.name)

    @classmethod
    def missing(cls, what: str, root: str | None = None) -> ManualDataError:
        """A :class:`ManualDataError` naming ``what`` is missing, with the expected tree and
        the download page."""
        where = f" in {root}" if root else ""
        return ManualDataError(
            f"{cls.registry_name()}: {what} is missing{where}.\nExpected tree:\n"
            f"{cls.EXPECTED_TREE}\nDownload page: {cls.DOWNLOAD_URL} (download it yourself; "
            f"mtl-jax never downloads datasets)")

    def manual_root(self, dl_manager) -> str:
        """``manual_dir`` as a string, checked to exist; raises :class:`ManualDataError`."""
        try:
            root = os.fspath(dl_manager.manual_dir)
        except Exception as e:  # TFDS raises when the folder is unset, missing or empty
            raise self.missing("the manual download folder (--manual_dir)") from e
        if not os.path.isdir(root):
            raise self.missing(f"the folder {root}")
        return root

    def indexed_examples(self, load: Callable[[Any], dict[str, Any]],
                         items: Iterable[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(i, example)`` of ``load(item)`` for every item in order, decoded by
        :data:`NUM_WORKERS` threads (:func:`ordered_map`), each with its ``index`` ``i``."""
        examples = ordered_map(load, items, self.NUM_WORKERS, 2 * self.NUM_WORKERS)
        for i, example in enumerate(examples):
            example["index"] = np.int32(i)
            yield i, example

    def check_files(self, root: str, relative_paths: Iterable[str]) -> None:
        """Raise :class:`ManualDataError` for the first of ``relative_paths`` not in ``root``
        (files or folders)."""
        for rel in relative_paths:
            if not os.path.exists(os.path.join(root, rel)):
                raise self.missing(f"'{rel}'", root)

    @staticmethod
    def dense_features(height: int, width: int, *, semseg: bool = True, depth: bool = True,
                       normals: bool = True, edges: bool = False, intrinsics: bool = True,
                       extra: dict[str, Any] | None = None) -> tfds.features.FeaturesDict:
        """The features dict of the batch contract at ``height × width`` (module docstring)."""
        zlib = tfds.features.Encoding.ZLIB
        f: dict[str, Any] = {
            "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8),
            "index": tfds.features.Scalar(dtype=np.int32),
        }
        if semseg:
            f["semseg"] = tfds.features.Tensor(shape=(height, width), dtype=np.int16,
                                               encoding=zlib)
        if depth:
            f["depth"] = tfds.features.Tensor(shape=(height, width, 1), dtype=np.float32,
                                              encoding=zlib)
        if normals:
            f["normals"] = tfds.features.Tensor(shape=(height, width, 3), dtype=np.float16,
                                                encoding=zlib)
        if edges:
            f["edges"] = tfds.features.Tensor(shape=(height, width), dtype=np.int8,
                                              encoding=zlib)
        if intrinsics:
            f["intrinsics"] = tfds.features.Tensor(shape=(4,), dtype=np.float32)
        f.update(extra or {})
        return tfds.features.FeaturesDict(f)


# ------------------------------------------------------------------------------------ reading
def read_image(path: str) -> np.ndarray:
    """An RGB image file (PNG/JPEG/TIFF) as uint8 ``[H, W, 3]``; BadFileError if unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise BadFileError(f"cannot read image {path}: {e}") from e


def read_png(path: str, *, bits: int | None = None) -> np.ndarray:
    """A PNG (or TIFF) with its stored values (8-bit, 16-bit, palette indices, RGB) as an
    integer array; ``bits`` checks the stored bit depth (8 or 16)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise BadFileError(f"cannot read {path}: {e}") from e
    if bits == 16 and not (mode.startswith("I;16") or mode == "I" or arr.dtype == np.uint16
                           or arr.dtype == np.int32):
        raise BadFileError(f"{path}: expected a 16-bit PNG, got mode {mode!r}")
    if bits == 8 and arr.dtype != np.uint8:
        raise BadFileError(f"{path}: expected an 8-bit PNG, got mode {mode!r}")
    return arr


def read_npy(path: str) -> np.ndarray:
    """A ``.npy`` array; BadFileError naming the file if it is not one."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadFileError(f"cannot read {path} as .npy: {e}") from e


# --------------------------------------------------------------------------------- validation
def check_shape(path: str, array: np.ndarray, shape: Sequence[int | None]) -> None:
    """BadFileError unless ``array.shape`` matches ``shape`` (``None`` = any size)."""
    ok = array.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, array.shape))
    if not ok:
        raise BadFileError(f"{path}: expected shape {tuple(shape)}, got {array.shape}")


def check_labels(path: str, labels: np.ndarray, num_classes: int, ignore: int = -1) -> None:
    """BadFileError naming the values of ``labels`` outside ``[0, num_classes)`` ∪ {ignore}."""
    values = np.unique(labels)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        raise BadFileError(f"{path}: label values {shown} are outside [0, {num_classes}) and not "
                           f"the ignore value {ignore}")


def check_normals(path: str, normals: np.ndarray, bound: float) -> None:
    """BadFileError unless ``normals`` are floats, finite, with every component within
    ``±bound`` (``[-1, 1]`` plus a tolerance)."""
    if normals.dtype.kind != "f":
        raise BadFileError(f"{path}: expected float normals in [-1, 1], got {normals.dtype}")
    if not np.all(np.isfinite(normals)):
        raise BadFileError(f"{path}: normals have NaN or infinite values")
    if np.any(np.abs(normals) > bound):
        raise BadFileError(f"{path}: normal components up to {float(np.abs(normals).max()):g}, "
                           "expected values in [-1, 1]")


def check_depth(path: str, depth: np.ndarray, max_depth: float) -> None:
    """BadFileError if depth has NaN/inf, negative values or values above ``max_depth``
    (a unit error, e.g. millimetres read as metres)."""
    if not np.all(np.isfinite(depth)):
        raise BadFileError(f"{path}: depth has NaN or infinite values")
    if np.any(depth < 0):
        raise BadFileError(f"{path}: depth has negative values (min {depth.min():g})")
    if np.any(depth > max_depth):
        raise BadFileError(f"{path}: depth values up to {depth.max():g} exceed {max_depth:g}; "
                           "wrong unit?")


# --------------------------------------------------------------------------------- resolution
def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB resized bilinearly (PIL, antialiased when shrinking) to ``height × width``."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), np.uint8)


def resize_example(height: int, width: int, *, image: np.ndarray, semseg: np.ndarray,
                   depth: np.ndarray, normals: np.ndarray) -> dict[str, np.ndarray]:
    """The fields of an example read at the files' resolution, resized to ``height × width``:
    the image bilinearly (:func:`resize_image`), semseg (as int16), depth (as ``[H, W, 1]``)
    and normals by nearest neighbour."""
    return {
        "image": resize_image(image, height, width),
        "semseg": resize_nearest(semseg, height, width).astype(np.int16),
        "depth": resize_nearest(depth, height, width)[..., None],
        "normals": resize_nearest(normals, height, width),
    }


def normals_for(depth_HxW: np.ndarray, intrinsics: Sequence[float]) -> np.ndarray:
    """float16 normals from z-depth (metres) and intrinsics at the same resolution."""
    return geometry.normals_from_depth(depth_HxW, intrinsics).astype(np.float16)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                ahead: int) -> Iterator[Any]:
    """``map(fn, items)`` computed by ``workers`` threads (image decoding and large NumPy
    operations release the GIL), yielded in order, with at most ``ahead`` results computed
    ahead of the consumer (bounded memory). Builders decode examples with it while TFDS
    serialises the earlier ones."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue: collections.deque = collections.deque()
        for item in items:
            queue.append(pool.submit(fn, item))
            while len(queue) >= max(1, ahead):
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


# ------------------------------------------------------------------------------------- splits
def seeded_split(items: Sequence[Any], val_fraction: float, seed: int
                 ) -> tuple[list[Any], list[Any]]:
    """One permutation of ``items`` drawn with ``seed``, cut once: ``(train, val)`` with
    ``round(len · val_fraction)`` val items. Disjoint by construction (the released DenseMTL
    code shuffled train and val separately and so evaluated on ≈80 % training images)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction))
    val = sorted(int(i) for i in order[:n_val])
    train = sorted(int(i) for i in order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


def scene_split(items: Sequence[Any], scene_of: Callable[[Any], Hashable],
                val_scenes: Iterable[Hashable]) -> tuple[list[Any], list[Any]]:
    """``(train, val)``: items whose scene (``scene_of(item)``) is in ``val_scenes`` go to val,
    the others to train, so neighbouring video frames never straddle the split."""
    val_scenes = set(val_scenes)
    known = {scene_of(x) for x in items}
    unknown = sorted(map(str, val_scenes - known))
    if unknown:
        raise ValueError(f"val scenes {unknown} do not occur; scenes: {sorted(map(str, known))}")
    train = [x for x in items if scene_of(x) not in val_scenes]
    val = [x for x in items if scene_of(x) in val_scenes]
    return train, val
