"""Camera geometry on the host (NumPy): surface normals from z-depth, intrinsics rescaling.

Two normals-from-depth methods: ours (:func:`normals_from_depth`, what the datasets store) and
DenseMTL's (:func:`densemtl_normals_from_depth`, the reference's convention, to compare with it;
docs/models/densemtl.md has the numbers).

Conventions (those of the batch contract, ``docs/datasets.md``):

* camera frame: x right, y down, z forward (optical axis);
* ``intrinsics`` = ``(fx, fy, cx, cy)`` in pixels of the image they describe, pixel ``(u, v)``
  (column, row) having its centre at integer coordinates, so that the principal point of a
  centred camera is ``((W-1)/2, (H-1)/2)``;
* depth is **z-depth** in metres (distance along the optical axis, not along the ray); a value
  ``<= 0`` (or non-finite) is invalid;
* normals are unit vectors facing the camera (``n · X < 0`` for the surface point ``X``),
  all-zero where invalid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Default relative depth jump between 4-neighbours above which they are taken to lie on two
#: different surfaces (see :func:`normals_from_depth`).
DEFAULT_MAX_REL_JUMP = 0.1
# A cross product shorter than this fraction of |dP/du| * |dP/dv| (the two tangents nearly
# parallel, i.e. the surface seen exactly edge-on) gives no normal.
_MIN_SIN_ANGLE = 1e-9


def _unpack_intrinsics(intrinsics) -> tuple[float, float, float, float]:
    k = np.asarray(intrinsics, np.float64).reshape(-1)
    if k.shape != (4,):
        raise ValueError("intrinsics must be the 4 numbers (fx, fy, cx, cy) in pixels, got shape "
                         f"{np.shape(intrinsics)}")
    fx, fy, cx, cy = (float(x) for x in k)
    if not (fx > 0 and fy > 0 and np.isfinite([fx, fy, cx, cy]).all()):
        raise ValueError(f"intrinsics need finite fx, fy > 0; got {(fx, fy, cx, cy)}")
    return fx, fy, cx, cy


def scale_intrinsics(intrinsics, from_hw: Sequence[int], to_hw: Sequence[int]) -> np.ndarray:
    """Intrinsics ``(fx, fy, cx, cy)`` of an image of size ``from_hw = (H, W)`` resized to
    ``to_hw = (H', W')``; float32 ``[4]``.

    Half-pixel-centre convention (the one of :mod:`mtl_jax.data.augment`'s resizes): pixel
    ``i`` covers ``[i - 0.5, i + 0.5]``, so the continuous coordinate ``x`` of the source maps
    to ``(x + 0.5) * s - 0.5`` in the destination, with ``s = W'/W`` (``H'/H`` vertically)::

        fx' = fx * sx,   fy' = fy * sy,
        cx' = (cx + 0.5) * sx - 0.5,   cy' = (cy + 0.5) * sy - 0.5.

    A centred principal point ``(W-1)/2`` stays centred: ``(W'-1)/2``.
    """
    fx, fy, cx, cy = _unpack_intrinsics(intrinsics)
    (h0, w0), (h1, w1) = (tuple(int(x) for x in from_hw), tuple(int(x) for x in to_hw))
    if min(h0, w0, h1, w1) <= 0:
        raise ValueError(f"image sizes must be positive, got {from_hw} -> {to_hw}")
    sx, sy = w1 / w0, h1 / h0
    return np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5],
                    np.float32)


def backproject(depth_HxW: np.ndarray, intrinsics) -> np.ndarray:
    """Camera-frame points ``[H,W,3]`` (float64) of a z-depth map:
    ``X = (u - cx) z / fx``, ``Y = (v - cy) z / fy``, ``Z = z`` (``u`` column, ``v`` row)."""
    fx, fy, cx, cy = _unpack_intrinsics(intrinsics)
    z = np.asarray(depth_HxW, np.float64)
    h, w = z.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1)


def _tangent(points: np.ndarray, z: np.ndarray, valid: np.ndarray, axis: int,
             max_rel_jump: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite difference of ``points`` along image ``axis`` (0 rows/v, 1 columns/u).

    Returns ``(tangent [H,W,3], has_neighbour [H,W], at_jump [H,W])``: the central difference
    where both neighbours are usable, else the one-sided difference towards the usable one
    (zero when none is); a neighbour is usable when it is inside the image, valid and within
    the relative jump; ``at_jump`` marks pixels with a valid neighbour beyond the jump.
    """
    n = z.shape[axis]
    idx = np.arange(n).reshape((-1, 1) if axis == 0 else (1, -1))
    usable, jumps, nbr_points = [], [], []
    for shift, inside in ((1, idx > 0), (-1, idx < n - 1)):  # previous, next neighbour
        zn = np.roll(z, shift, axis=axis)
        pn = np.roll(points, shift, axis=axis)
        nbr_valid = inside & np.roll(valid, shift, axis=axis) & valid
        if np.isinf(max_rel_jump):
            jump = np.zeros_like(nbr_valid)
        else:
            jump = nbr_valid & (np.abs(zn - z) > max_rel_jump * np.minimum(zn, z))
        usable.append(nbr_valid & ~jump)
        jumps.append(jump)
        nbr_points.append(pn)
    (use_prev, use_next), (p_prev, p_next) = usable, nbr_points
    both = use_prev & use_next
    tangent = np.where(both[..., None], 0.5 * (p_next - p_prev),
                       np.where(use_next[..., None], p_next - points,
                                np.where(use_prev[..., None], points - p_prev, 0.0)))
    return tangent, use_prev | use_next, jumps[0] | jumps[1]


def normals_from_depth(depth_HxW: np.ndarray, intrinsics, *,
                       max_rel_jump: float = DEFAULT_MAX_REL_JUMP) -> np.ndarray:
    """Unit surface normals ``[H,W,3]`` (float32, camera frame) of a z-depth map.

    Args:
      depth_HxW: z-depth in metres, ``[H,W]`` or ``[H,W,1]``; ``<= 0`` or non-finite = invalid.
      intrinsics: ``(fx, fy, cx, cy)`` in pixels of this depth map's resolution (rescale
        intrinsics given for another resolution with :func:`scale_intrinsics`).
      max_rel_jump: two valid 4-neighbours with ``|z1 - z2| > max_rel_jump * min(z1, z2)`` lie
        on different surfaces (a depth discontinuity). ``np.inf`` disables the test. Grazing
        surfaces at low resolution have large legitimate jumps; raise it for them.

    Method (float64 inside): every pixel is back-projected, ``X = (u - cx) z / fx``,
    ``Y = (v - cy) z / fy``, ``Z = z``. The tangents ``dX/du`` and ``dX/dv`` are central
    differences of the 3-D points; where one neighbour along an axis is unusable (outside the
    image, or invalid depth) the one-sided difference towards the other is used (exact on
    planes). The normal is ``normalise(dX/du × dX/dv)``, flipped to face the camera
    (``n · X < 0``).

    Validity rule: the normal is all-zero where (1) the pixel's depth is invalid, (2) along u
    or along v it has no usable neighbour (e.g. a one-pixel-wide valid strip), (3) any valid
    4-neighbour is across a depth discontinuity (both sides of a depth edge are zeroed: their
    differences would mix two surfaces, and real sensors put "flying pixels" there), or (4)
    the two tangents are parallel. An invalid pixel therefore never invalidates its
    neighbours by itself; it only turns their difference one-sided.
    """
    z = np.asarray(depth_HxW, np.float64)
    if z.ndim == 3 and z.shape[-1] == 1:
        z = z[..., 0]
    if z.ndim != 2:
        raise ValueError(f"depth must be [H,W] or [H,W,1], got shape {np.shape(depth_HxW)}")
    if not max_rel_jump > 0:
        raise ValueError(f"max_rel_jump must be > 0, got {max_rel_jump}")
    valid = np.isfinite(z) & (z > 0)
    z = np.where(valid, z, 0.0)
    points = backproject(z, intrinsics)
    t_u, ok_u, jump_u = _tangent(points, z, valid, 1, max_rel_jump)
    t_v, ok_v, jump_v = _tangent(points, z, valid, 0, max_rel_jump)
    normal = np.cross(t_u, t_v)
    length = np.linalg.norm(normal, axis=-1)
    scale = np.linalg.norm(t_u, axis=-1) * np.linalg.norm(t_v, axis=-1)
    ok = valid & ok_u & ok_v & ~jump_u & ~jump_v & (length > _MIN_SIN_ANGLE * scale)
    normal = normal / np.where(ok, length, 1.0)[..., None]
    facing = np.sum(normal * points, axis=-1) < 0
    normal = np.where(facing[..., None], normal, -normal)
    return np.where(ok[..., None], normal, 0.0).astype(np.float32)


#: DenseMTL's four bases (``models/normals.py``, ``d2normals``): pairs of neighbour offsets
#: ``((du1, dv1), (du0, dv0))``; a base contributes ``(P[v+dv1, u+du1] - P) x (P[v+dv0, u+du0]
#: - P)``. Right/up, left/down and the two diagonal pairs.
DENSEMTL_BASES = (((1, 0), (0, -1)), ((-1, 0), (0, 1)), ((1, 1), (1, -1)), ((-1, -1), (-1, 1)))


def densemtl_normals_from_depth(depth_HxW: np.ndarray, intrinsics,
                                valid_HxW: np.ndarray | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """DenseMTL's normals from depth and their validity mask, in the reference's convention.

    ``d2normals(unproject(depth), n_bases=4)`` with the mask of its ``NormalsLoss`` (written
    from the reference's definition, ``models/normals.py`` and ``loss/normals.py`` of
    astra-vision/DenseMTL), for comparing with :func:`normals_from_depth`.

    Args:
      depth_HxW: z-depth ``[H,W]`` or ``[H,W,1]``.
      intrinsics: ``(fx, fy, cx, cy)`` in pixels of this depth map's resolution.
      valid_HxW: bool ``[H,W]``, the reference's ``depth_mask``; default: finite depth ``> 0``.
        The reference's evaluation also requires ``1e-3 < depth < 80`` m: pass that here to
        reproduce its eval mask.

    Returns:
      ``(normals [H,W,3] float32, mask [H,W] bool)``. Method (float64 inside): the
      back-projected points ``P`` (as :func:`backproject`; invalid pixels' depth set to 0),
      rolled with wrap-around; the sum over :data:`DENSEMTL_BASES` of the cross products of
      the two neighbour differences, divided by ``max(|sum|, 1e-12)`` (``F.normalize``), then
      ``n_z = |n_z|`` (the reference's sign convention: it mirrors our camera-facing normals,
      ``n_z < 0``, through the image plane; multiply ``n_z`` by -1 to compare with them).
      ``mask`` = ``valid`` with the 1-pixel image border removed, then eroded by a 3×3 window
      (a pixel is kept when its whole 3×3 neighbourhood is valid and inside the border, so at
      most ``(H-4)·(W-4)`` pixels), and finite normals. Every difference a kept pixel uses lies
      in its 3×3 neighbourhood, so neither the wrap-around nor the invalid pixels' depth reach
      a kept pixel. ``normals`` are all-zero outside ``mask``.

    Unlike :func:`normals_from_depth`, nothing detects depth discontinuities: a pixel next to
    a depth edge keeps a normal mixing the two surfaces, while a hole removes its whole 3×3
    neighbourhood.
    """
    z = np.asarray(depth_HxW, np.float64)
    if z.ndim == 3 and z.shape[-1] == 1:
        z = z[..., 0]
    if z.ndim != 2:
        raise ValueError(f"depth must be [H,W] or [H,W,1], got shape {np.shape(depth_HxW)}")
    if valid_HxW is None:
        valid = np.isfinite(z) & (z > 0)
    else:
        valid = np.asarray(valid_HxW, bool)
        if valid.shape != z.shape:
            raise ValueError(f"valid_HxW must have the depth's shape {z.shape}, got "
                             f"{valid.shape}")
    points = backproject(np.where(valid, z, 0.0), intrinsics)

    def diff(du: int, dv: int) -> np.ndarray:  # P[v + dv, u + du] - P[v, u], wrapping around
        return np.roll(points, (-dv, -du), axis=(0, 1)) - points

    normal = sum(np.cross(diff(*b1), diff(*b0)) for b1, b0 in DENSEMTL_BASES)
    normal = normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    normal[..., 2] = np.abs(normal[..., 2])
    inner = valid.copy()
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    h, w = inner.shape
    padded = np.pad(inner, 1, constant_values=True)  # the reference's zero padding of 1 - m
    mask = np.ones_like(inner)
    for dv in range(3):
        for du in range(3):
            mask &= padded[dv:dv + h, du:du + w]
    mask &= np.all(np.isfinite(normal), axis=-1)
    return np.where(mask[..., None], normal, 0.0).astype(np.float32), mask
