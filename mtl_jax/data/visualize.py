"""Turn images and dense labels into RGB pictures and grids (NumPy + Pillow only).

Conventions: segmentation colour-coded by class (void black), depth through a perceptual
colormap with invalid pixels black, normals shown as ``(n + 1) / 2`` in RGB (invalid black),
edges white on black.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# A fixed, well-separated colour per class index (repeats after 24 classes).
_CLASS_COLOURS = np.array([
    (128, 64, 128), (70, 70, 70), (153, 153, 190), (220, 20, 60), (0, 142, 255),
    (250, 170, 30), (107, 142, 35), (255, 230, 0), (190, 40, 220), (0, 200, 160),
    (152, 251, 152), (255, 120, 120), (0, 80, 100), (120, 60, 0), (0, 0, 230),
    (119, 11, 32), (180, 165, 180), (150, 100, 100), (250, 0, 130), (90, 200, 40),
    (60, 120, 255), (255, 80, 0), (100, 100, 180), (200, 200, 0),
], np.uint8)

# Anchor colours of a blue -> cyan -> green -> yellow -> red ramp (near to far).
_RAMP = np.array([(48, 18, 59), (40, 120, 240), (30, 200, 200), (120, 240, 80),
                  (250, 190, 40), (220, 50, 20), (122, 4, 3)], np.float64)


def colorize_semseg(semseg_HxW: np.ndarray) -> np.ndarray:
    """Class index map (``-1`` void) to uint8 RGB; void is black."""
    s = np.asarray(semseg_HxW).astype(np.int64)
    rgb = _CLASS_COLOURS[np.mod(s, len(_CLASS_COLOURS))]
    return np.where((s < 0)[..., None], 0, rgb).astype(np.uint8)


def colorize_depth(depth: np.ndarray, vmin: float | None = None,
                   vmax: float | None = None) -> np.ndarray:
    """Depth ``[H,W]`` or ``[H,W,1]`` (0 = invalid) to uint8 RGB through a colour ramp."""
    d = np.asarray(depth, np.float64).reshape(np.shape(depth)[:2])
    d = np.where(np.isfinite(d), d, 0.0)  # NaN/inf (e.g. a diverged model) drawn as invalid
    valid = d > 0
    if vmin is None or vmax is None:
        vals = d[valid]
        lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    x = np.clip((d - vmin) / max(vmax - vmin, 1e-6), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    return np.where(valid[..., None], rgb, 0).round().astype(np.uint8)


def colorize_normals(normals_HxWx3: np.ndarray) -> np.ndarray:
    """Unit normals to RGB via ``(n + 1) / 2``; all-zero (invalid) pixels are black."""
    n = np.nan_to_num(np.asarray(normals_HxWx3, np.float64))
    valid = np.any(n != 0, axis=-1, keepdims=True)
    return np.where(valid, np.clip((n + 1.0) * 127.5, 0, 255), 0).round().astype(np.uint8)


def colorize_edges(edges_HxW: np.ndarray) -> np.ndarray:
    """Binary edge map (or edge probability in [0, 1]) to grey RGB; ignore (-1) dark red."""
    e = np.nan_to_num(np.asarray(edges_HxW, np.float64))
    grey = np.clip(e, 0, 1)[..., None].repeat(3, -1) * 255
    return np.where((e < 0)[..., None], np.array([90, 0, 0]), grey).round().astype(np.uint8)


def to_uint8_image(image_HxWx3: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (or uint8) to uint8 RGB."""
    img = np.asarray(image_HxWx3)
    if img.dtype == np.uint8:
        return img
    return np.clip(np.nan_to_num(img) * 255.0, 0, 255).round().astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None,
         pad: int = 2, title_height: int = 12) -> np.ndarray:
    """Tile equally sized uint8 RGB pictures into a grid; optional column titles on top."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    top = title_height if titles else 0
    out = np.full((top + len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255,
                  np.uint8)
    for r, row in enumerate(rows):
        for c, pic in enumerate(row):
            y, x = top + pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = pic
    if titles:
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        for c, title in enumerate(titles):
            draw.text((pad + c * (w + pad) + 2, 0), title, fill=(0, 0, 0))
        out = np.asarray(img)
    return out


def save_png(path, rgb: np.ndarray) -> None:
    """Write a uint8 RGB picture as PNG to a local path or a URL (``gs://...``), through
    :mod:`mtl_jax.paths` (replaced atomically)."""
    import io

    from mtl_jax import paths

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buffer, "PNG")
    paths.write_bytes(path, buffer.getvalue())
