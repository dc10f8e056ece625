"""Camera geometry of self-supervised depth (Monodepth2's ``layers.py``), as pure JAX functions.

Conventions (those of Monodepth2, which DenseMTL vendors):

* camera coordinates x right, y down, z forward; pixel ``(u, v)`` = (column, row) of the
  pixel centre, pixel ``i`` at coordinate ``i`` (Monodepth2's ``meshgrid(range(W), range(H))``);
* intrinsics ``(fx, fy, cx, cy)`` in pixels of the image they come with;
* a pose ``T`` (``[B, 4, 4]``) maps the centre frame's camera coordinates to the neighbour's,
  ``x_nb = T @ x_centre`` (Monodepth2's ``cam_T_cam[0, f]``, projected as ``P = K @ T``);
* sampling grids are ``[B, H, W, 2]`` of ``(x, y)`` in ``[-1, 1]``, corner-aligned: ``-1`` is
  the centre of the first pixel, ``+1`` the centre of the last (``align_corners=True``).

Every function is jit-friendly (static shapes, no Python control flow on values) and
differentiable; images are NHWC, the points of :func:`backproject` channel-first
(``[B, 4, N]``, homogeneous) as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.tasks.video_depth import disp_to_depth

__all__ = ["backproject", "disp_to_depth", "grid_sample", "intrinsics_matrices",
           "pixel_coordinates", "project", "rot_from_axisangle", "transformation_from_parameters",
           "warp"]

def _safe_norm(v_Bx3: jax.Array) -> jax.Array:
    """``[B, 1]`` Euclidean norm whose gradient at the zero vector is 0 (as torch's
    ``norm`` backward), not NaN."""
    sq = jnp.sum(v_Bx3 * v_Bx3, axis=-1, keepdims=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def rot_from_axisangle(vec_Bx3: jax.Array) -> jax.Array:
    """``[B, 4, 4]`` homogeneous rotations from axis-angle vectors ``[B, 3]`` (direction = axis,
    norm = angle in radians, right-handed).

    Monodepth2's formula: ``axis = vec / (angle + 1e-7)`` (so the zero vector gives the
    identity, and the axis of a non-zero vector is unit up to ``1e-7 / angle``), then
    Rodrigues' rotation ``R = cos a I + sin a [axis]x + (1 - cos a) axis axis^T``.
    """
    angle = _safe_norm(vec_Bx3)  # [B, 1]
    axis = vec_Bx3 / (angle + 1e-7)
    ca, sa = jnp.cos(angle)[:, 0], jnp.sin(angle)[:, 0]
    c = 1.0 - ca
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    xs, ys, zs = x * sa, y * sa, z * sa
    xc, yc, zc = x * c, y * c, z * c
    xyc, yzc, zxc = x * yc, y * zc, z * xc
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    rows = [
        [x * xc + ca, xyc - zs, zxc + ys, zero],
        [xyc + zs, y * yc + ca, yzc - xs, zero],
        [zxc - ys, yzc + xs, z * zc + ca, zero],
        [zero, zero, zero, one],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _translation_matrix(t_Bx3: jax.Array) -> jax.Array:
    """``[B, 4, 4]``: identity with ``t`` in the last column."""
    eye = jnp.broadcast_to(jnp.eye(4, dtype=t_Bx3.dtype), (t_Bx3.shape[0], 4, 4))
    return eye.at[:, :3, 3].set(t_Bx3)


def transformation_from_parameters(axisangle_Bx3: jax.Array, translation_Bx3: jax.Array,
                                   invert: bool = False) -> jax.Array:
    """``[B, 4, 4]`` rigid transform from the pose network's (axis-angle, translation).

    Monodepth2's ``transformation_from_parameters``: ``M = T(t) @ R`` (rotate, then
    translate), or with ``invert=True`` its exact inverse ``M = R^T @ T(-t)``. The pose
    network sees the frames in temporal order and Monodepth2 inverts for the previous frame
    (``frame_id < 0``) so that every pose maps the centre frame to the neighbour.
    """
    rot = rot_from_axisangle(axisangle_Bx3)
    t = translation_Bx3
    if invert:
        return jnp.matmul(jnp.swapaxes(rot, 1, 2), _translation_matrix(-t))
    return jnp.matmul(_translation_matrix(t), rot)


def intrinsics_matrices(intrinsics_Bx4: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(K, inv_K)``, both ``[B, 4, 4]``, from ``intrinsics [B, 4] = (fx, fy, cx, cy)``.

    ``K = [[fx, 0, cx, 0], [0, fy, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]]`` (the reference's 4x4
    layout); ``inv_K`` is its exact inverse in closed form (``1/fx``, ``-cx/fx``, ...), which
    is what the reference's ``np.linalg.pinv(K)`` computes for an invertible ``K``.
    """
    fx, fy, cx, cy = (intrinsics_Bx4[:, i] for i in range(4))
    zero, one = jnp.zeros_like(fx), jnp.ones_like(fx)

    def mat(rows):
        return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

    k = mat([[fx, zero, cx, zero], [zero, fy, cy, zero], [zero, zero, one, zero],
             [zero, zero, zero, one]])
    inv_k = mat([[1.0 / fx, zero, -cx / fx, zero], [zero, 1.0 / fy, -cy / fy, zero],
                 [zero, zero, one, zero], [zero, zero, zero, one]])
    return k, inv_k


