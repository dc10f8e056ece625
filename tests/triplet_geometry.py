"""A small NumPy reference warp for the frame-triplet tests (helpers, not tests): back-project
the centre frame's pixels with its depth and intrinsics, move them into a neighbour camera
with the pose ``T`` (``x_nb = T @ x_centre``), project them and sample the neighbour image
bilinearly there."""

import numpy as np


def warp(neighbour, depth, intrinsics, pose):
    """``(warped [H,W,C] float64, inside [H,W] bool, flow [H,W,2])``: the neighbour image
    sampled where each centre pixel lands, whether it lands inside the neighbour image (in
    front of its camera), and the displacement (du, dv) in pixels."""
    fx, fy, cx, cy = np.asarray(intrinsics, np.float64)
    z = np.asarray(depth, np.float64).reshape(np.shape(depth)[:2])
    h, w = z.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    points = np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z, np.ones_like(z)], -1)
    moved = points @ np.asarray(pose, np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        pu = fx * moved[..., 0] / moved[..., 2] + cx
        pv = fy * moved[..., 1] / moved[..., 2] + cy
    inside = (moved[..., 2] > 1e-6) & (pu >= 0) & (pu <= w - 1) & (pv >= 0) & (pv <= h - 1)
    su = np.clip(np.nan_to_num(pu), 0, w - 1)
    sv = np.clip(np.nan_to_num(pv), 0, h - 1)
    x0 = np.minimum(np.floor(su).astype(int), w - 2)
    y0 = np.minimum(np.floor(sv).astype(int), h - 2)
    ax, ay = (su - x0)[..., None], (sv - y0)[..., None]
    img = np.asarray(neighbour, np.float64)
    warped = (img[y0, x0] * (1 - ax) * (1 - ay) + img[y0, x0 + 1] * ax * (1 - ay)
              + img[y0 + 1, x0] * (1 - ax) * ay + img[y0 + 1, x0 + 1] * ax * ay)
    return warped, inside, np.stack([pu - u, pv - v], -1)


def warp_error(example, which, pose=None):
    """Per-pixel mean absolute error (image units, e.g. [0, 1] after decode) between the
    centre frame and neighbour ``which`` ('prev' or 'next') warped with the example's depth,
    intrinsics and pose (or ``pose``), over the pixels that land inside the neighbour; and the
    fraction of pixels that do."""
    pose = example[f"pose_{which}"] if pose is None else pose
    warped, inside, _ = warp(example[f"image_{which}"], example["depth"],
                             example["intrinsics"], pose)
    err = np.abs(warped - np.asarray(example["image"], np.float64)).mean(-1)
    return err[inside], float(inside.mean())
