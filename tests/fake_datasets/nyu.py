"""Fake NYUv2 folders in the exact on-disk formats at the real stored resolutions: MTAN's
``.npy`` export (``nyuv2``) and the NYUD_MT folder (``nyud_mt``)."""

import os

import numpy as np
from PIL import Image


def write_nyuv2(root, sizes=(("train", 3), ("val", 2)), seed=0):
    """A fake MTAN folder; returns {split: [dict of the arrays written]}."""
    rng = np.random.default_rng(seed)
    h, w = 288, 384
    written = {}
    for split, n in sizes:
        for f in ("image", "label", "depth", "normal"):
            os.makedirs(os.path.join(root, split, f), exist_ok=True)
        written[split] = []
        for i in range(n):
            pix = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            # the first train example stores uint8, the others float in [0, 1] as MTAN does
            image = pix if (split, i) == ("train", 0) else (pix / 255.0).astype(np.float32)
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)
            depth = rng.uniform(0.5, 9.5, (h, w, 1)).astype(np.float32)
            depth[:40] = 0.0  # invalid band
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[:, :30] = 0.0  # invalid band
            stored_depth = depth[..., 0] if i == 1 else depth  # both layouts occur
            for f, a in (("image", image), ("label", label), ("depth", stored_depth),
                         ("normal", normal)):
                np.save(os.path.join(root, split, f, f"{i}.npy"), a)
            written[split].append(dict(image=pix, label=label, depth=depth, normal=normal))
    return written


def blocks(small):
    """Each pixel of a 60×80 map as an 8×8 block of the 480×640 map."""
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def write_nyud(root, train=("0003", "0010", "0021"), val=("0001", "0002"), seed=0,
               mti_variant=False):
    """A fake NYUD_MT folder; returns {name: dict of the 60×80 block maps and the image}.

    ``mti_variant``: images as .png, normals and edges as .npy (the MTI-Net export)."""
    rng = np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for split, names in (("train", train), ("val", val)):
        with open(os.path.join(root, "gt_sets", f"{split}.txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    normals_png = np.full((480, 640, 3), 128, np.uint8)
    normals_png[:240, 320:] = (255, 128, 0)
    normals_png[240:, 320:] = (128, 128, 255)
    written = {}
    for k, name in enumerate(list(train) + list(val)):
        image = rng.integers(0, 256, (480, 640, 3)).astype(np.uint8)
        seg = rng.integers(0, 41, (60, 80)).astype(np.uint8)
        depth = rng.uniform(0.5, 9.5, (60, 80)).astype(np.float32)
        depth[:5] = 0.0
        edge = np.where(rng.random((60, 80)) < 0.2, rng.integers(1, 256, (60, 80)), 0)
        edge = edge.astype(np.uint8)
        if mti_variant:
            Image.fromarray(image).save(os.path.join(root, "images", name + ".png"))
            normals = 2.0 * normals_png.astype(np.float32) / 255.0 - 1.0
            np.save(os.path.join(root, "normals", name + ".npy"), normals)
            np.save(os.path.join(root, "edge", name + ".npy"),
                    (blocks(edge) > 0).astype(np.float32))
        else:
            Image.fromarray(image).save(os.path.join(root, "images", name + ".jpg"), quality=90)
            Image.fromarray(normals_png).save(os.path.join(root, "normals", name + ".png"))
            Image.fromarray(blocks(edge)).save(os.path.join(root, "edge", name + ".png"))
        Image.fromarray(blocks(seg)).save(os.path.join(root, "segmentation", name + ".png"))
        big_depth = blocks(depth)
        np.save(os.path.join(root, "depth", name + ".npy"),
                big_depth if k % 2 else big_depth[..., None])  # both layouts occur
        written[name] = dict(seg=seg, depth=depth, edge=edge)
    return written