def pixel_coordinates(height: int, width: int) -> jax.Array:
    """``[3, H * W]`` homogeneous pixel coordinates ``(u, v, 1)``, row-major (pixel
    ``(row r, column c)`` at index ``r * W + c`` has ``u = c``, ``v = r``)."""
    v, u = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
    return jnp.stack([u.reshape(-1), v.reshape(-1), jnp.ones(height * width, jnp.float32)])


def backproject(depth_BxHxW: jax.Array, inv_K: jax.Array) -> jax.Array:
    """``[B, 4, H * W]`` homogeneous camera points ``(X, Y, Z, 1)`` of every pixel centre at
    its depth: ``depth * inv_K[:3, :3] @ (u, v, 1)`` (Monodepth2's ``BackprojectDepth``;
    ``depth`` is the z coordinate, not the distance along the ray). Points are in row-major
    pixel order (see :func:`pixel_coordinates`)."""
    b, h, w = depth_BxHxW.shape
    rays = jnp.matmul(inv_K[:, :3, :3], pixel_coordinates(h, w))  # [B, 3, N]
    points = depth_BxHxW.reshape(b, 1, h * w) * rays
    return jnp.concatenate([points, jnp.ones((b, 1, h * w), points.dtype)], axis=1)


def project(points_Bx4xN: jax.Array, K: jax.Array, T: jax.Array, height: int, width: int,
            eps: float = 1e-7) -> jax.Array:
    """Sampling grid ``[B, H, W, 2]`` of ``(x, y)``: where the points (``[B, 4, H * W]``, in
    row-major pixel order of an ``H x W`` image) land in a camera at pose ``T`` with
    intrinsics ``K``, for :func:`grid_sample`.

    Monodepth2's ``Project3D``: ``P = (K @ T)[:3]``, ``(u, v) = (P x)[:2] / ((P x)[2] + eps)``,
    then normalised corner-aligned: ``x = (u / (W - 1) - 0.5) * 2`` (and ``y`` with ``H``),
    so pixel ``0`` maps to ``-1`` and pixel ``W - 1`` to ``+1``. Points behind the camera
    are not masked (as in the reference).
    """
    b = points_Bx4xN.shape[0]
    cam = jnp.matmul(jnp.matmul(K, T)[:, :3, :], points_Bx4xN)  # [B, 3, N]
    pix = cam[:, :2, :] / (cam[:, 2:3, :] + eps)
    pix = jnp.transpose(pix.reshape(b, 2, height, width), (0, 2, 3, 1))
    scale = jnp.asarray([width - 1, height - 1], pix.dtype)
    return (pix / scale - 0.5) * 2.0


