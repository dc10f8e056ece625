"""``mtl-jax predict``: run a trained checkpoint on arbitrary image files.

``predict(workdir, images, out)`` loads the run's config (``<workdir>/config.json``, or a
config given explicitly), restores the latest (or a given) checkpoint, and for every image
writes into ``out``:

* ``<stem>_input.png``: the image as the model saw it;
* ``<stem>_<task>.png`` and ``<stem>_<task>.npy`` for every task: semseg colour-coded by class
  (``.npy``: int32 class ids ``[H,W]``), depth through a colour ramp (``.npy``: metric depth
  ``[H,W]`` float32), normals as ``(n + 1) / 2`` in RGB (``[H,W,3]`` unit vectors), edges as
  grey probabilities (``[H,W]`` in [0, 1]), reconstruction as RGB;
* ``<stem>_attention_<task>_<block>.png`` (grayscale) and ``.npy`` for every
  ``'attention/<task>/<block>'`` entry the model's predict step returns (``[H,W]`` in [0, 1]).

Size: each image is resized (bilinear, aspect ratio not kept) to the config's
``input_size``; the outputs are at that size (``[H,W]`` = ``config.input_size``), not at
the file's size. Images are read with Pillow (PNG, JPEG, BMP, TIFF, ...) and turned the way
their EXIF orientation says; grey, palette and RGBA images are converted to RGB; 16-bit images
(PNG/TIFF grey ``I;16``, or ``I`` with values up to 65535) are scaled by 1/65535, not clipped to
8 bits; 32-bit float images (``F``) must hold values in [0, 1]. Other modes, and images over
:data:`MAX_PIXELS`, are refused with a message naming the file.

An image that cannot be read is reported (``mtl-jax: skipped <file>: <why>``) and the others
are still predicted; :func:`predict` then raises one :class:`UserError` listing them (exit 1).
``--out`` is checked (created, or an existing folder) before the model is loaded.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtl_jax import checkpointing
from mtl_jax import paths as workdir_paths
from mtl_jax.data import visualize
from mtl_jax.errors import UserError
from mtl_jax.tasks import TASKS, Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: The largest image (width × height) predict reads: 100 Mpixels, i.e. 10000 × 10000. Larger
#: files are refused before they are decoded (a 15000 × 15000 RGB image needs 675 MB as
#: uint8 and 2.7 GB as float32 before it is resized); downscale them first.
MAX_PIXELS = 100_000_000
# 8-bit modes Pillow converts to RGB exactly.
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB",
                    "HSV", "La", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (``<workdir>/config.json``, written by ``train``)."""
    path = workdir_paths.join(workdir, "config.json")
    if not workdir_paths.exists(path):
        raise UserError(f"{workdir} has no config.json: is it the --workdir of a "
                        "'mtl-jax train' run? (or pass --config=configs/x.py:args)")
    return ml_collections.ConfigDict(json.loads(workdir_paths.read_text(path)))


def find_images(images: str) -> list[str]:
    """A folder (its image files, sorted), a glob pattern, or one file."""
    if os.path.isdir(images):
        paths = sorted(os.path.join(images, p) for p in os.listdir(images)
                       if p.lower().endswith(IMAGE_SUFFIXES))
    else:
        paths = sorted(glob.glob(images))
    if not paths:
        raise UserError(f"no image found for --images={images!r} (a folder of "
                        f"{'/'.join(IMAGE_SUFFIXES)} files, a glob like 'dir/*.jpg', or a file)")
    return paths


def read_image(path: str, size_hw: Sequence[int]) -> np.ndarray:
    """Float32 RGB ``[H,W,3]`` in [0, 1] at ``size_hw`` (bilinear resize), turned by its EXIF
    orientation; 16-bit images scaled by 1/65535 (see the module docstring)."""
    h, w = (int(s) for s in size_hw)
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
            if w0 * h0 > MAX_PIXELS:
                raise UserError(f"image {path} is {w0}×{h0} = {w0 * h0 / 1e6:.0f} Mpixels, "
                                f"over the limit of {MAX_PIXELS / 1e6:.0f} Mpixels; "
                                "downscale it first")
            im = ImageOps.exif_transpose(im)
            if im.mode in _EIGHT_BIT_MODES:  # resized as 8-bit RGB
                rgb = im.convert("RGB")
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.BILINEAR)
                return np.asarray(rgb, np.float32) / 255.0
            grey = _grey_float(im, path)
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is too large to decode safely ({e}); downscale it "
                        "first") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e
    if grey.shape != (h, w):
        grey = np.asarray(Image.fromarray(grey.astype(np.float32)).resize((w, h), Image.BILINEAR),
                          np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)


