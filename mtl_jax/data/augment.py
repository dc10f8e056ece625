"""Per-example decoding and joint augmentation (NumPy; runs in grain's worker threads).

Every augmentation is applied identically to the image, the neighbour frames of a triplet
(``image_prev``, ``image_next``) and every label, with the resize method that suits each field:
labels (``semseg``, ``edges``) and ``depth`` nearest (so that no invalid ``0`` is averaged into
a valid depth), the images and ``normals`` bilinear (normals are renormalised afterwards and
zeroed where the nearest-resized validity mask is invalid). The camera travels with the
pixels: ``intrinsics`` ``(fx, fy, cx, cy)`` follow every crop, resize and flip, and the
relative poses of a triplet (``pose_prev``, ``pose_next``: centre camera -> neighbour camera)
follow flips and depth scaling, so that warping a neighbour with the augmented depth,
intrinsics and pose still reproduces the augmented centre frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mtl_jax.data.geometry import normals_from_depth as _normals_from_depth
from mtl_jax.errors import UserError


class CropTooLargeError(UserError, ValueError):
    """``augment.crop_size`` does not fit in the dataset's images."""

#: The image fields: the (centre) frame and a triplet's neighbour frames.
IMAGE_KEYS = ("image", "image_prev", "image_next")
#: 4x4 rigid transforms from the centre camera to a neighbour's (``x_nb = T @ x_centre``).
POSE_KEYS = ("pose_prev", "pose_next")
#: Resize method per spatial field. Fields not listed here and not spatial pass through.
RESIZE_METHODS = {
    "image": "linear",
    "image_prev": "linear",
    "image_next": "linear",
    "normals": "linear",
    "semseg": "nearest",
    "edges": "nearest",
    "depth": "nearest",
}
DEFAULT_SCALES = (1.0, 1.2, 1.5)


def decode(example: Mapping[str, np.ndarray], *,
           normals_from_depth: bool = False) -> dict[str, np.ndarray]:
    """Stored record -> batch contract dtypes (one example, no batch axis).

    ``image`` (and ``image_prev``/``image_next``) uint8 -> float32 in [0, 1];
    ``semseg``/``edges`` -> int32; ``depth``, ``intrinsics``, poses float32;
    ``normals`` -> float32 renormalised to unit length where valid (they are stored as
    float16); adds ``example_mask = 1``.

    ``normals_from_depth=True`` (``config.dataset.normals_from_depth``) sets ``normals`` to
    :func:`mtl_jax.data.geometry.normals_from_depth` of ``depth`` and ``intrinsics`` (replacing
    stored normals, if any), at the stored resolution, before any augmentation; raises
    ValueError when the example has no ``depth`` or no ``intrinsics``.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in example.items():
        v = np.asarray(value)
        if key in IMAGE_KEYS:
            v = v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v.astype(np.float32)
        elif key in ("semseg", "edges", "index"):
            v = v.astype(np.int32)
        elif key == "normals":
            v = _renormalise(v.astype(np.float32))
        elif v.dtype.kind == "f":
            v = v.astype(np.float32)
        out[key] = v
    if normals_from_depth:
        missing = [k for k in ("depth", "intrinsics") if k not in out]
        if missing:
            raise ValueError(f"dataset.normals_from_depth needs the fields 'depth' and "
                             f"'intrinsics' (fx, fy, cx, cy); this example has no "
                             f"{' and no '.join(repr(k) for k in missing)} (its fields: "
                             f"{sorted(out)})")
        out["normals"] = _normals_from_depth(out["depth"], out["intrinsics"])
    out["example_mask"] = np.float32(1.0)
    return out


def _renormalise(n: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    if valid is None:
        valid = norm > 1e-3
    return np.where(valid, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def _src_coords(n_dst: int, n_src: int) -> np.ndarray:
    """Half-pixel-centre source coordinates of destination pixels."""
    return (np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the two leading axes."""
    h, w = x.shape[:2]
    iy = np.clip(np.floor((np.arange(height) + 0.5) * h / height), 0, h - 1).astype(int)
    ix = np.clip(np.floor((np.arange(width) + 0.5) * w / width), 0, w - 1).astype(int)
    return x[iy][:, ix]


