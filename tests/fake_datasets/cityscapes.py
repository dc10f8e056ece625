"""Fake Cityscapes folders in the exact file formats: MTAN's pre-processed ``.npy`` version
(``cityscapes_mtan``) and the official release's four packages (``cityscapes``)."""

import json
import os

import numpy as np
from PIL import Image

from mtl_jax.data import cityscapes as raw_mod

H, W = 128, 256  # the smallest builder configs

# ================================================================ MTAN's pre-processed version
MTAN_SIZES = {"train": 3, "val": 2}


def write_mtan(root, height=H, width=W):
    """``{split}/{image,label_2,label_7,label_19,depth}/{i}.npy`` in MTAN's dtypes; returns
    the arrays written."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in MTAN_SIZES.items():
        for d in ("image", "label_2", "label_7", "label_19", "depth"):
            os.makedirs(os.path.join(root, split, d), exist_ok=True)
        for i in range(n):
            image = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
            image[0, 0] = [0.0, 0.5, 1.0]
            lab7 = rng.integers(-1, 7, (height, width)).astype(np.float32)
            lab19 = rng.integers(-1, 19, (height, width)).astype(np.float32)
            depth = rng.uniform(0.0, 0.4922, (height, width, 1)).astype(np.float32)
            depth[:10] = 0.0  # invalid rows
            arrays = {"image": image, "label_7": lab7, "label_19": lab19, "depth": depth,
                      "label_2": np.zeros((height, width), np.float32)}
            for d, a in arrays.items():
                np.save(os.path.join(root, split, d, f"{i}.npy"), a)
            written[split, i] = arrays
    return written


# =================================================================== the official release
BASELINE = 0.2
FX = 150.0  # pixels, for the 64x128 files (x2 at the stored 128x256)
SLANT = dict(baseline=0.5, fx=300.0, z0=5.0, t=1.0)  # the 128x256 slanted-plane example
# (split, city, "{city}_{seq}_{frame}", file size): sorted order within each split
RAW_EXAMPLES = [
    ("train", "aachen", "aachen_000000_000019", (64, 128)),
    ("train", "aachen", "aachen_000001_000019", (128, 256)),
    ("train", "bochum", "bochum_000000_000313", (64, 128)),
    ("val", "frankfurt", "frankfurt_000000_000294", (64, 128)),
    ("val", "frankfurt", "frankfurt_000001_000538", (64, 128)),
]


def _camera(h, w, baseline, fx):
    return {"extrinsic": {"baseline": baseline, "pitch": 0.05, "roll": 0.0, "x": 1.7,
                          "y": 0.1, "yaw": 0.007, "z": 1.2},
            "intrinsic": {"fx": fx, "fy": fx * 1.01, "u0": w / 2 + 3.0, "v0": h / 2 - 2.0}}


def _label_ids(h, w):
    """Blocks of 8x8 pixels cycling through every label id 0..33."""
    r, c = np.mgrid[0:h, 0:w]
    return (((r // 8) * (w // 8) + c // 8) % 34).astype(np.uint8)


def _plane_disparity(h, w):
    """Fronto-parallel plane at 10 m (p = 769 -> d = 3 px; 0.2 m * 150 px / 3 px) with an
    invalid block p = 0 and an invalid block p = 1."""
    p = np.full((h, w), 769, np.uint16)
    p[8:20, 10:30] = 0
    p[30:50, 60:90] = 1
    return p


def _slanted_disparity(h, w, cam):
    """The plane Z = z0 + t X seen by ``cam``: disparity is linear in u."""
    fx, cx = cam["intrinsic"]["fx"], cam["intrinsic"]["u0"]
    u = np.arange(w, dtype=np.float64)
    d = SLANT["baseline"] * fx / SLANT["z0"] * (1 - SLANT["t"] * (u - cx) / fx)
    return np.broadcast_to(np.rint(d * 256 + 1), (h, w)).astype(np.uint16)


def write_raw(root):
    """The four packages for RAW_EXAMPLES; returns {name: dict of what was written}."""
    rng = np.random.default_rng(1)
    written = {}
    for k, (split, city, name, (h, w)) in enumerate(RAW_EXAMPLES):
        slanted = h == 128
        cam = _camera(h, w, SLANT["baseline"], SLANT["fx"]) if slanted else _camera(
            h, w, BASELINE, FX)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ids = np.full((h, w), 7, np.uint8) if slanted else _label_ids(h, w)
        if slanted:
            disp = _slanted_disparity(h, w, cam)
        elif k == 0:
            disp = _plane_disparity(h, w)
        else:
            disp = rng.integers(0, 20000, (h, w)).astype(np.uint16)
        files = {"leftImg8bit": Image.fromarray(image), "gtFine": Image.fromarray(ids),
                 "disparity": Image.fromarray(disp)}
        for package, im in files.items():
            path = os.path.join(root, raw_mod._relpath(package, split, city, name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            im.save(path)
        path = os.path.join(root, raw_mod._relpath("camera", split, city, name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(cam, f)
        written[name] = dict(image=image, ids=ids, disparity=disp, camera=cam)
    # what the builder must not read
    os.makedirs(os.path.join(root, "leftImg8bit", "test", "berlin"))
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(
        os.path.join(root, "leftImg8bit", "test", "berlin", "berlin_000000_000019_leftImg8bit.png"))
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(os.path.join(
        root, "gtFine", "train", "aachen", "aachen_000000_000019_gtFine_color.png"))
    return written


# ============================================= the sequence release (``cityscapes_seq``)
# (split, city, annotated "{city}_{seq}_{frame}"): frames t-2 .. t+2 are written
SEQ_EXAMPLES = [
    ("train", "aachen", "aachen_000000_000019"),
    ("train", "aachen", "aachen_000001_000019"),
    ("train", "bochum", "bochum_000000_000313"),
    ("val", "frankfurt", "frankfurt_000000_000294"),
]
SEQ_H, SEQ_W = 64, 128  # file size; the camera files describe it


def _frame(name, offset):
    prefix, frame = name.rsplit("_", 1)
    return f"{prefix}_{int(frame) + offset:06d}"


def write_seq(root, disparity=True):
    """leftImg8bit_sequence (frames t-2..t+2 of each annotated frame t, random RGB), gtFine
    label ids, camera files and (``disparity``) disparity maps for SEQ_EXAMPLES; returns
    ``{name: {"frames": {offset: image}, "ids", "disparity", "camera"}}``."""
    rng = np.random.default_rng(2)
    h, w = SEQ_H, SEQ_W
    written = {}

    def save(rel, array):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)

    for split, city, name in SEQ_EXAMPLES:
        frames = {k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for k in range(-2, 3)}
        for k, image in frames.items():
            save(f"leftImg8bit_sequence/{split}/{city}/{_frame(name, k)}_leftImg8bit.png", image)
        ids = _label_ids(h, w)
        save(f"gtFine/{split}/{city}/{name}_gtFine_labelIds.png", ids)
        disp = rng.integers(0, 20000, (h, w)).astype(np.uint16)
        disp[:4] = 0  # invalid rows
        if disparity:
            save(f"disparity/{split}/{city}/{name}_disparity.png", disp)
        cam = _camera(h, w, BASELINE, FX)
        path = os.path.join(root, f"camera/{split}/{city}/{name}_camera.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(cam, f)
        written[name] = dict(frames=frames, ids=ids, disparity=disp, camera=cam)
    return written
