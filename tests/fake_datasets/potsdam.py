"""A fake ISPRS Potsdam download: 70x100 images of a few tiles under the release's file names
(RGB photo, colour-coded label, JPEG nDSM)."""

import os

import numpy as np
from PIL import Image

from mtl_jax.data import isprs_potsdam as P

H, W = 70, 100
TRAIN = ("2_10", "6_7")  # nDSM names zero-padded ("02_10", "06_07")
VAL = ("7_13",)  # nDSM name unpadded ("7_13"), also accepted


def _fake_tile(tile: str) -> dict[str, np.ndarray]:
    """Deterministic photo, class map (every class in every 32x32 tile) and nDSM grey."""
    a, b = P._parse_tile(tile)
    rng = np.random.default_rng(100 * a + b)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:H, :W]
    classes = ((yy // 4 + xx // 5 + a + b) % P.NUM_CLASSES).astype(np.int16)
    # A smooth height field (JPEG-friendly) with ground (0) and the top of the range (255).
    grey = np.clip(np.round(300 * np.sin(xx / 15.0 + a) * np.cos(yy / 11.0 + b)), 0, 255)
    return {"image": image, "classes": classes, "grey": grey.astype(np.uint8)}


def write_tree(root, *, label_dir: str = "5_Labels_all", tiles=TRAIN + VAL) -> dict:
    """Photo, label and nDSM of each tile under ``root``; returns ``{tile: arrays written}``
    (with ``grey_read``, the nDSM as read back from the JPEG)."""
    for d in ("2_Ortho_RGB", label_dir, "1_DSM_normalisation"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    palette = np.array(P.CLASS_COLOURS, np.uint8)
    data = {}
    for tile in tiles:
        a, b = P._parse_tile(tile)
        d = _fake_tile(tile)
        Image.fromarray(d["image"]).save(os.path.join(root, P.rgb_name(tile)))
        Image.fromarray(palette[d["classes"]]).save(
            os.path.join(root, P.label_name(tile, label_dir)))
        padded, unpadded = P.dsm_names(tile)
        dsm = padded if tile in TRAIN else unpadded
        Image.fromarray(d["grey"]).save(os.path.join(root, dsm), quality=95)
        # What the builder reads back from the (lossy) JPEG.
        with Image.open(os.path.join(root, dsm)) as im:
            d["grey_read"] = np.asarray(im)
        data[tile] = d
    return data
