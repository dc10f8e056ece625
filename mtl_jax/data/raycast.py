"""Ray casting for the procedural dataset (:mod:`mtl_jax.data.synthetic_render`): camera rays,
and their first hits with the room's box, oriented boxes, spheres and upright cylinders
(NumPy, float64; ``t`` is the ray parameter, which is the z-depth for rays with unit z in the
camera frame)."""

from __future__ import annotations

import numpy as np


def rays(intrinsics, cam_to_world, height, width):
    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    d_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1).reshape(-1, 3)
    return d_cam @ cam_to_world.T  # z-depth of a hit is its ray parameter t


def hit_room(o, d, lo, hi, *, labels):
    """Exit of rays from inside the room box; returns t, normal (inward), label (``labels``:
    the class ids of floor, ceiling and wall)."""
    floor, ceiling, wall = labels
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axis = np.where(d > 0, (hi - o) / d, (lo - o) / d)  # [N,3]
    t_axis = np.where(np.abs(d) < 1e-12, np.inf, t_axis)
    ax = np.argmin(t_axis, axis=1)
    t = t_axis[np.arange(len(d)), ax]
    n = np.zeros_like(d)
    n[np.arange(len(d)), ax] = -np.sign(d[np.arange(len(d)), ax])
    label = np.where(ax == 1, np.where(d[:, 1] < 0, floor, ceiling), wall)
    return t, n, label


def hit_boxes(o, d, c, h, yaw):
    """Oriented boxes (yaw about world y). Returns t [K,N] (inf on miss) and normals [K,N,3]."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    # World -> box frame: rotate by -yaw about y. Local x = cy*x - sy*z, local z = sy*x + cy*z.
    rot = np.stack([np.stack([cy, np.zeros_like(cy), -sy], -1),
                    np.stack([np.zeros_like(cy), np.ones_like(cy), np.zeros_like(cy)], -1),
                    np.stack([sy, np.zeros_like(cy), cy], -1)], 1)  # [K,3,3] rows = local axes
    o_l = np.einsum("kij,kj->ki", rot, o[None] - c)[:, None, :]  # [K,1,3]
    d_l = np.einsum("kij,nj->kni", rot, d)  # [K,N,3]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d_l
        t1 = (-h[:, None, :] - o_l) * inv
        t2 = (h[:, None, :] - o_l) * inv
    t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near = np.nan_to_num(t_near, nan=-np.inf)
    t_far = np.nan_to_num(t_far, nan=np.inf)
    ax = np.argmax(t_near, axis=2)
    tn = np.take_along_axis(t_near, ax[..., None], 2)[..., 0]
    tf = np.min(t_far, axis=2)
    hit = (tn <= tf) & (tn > 1e-6)
    t = np.where(hit, tn, np.inf)
    sign = -np.sign(np.take_along_axis(d_l, ax[..., None], 2)[..., 0])
    n_l = np.zeros_like(d_l)
    np.put_along_axis(n_l, ax[..., None], sign[..., None], 2)
    n = np.einsum("kji,knj->kni", rot, n_l)  # back to world (rot is orthonormal)
    return t, n


def hit_spheres(o, d, c, r):
    oc = o[None] - c  # [K,3]
    a = np.einsum("nj,nj->n", d, d)[None]  # [1,N]
    b = 2.0 * np.einsum("kj,nj->kn", oc, d)
    cc = (np.einsum("kj,kj->k", oc, oc) - r**2)[:, None]
    disc = b**2 - 4 * a * cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = (-b - sq) / (2 * a)
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    p = o[None, None] + t[..., None] * d[None]
    n = (p - c[:, None]) / r[:, None, None]
    return t, n


def hit_cylinders(o, d, base, r, hgt):
    """Vertical capped cylinders standing on ``base`` (bottom centre)."""
    ox, oz = o[0] - base[:, 0], o[2] - base[:, 2]  # [K]
    dx, dz = d[:, 0][None], d[:, 2][None]  # [1,N]
    a = dx**2 + dz**2
    b = 2 * (ox[:, None] * dx + oz[:, None] * dz)
    cc = (ox**2 + oz**2 - r**2)[:, None]
    disc = b**2 - 4 * a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    y_side = o[1] + t_side * d[:, 1][None]
    ok_side = (disc >= 0) & (a > 1e-12) & (t_side > 1e-6)
    ok_side &= (y_side >= base[:, 1:2]) & (y_side <= base[:, 1:2] + hgt[:, None])
    t_side = np.where(ok_side, t_side, np.inf)
    # Caps: top (y = base + h) seen from above, bottom from below.
    dy = d[:, 1][None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_top = (base[:, 1:2] + hgt[:, None] - o[1]) / dy
        t_bot = (base[:, 1:2] - o[1]) / dy
    t_cap = np.where(dy < 0, t_top, t_bot)
    px, pz = ox[:, None] + t_cap * dx, oz[:, None] + t_cap * dz
    ok_cap = (t_cap > 1e-6) & (px**2 + pz**2 <= (r**2)[:, None]) & (np.abs(dy) > 1e-12)
    t_cap = np.where(ok_cap, t_cap, np.inf)
    use_cap = t_cap < t_side
    t = np.minimum(t_side, t_cap)
    p = o[None, None] + np.where(np.isfinite(t), t, 0.0)[..., None] * d[None]
    n_side = np.stack([p[..., 0] - base[:, 0:1], np.zeros_like(t), p[..., 2] - base[:, 2:3]], -1)
    n_side /= r[:, None, None]
    n_cap = np.zeros_like(n_side)
    n_cap[..., 1] = np.where(dy < 0, 1.0, -1.0)
    n = np.where(use_cap[..., None], n_cap, n_side)
    return t, n