def resize_linear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, edge clamped) of the two leading axes."""
    h, w = x.shape[:2]
    sy = np.clip(_src_coords(height, h), 0, h - 1)
    sx = np.clip(_src_coords(width, w), 0, w - 1)
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy = (sy - y0).reshape((-1, 1) + (1,) * (x.ndim - 2))
    fx = (sx - x0).reshape((1, -1) + (1,) * (x.ndim - 2))
    xf = x.astype(np.float32)
    top = xf[y0][:, x0] * (1 - fx) + xf[y0][:, x1] * fx
    bot = xf[y1][:, x0] * (1 - fx) + xf[y1][:, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _is_spatial(key: str, value: np.ndarray, shape: tuple[int, int]) -> bool:
    return value.ndim >= 2 and value.shape[:2] == shape


def scale_crop(example: Mapping[str, np.ndarray], scale: float, top: int, left: int,
               methods: Mapping[str, str] = RESIZE_METHODS, scale_depth: bool = True
               ) -> dict[str, np.ndarray]:
    """Crop ``H/scale x W/scale`` at (top, left) and resize back to ``H x W``.

    Depth is divided by ``scale`` (the crop looks like the scene seen from closer) unless
    ``scale_depth=False`` (targets that do not change with the viewing distance, e.g. the
    height maps of aerial datasets), and the intrinsics ``(fx, fy, cx, cy)``, when present,
    are updated to the new pixel grid. With depth divided by ``scale`` the whole scene is
    shrunk by ``scale``, so the translations of ``pose_prev``/``pose_next`` are divided by it
    too (rotations are unchanged): the triplet stays geometrically consistent.
    """
    h, w = example["image"].shape[:2]
    ch, cw = int(round(h / scale)), int(round(w / scale))
    if not (0 <= top <= h - ch and 0 <= left <= w - cw):
        raise ValueError(f"crop {ch}x{cw} at ({top}, {left}) does not fit in {h}x{w}")
    out = {}
    for key, value in example.items():
        v = np.asarray(value)
        if not _is_spatial(key, v, (h, w)):
            out[key] = v
            continue
        if key not in methods:
            raise ValueError(f"no resize method for spatial field {key!r}; add it to `methods` "
                             f"(known: {sorted(methods)})")
        crop = v[top:top + ch, left:left + cw]
        if methods[key] == "nearest":
            r = resize_nearest(crop, h, w)
        else:
            r = resize_linear(crop, h, w)
        if key == "normals":
            valid = np.any(resize_nearest(crop, h, w) != 0, axis=-1, keepdims=True)
            r = _renormalise(r, valid)
        elif key == "depth" and scale_depth:
            r = (r / scale).astype(v.dtype)
        out[key] = r.astype(v.dtype)
    if "intrinsics" in out:
        fx, fy, cx, cy = np.asarray(out["intrinsics"], np.float64)
        sx, sy = w / cw, h / ch
        out["intrinsics"] = np.array([fx * sx, fy * sy, (cx - left + 0.5) * sx - 0.5,
                                      (cy - top + 0.5) * sy - 0.5], np.float32)
    if scale_depth:
        for key in POSE_KEYS:
            if key in out:
                pose = np.array(out[key], np.float64)
                pose[:3, 3] /= scale
                out[key] = pose.astype(np.float32)
    return out


def crop(example: Mapping[str, np.ndarray], top: int, left: int, height: int,
         width: int) -> dict[str, np.ndarray]:
    """The ``height x width`` window at (top, left) of every spatial field, without resizing;
    the principal point moves with the window (``cx - left``, ``cy - top``)."""
    h, w = example["image"].shape[:2]
    if not (0 <= top <= h - height and 0 <= left <= w - width):
        raise ValueError(f"crop {height}x{width} at ({top}, {left}) does not fit in {h}x{w}")
    out = {}
    for key, value in example.items():
        v = np.asarray(value)
        out[key] = v[top:top + height, left:left + width] if _is_spatial(key, v, (h, w)) else v
    if "intrinsics" in out:
        fx, fy, cx, cy = np.asarray(out["intrinsics"], np.float64)
        out["intrinsics"] = np.array([fx, fy, cx - left, cy - top], np.float32)
    return out


def hflip(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror left-right: every spatial field is flipped and the normals' x is negated; the
    principal point is mirrored (``cx -> W - 1 - cx``) and a triplet's poses are conjugated by
    the mirror ``F = diag(-1, 1, 1, 1)`` (``T -> F T F``: the mirrored scene seen by the
    mirrored cameras)."""
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    h, w = example["image"].shape[:2]
    out = {}
    for key, value in example.items():
        v = np.asarray(value)
        if _is_spatial(key, v, (h, w)):
            v = v[:, ::-1].copy()
            if key == "normals":
                v[..., 0] = -v[..., 0]
                v = np.where(v == 0, 0.0, v).astype(np.float32)  # no -0.0 on invalid pixels
        out[key] = v
    if "intrinsics" in out:
        fx, fy, cx, cy = out["intrinsics"]
        out["intrinsics"] = np.array([fx, fy, w - 1 - cx, cy], np.float32)
    for key in POSE_KEYS:
        if key in out:
            out[key] = (mirror @ np.asarray(out[key], np.float64) @ mirror).astype(np.float32)
    return out


class JointAugment:
    """Random scale-crop (scale drawn from ``scales``), an optional random fixed-size crop
    (``crop_size = (height, width)``, no resizing: DenseMTL's 512x512 crops of the 512x1024
    Cityscapes frames for self-supervised depth) and a horizontal flip (probability 0.5), for
    training, in that order.

    Callable as a grain random map: ``aug(example, rng) -> example``.
    """

    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                 methods: Mapping[str, str] = RESIZE_METHODS, scale_depth: bool = True,
                 crop_size: Sequence[int] | None = None):
        if not scales or any(s < 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of values >= 1, got {scales}")
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.methods = dict(methods)
        self.scale_depth = bool(scale_depth)
        self.crop_size = None
        if crop_size is not None:
            if len(crop_size) != 2 or any(int(c) != c or c < 1 for c in crop_size):
                raise ValueError(f"crop_size must be (height, width) in pixels, got {crop_size}")
            self.crop_size = (int(crop_size[0]), int(crop_size[1]))

    def __call__(self, example: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
        h, w = example["image"].shape[:2]
        scale = self.scales[int(rng.integers(len(self.scales)))]
        ch, cw = int(round(h / scale)), int(round(w / scale))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = example if scale == 1.0 else scale_crop(
            example, scale, top, left, self.methods, scale_depth=self.scale_depth)
        if self.crop_size is not None:
            th, tw = self.crop_size
            if th > h or tw > w:
                raise CropTooLargeError(
                    f"augment.crop_size {th}x{tw} is larger than the dataset's {h}x{w} images; "
                    f"set config.augment.crop_size to at most ({h}, {w})")
            top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
            out = crop(out, top, left, th, tw)
        if self.flip and rng.uniform() < 0.5:
            out = hflip(out)
        return dict(out)