def _grey_float(im: Image.Image, path: str) -> np.ndarray:
    """A 16-bit or float grey Pillow image → float32 ``[h, w]`` in [0, 1]."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        grey = np.asarray(im, np.float64)
        if im.mode == "I" and (grey.min() < 0 or grey.max() > 65535):
            raise UserError(f"image {path}: 32-bit integer pixels outside 0..65535 (min "
                            f"{grey.min():.0f}, max {grey.max():.0f}); save it as an 8- or "
                            "16-bit image")
        return (grey / 65535.0).astype(np.float32)
    if im.mode == "F":
        grey = np.asarray(im, np.float32)
        if not np.all(np.isfinite(grey)) or grey.min() < 0 or grey.max() > 1:
            raise UserError(f"image {path}: float pixels must lie in [0, 1] (min "
                            f"{np.nanmin(grey):.4g}, max {np.nanmax(grey):.4g}); save it "
                            "as an 8- or 16-bit image")
        return grey
    raise UserError(f"image {path}: Pillow mode {im.mode!r} is not supported (use 8-bit "
                    "RGB/grey/RGBA or 16-bit grey)")


def picture(name: str, value: np.ndarray, task: Task | None = None) -> np.ndarray:
    """uint8 picture of one prediction ``name`` (task, or ``attention/<task>/<block>``):
    RGB ``[H,W,3]`` drawn by the task (``task``, default: the registry's), or grayscale
    ``[H,W]`` for attention maps."""
    if name.startswith("attention/"):
        return np.round(np.clip(np.nan_to_num(value), 0.0, 1.0) * 255).astype(np.uint8)
    return (task or TASKS[name]).prediction_picture(value)


def _restore(abstract_state, workdir: str, step: int | None):
    manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
    try:
        if manager.latest_step() is None:
            raise UserError(f"no checkpoint in {workdir_paths.join(workdir, 'checkpoints')}; train "
                            "first with: mtl-jax train --config=... --workdir=" + workdir)
        if step is not None and step not in manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in {workdir}; available: "
                            f"{sorted(manager.all_steps())}")
        try:
            restored = checkpointing.restore(manager, abstract_state, step)
        except FileNotFoundError as e:
            raise UserError(str(e)) from e
        except checkpointing.CheckpointError as e:  # no step restores into this config's shapes
            raise UserError(f"the checkpoint in {workdir} does not match the config, or is "
                            f"unreadable (if you gave --config, leave it out to use the run's "
                            f"own config.json): {str(e)[:500]}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"the checkpoint in {workdir} does not match the config (model, "
                            f"tasks or optimiser differ from the run's; use the run's own "
                            f"config.json, i.e. leave out --config): {str(e)[:500]}") from e
    finally:
        manager.close()
    return restored


def load_run(workdir: str, step: int | None = None,
             config: ml_collections.ConfigDict | None = None):
    """``(experiment, state, step)`` of a run's checkpoint (default: latest), built on one
    device from the run's ``config.json`` (or ``config``); for predictions and notebooks."""
    from mtl_jax.train import run_experiment

    config = workdir_config(workdir) if config is None else config
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.num_devices = 1
    exp, abstract_state = run_experiment(config)
    state, _, step = _restore(abstract_state, workdir, step)
    # the model's part of a state that holds more networks (UDA, SDE)
    return exp, state.model_state(), step


def predict(workdir: str, images: str, out: str, *, step: int | None = None,
            config: ml_collections.ConfigDict | None = None) -> list[str]:
    """Predict every image of ``images`` with the checkpoint of ``workdir``; returns the
    written file paths (see the module docstring for names and contents)."""
    paths = find_images(images)
    _prepare_out(out)
    exp, state, step = load_run(workdir, step, config)
    written = []
    failed: list[str] = []
    used_stems: set[str] = set()
    for path in paths:
        try:
            image = read_image(path, exp.config.input_size)
        except UserError as e:
            print(f"mtl-jax: skipped {path}: {e}", file=sys.stderr)
            failed.append(path)
            continue
        preds = jax.device_get(exp.predict_step(state, image[None]))
        stem = os.path.splitext(os.path.basename(path))[0]
        while stem in used_stems:  # same name in two folders of a glob
            stem += "_"
        used_stems.add(stem)
        base = os.path.join(out, stem)
        visualize.save_png(base + "_input.png", visualize.to_uint8_image(image))
        written.append(base + "_input.png")
        for name, value in preds.items():
            arr = np.asarray(value)[0]
            if arr.ndim == 3 and arr.shape[-1] == 1:  # depth, edges: [H,W,1] -> [H,W]
                arr = arr[..., 0]
            tag = name.replace("/", "_")
            np.save(f"{base}_{tag}.npy", arr)
            pic = picture(name, arr, exp.tasks.get(name))
            Image.fromarray(pic).save(f"{base}_{tag}.png")
            written += [f"{base}_{tag}.npy", f"{base}_{tag}.png"]
    if failed:
        done = len(paths) - len(failed)
        raise UserError(f"{len(failed)} of {len(paths)} images could not be read (listed "
                        f"above: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}); "
                        f"the other {done} were written to {out}")
    return written


def _prepare_out(out: str) -> None:
    """``--out`` as a folder (created if missing), checked before the model is loaded."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is an existing file, not a folder; give a folder path")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the --out folder {out}: {e}") from e
    if not os.access(out, os.W_OK):
        raise UserError(f"the --out folder {out} is not writable")