def _border_clip(coord: jax.Array, size: int) -> jax.Array:
    """``clip(coord, 0, size - 1)`` with torch's ``grid_sample`` border gradient: 1 strictly
    inside ``(0, size - 1)``, 0 on and beyond the border (``jnp.clip`` would give 1/2 on it)."""
    inside = (coord > 0) & (coord < size - 1)
    clipped = jnp.clip(jax.lax.stop_gradient(coord), 0, size - 1)
    return jnp.where(inside, coord, clipped)


def grid_sample(image_BxHxWxC: jax.Array, grid_BxHoxWox2: jax.Array) -> jax.Array:
    """``[B, Ho, Wo, C]``: the image sampled bilinearly at the grid's ``(x, y)`` points.

    torch's ``F.grid_sample(mode='bilinear', padding_mode='border', align_corners=True)``
    (NHWC here): ``x`` is unnormalised to ``(x + 1) / 2 * (W - 1)`` pixels (``-1`` = centre
    of column 0, ``+1`` = centre of column ``W - 1``), then clamped to ``[0, W - 1]`` (and
    ``y`` likewise), then interpolated between the four neighbouring pixels. As in torch,
    the gradient with respect to the grid is zero for a coordinate on or beyond the border
    (the clamp cuts it); the gradient with respect to the image is the bilinear weights.
    Gather-based (one flat ``take_along_axis`` per corner).
    """
    b, h, w, c = image_BxHxWxC.shape
    _, ho, wo, _ = grid_BxHoxWox2.shape
    gx = (grid_BxHoxWox2[..., 0] + 1.0) * 0.5 * (w - 1)
    gy = (grid_BxHoxWox2[..., 1] + 1.0) * 0.5 * (h - 1)
    gx = _border_clip(gx, w).reshape(b, ho * wo)
    gy = _border_clip(gy, h).reshape(b, ho * wo)
    x0 = jax.lax.stop_gradient(jnp.floor(gx))
    y0 = jax.lax.stop_gradient(jnp.floor(gy))
    wx1, wy1 = gx - x0, gy - y0  # weights of the right and lower neighbours
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    # The right/lower neighbour exists unless the point sits exactly on the last pixel,
    # where its weight is 0: clamping its index keeps the gather in bounds.
    x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1i, y1i = jnp.minimum(x0i + 1, w - 1), jnp.minimum(y0i + 1, h - 1)
    flat = image_BxHxWxC.reshape(b, h * w, c)

    def gather(yi, xi):
        return jnp.take_along_axis(flat, (yi * w + xi)[..., None], axis=1)  # [B, N, C]

    out = ((wy0 * wx0)[..., None] * gather(y0i, x0i) + (wy0 * wx1)[..., None] * gather(y0i, x1i)
           + (wy1 * wx0)[..., None] * gather(y1i, x0i) + (wy1 * wx1)[..., None] * gather(y1i, x1i))
    return out.reshape(b, ho, wo, c)


def warp(source_image: jax.Array, depth: jax.Array, K: jax.Array, inv_K: jax.Array,
         T: jax.Array) -> jax.Array:
    """The neighbour ``source_image [B, H, W, C]`` seen from the centre view ``[B, H, W, C]``:
    every centre pixel is back-projected at its ``depth [B, H, W]`` (with ``inv_K``), moved
    into the neighbour's camera by ``T`` (centre -> neighbour), projected with ``K`` and the
    neighbour is sampled there (:func:`grid_sample`: bilinear, border padding). Monodepth2's
    ``generate_images_pred`` for one frame and scale; ``K`` belongs to the ``H x W`` image,
    which the source and the depth share."""
    b, h, w = depth.shape
    if source_image.shape[:3] != (b, h, w):
        raise ValueError(f"warp: the source image {source_image.shape} and the depth "
                         f"{depth.shape} must share batch, height and width; resize the depth "
                         "to the image first")
    grid = project(backproject(depth, inv_K), K, T, h, w)
    return grid_sample(source_image, grid)
