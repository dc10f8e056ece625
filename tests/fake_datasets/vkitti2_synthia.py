"""Fake VKITTI2 and SYNTHIA-RAND-CITYSCAPES folder trees in the official file formats (JPEG /
colour PNG / 16-bit PNGs / intrinsic.txt)."""

import os
import struct
import zlib

import numpy as np
from PIL import Image

from mtl_jax.data import manual, synthia, vkitti2

# ------------------------------------------------------------------------ shared fakes
#: A plane n·X = -d facing the camera (n·X < 0), the analytic normal of the tilted frames.
PLANE_N = np.array([0.3, -0.4, -1.0]) / np.linalg.norm([0.3, -0.4, -1.0])
PLANE_D = 60.0
FAR_ROWS = 8  # top rows at the far plane (sky)


def plane_depth_cm(h, w, k, frame):
    """Stored depth (uint16 cm) of a fake frame: frame 0 a fronto-parallel wall at 20 m with a
    block of invalid zeros, other frames the tilted plane; the top rows at the far plane."""
    fx, fy, cx, cy = k
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    if frame == 0:
        z = np.full((h, w), 20.0)
    else:
        rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
        z = -PLANE_D / (rays @ PLANE_N)
    cm = np.round(z * 100).astype(np.uint16)
    cm[:FAR_ROWS] = 65535
    if frame == 0:
        cm[40:46, 10:16] = 0
    return cm


def write_png16(path, samples):
    """A 16-bit PNG (grey, RGB or RGBA) written byte by byte (Pillow cannot write 16-bit colour),
    rows filtered with None / Sub / Up in turn."""
    a = np.asarray(samples, np.uint16)
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    rows = a.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int32)
    bpp = 2 * c
    body = b""
    for r in range(h):
        kind = r % 3
        if kind == 0:
            f = rows[r]
        elif kind == 1:
            f = rows[r] - np.concatenate([np.zeros(bpp, np.int32), rows[r][:-bpp]])
        else:
            f = rows[r] - (rows[r - 1] if r else 0)
        body += bytes([kind]) + (f % 256).astype(np.uint8).tobytes()

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                 + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))



# ------------------------------------------------------------------------- VKITTI2 fakes
VK_H, VK_W = 75, 248
VK_FRAMES = {"Scene01": 6, "Scene20": 4}
VK_SCENES = ("Scene01", "Scene20", "Scene02")  # scene numbers of the identities


def vk_intrinsics(frame, camera):
    fx = 150.0 + 3 * frame + camera
    return (fx, fx, (VK_W - 1) / 2, (VK_H - 1) / 2)


def vk_id(scene, frame, camera):
    return 2 * (VK_SCENES.index(scene) * 6 + frame) + camera


def vk_classes(frame):
    """Class map of a fake frame: 15 vertical bands, -1 (Undefined) and the 14 classes."""
    bands = np.arange(VK_W) * 15 // VK_W - 1
    return np.broadcast_to(np.roll(bands, 7 * frame), (VK_H, VK_W)).astype(np.int16)


def vk_colours(classes):
    table = np.array([vkitti2.UNDEFINED_COLOUR] + [c for _, c in vkitti2.CLASSES], np.uint8)
    return table[classes + 1]


def write_vkitti2(root, frames=VK_FRAMES, variation="clone"):
    """Both cameras' RGB, class and depth images and ``intrinsic.txt`` of ``frames`` ({scene:
    number of frames}) under ``root``; returns ``root``."""
    for scene, n in frames.items():
        text = os.path.join(root, "vkitti_2.0.3_textgt", scene, variation)
        os.makedirs(text, exist_ok=True)
        lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
        for frame in range(n):
            for cam in (0, 1):
                k = vk_intrinsics(frame, cam)
                lines.append(f"{frame} {cam} " + " ".join(f"{x:g}" for x in k))
                rel = vkitti2.Frame(scene, variation, frame, cam).relpaths()
                paths = {key: os.path.join(root, p) for key, p in rel.items()}
                for p in paths.values():
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                grey = 10 + 8 * vk_id(scene, frame, cam)
                Image.fromarray(np.full((VK_H, VK_W, 3), grey, np.uint8)).save(
                    paths["rgb"], quality=95)
                Image.fromarray(vk_colours(vk_classes(frame))).save(paths["classgt"])
                Image.fromarray(plane_depth_cm(VK_H, VK_W, k, frame)).save(paths["depth"])
        with open(os.path.join(text, "intrinsic.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------- SYNTHIA fakes
SY_H, SY_W = 76, 128
SY_FRAMES = 10
SY_K = manual.scale_intrinsics(synthia.INTRINSICS_760x1280, (760, 1280), (SY_H, SY_W))
GREY_DEPTH_FRAME = 3  # this frame's depth PNG has one channel, the others three


def sy_ids(frame):
    """SYNTHIA id map of a fake frame: 23 vertical bands, ids 0..22."""
    bands = np.arange(SY_W) * 23 // SY_W
    return np.broadcast_to(np.roll(bands, 5 * frame), (SY_H, SY_W)).astype(np.uint16)


def write_synthia(root, frames=SY_FRAMES):
    """RGB, label and depth PNGs of ``frames`` frames under ``root``; returns ``root``."""
    for sub in ("RGB", "GT/LABELS", "Depth/Depth"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for f in range(frames):
        name = f"{f:07d}.png"
        Image.fromarray(np.full((SY_H, SY_W, 3), 10 + 8 * f, np.uint8)).save(
            os.path.join(root, "RGB", name))
        instances = 1000 + np.broadcast_to(np.arange(SY_W, dtype=np.uint16), (SY_H, SY_W))
        labels = np.stack([sy_ids(f), instances, np.full((SY_H, SY_W), 3, np.uint16)], -1)
        write_png16(os.path.join(root, "GT/LABELS", name), labels)
        cm = plane_depth_cm(SY_H, SY_W, SY_K, f)
        depth_path = os.path.join(root, "Depth/Depth", name)
        if f == GREY_DEPTH_FRAME:
            Image.fromarray(cm).save(depth_path)
        else:  # the first channel holds the depth; the others something else
            write_png16(depth_path, np.stack([cm, cm // 2, np.zeros_like(cm)], -1))
    return root
