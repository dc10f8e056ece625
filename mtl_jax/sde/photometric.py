"""Monodepth2's self-supervised depth loss (DenseMTL's ``vendor/monodepth2``), as pure JAX.

:func:`monodepth_loss` is the reference's ``MonodepthLoss.generate_images_pred`` followed by
``compute_losses``: at every scale the disparity is upsampled to the input resolution, turned
into depth, the neighbours (previous and next frame) are warped into the centre view through it
and the predicted poses, and each pixel keeps the smallest photometric error among the warped
neighbours and, for auto-masking, the unwarped ones; plus an edge-aware smoothness term.
All images NHWC, float32, colours in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models.layers import resize_bilinear
from mtl_jax.sde.geometry import disp_to_depth, intrinsics_matrices, warp

#: SSIM's stabilising constants (Monodepth2's ``SSIM`` layer, for colours in ``[0, 1]``).
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _avg_pool3(x_padded: jax.Array) -> jax.Array:
    """3x3 mean, stride 1, no padding, over the H and W axes of ``[B, H + 2, W + 2, C]``."""
    total = jax.lax.reduce_window(x_padded, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                  "VALID")
    return total / 9.0


def ssim_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """``[B, H, W, C]``: ``clip((1 - SSIM) / 2, 0, 1)`` per pixel and channel (0 = identical).

    Monodepth2's ``SSIM`` layer: both images reflection-padded by 1 (the edge pixel is not
    repeated), local statistics from 3x3 average pools (stride 1, so the output keeps the
    input's size), ``sigma = pool(x^2) - mu^2`` (biased), ``C1 = 0.01^2``, ``C2 = 0.03^2``,
    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x + sigma_y
    + C2))``. The five pools run as one (padding commutes with the products).
    """
    c = x.shape[-1]
    stats = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    stats = jnp.pad(stats, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    pooled = _avg_pool3(stats)
    mu_x, mu_y, xx, yy, xy = (pooled[..., i * c:(i + 1) * c] for i in range(5))
    sigma_x = xx - mu_x ** 2
    sigma_y = yy - mu_y ** 2
    sigma_xy = xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return jnp.clip((1 - num / den) / 2, 0, 1)


def reprojection_loss(pred: jax.Array, target: jax.Array, no_ssim: bool = False) -> jax.Array:
    """``[B, H, W]`` photometric error of ``pred`` against ``target`` (both ``[B, H, W, C]``):
    ``0.85 * mean_c(ssim_distance) + 0.15 * mean_c(|pred - target|)``, or the channel-mean L1
    alone with ``no_ssim`` (Monodepth2's ``compute_reprojection_loss``)."""
    l1 = jnp.mean(jnp.abs(target - pred), axis=-1)
    if no_ssim:
        return l1
    return 0.85 * jnp.mean(ssim_distance(pred, target), axis=-1) + 0.15 * l1


def smooth_loss(disp_BxHxWx1: jax.Array, image_BxHxWx3: jax.Array) -> jax.Array:
    """Scalar edge-aware smoothness (Monodepth2's ``get_smooth_loss``): the mean absolute
    horizontal and vertical differences of neighbouring disparities, each weighted by
    ``exp(-mean_c |image difference|)`` of the same pixel pair, so that disparity may change
    where the image has an edge. ``mean(x terms) + mean(y terms)``; the image has the
    disparity's size."""
    d, img = disp_BxHxWx1, image_BxHxWx3
    grad_disp_x = jnp.abs(d[:, :, :-1] - d[:, :, 1:])
    grad_disp_y = jnp.abs(d[:, :-1] - d[:, 1:])
    grad_img_x = jnp.mean(jnp.abs(img[:, :, :-1] - img[:, :, 1:]), axis=-1, keepdims=True)
    grad_img_y = jnp.mean(jnp.abs(img[:, :-1] - img[:, 1:]), axis=-1, keepdims=True)
    return (jnp.mean(grad_disp_x * jnp.exp(-grad_img_x))
            + jnp.mean(grad_disp_y * jnp.exp(-grad_img_y)))


def image_pyramid(image_BxHxWxC: jax.Array, num_scales: int) -> list[jax.Array]:
    """``[image, image at 1/2, ..., at 1/2^(num_scales - 1)]``: scale ``s`` is
    ``H // 2^s x W // 2^s``, each level resized from the one above with an antialiased
    Lanczos-3 filter and clipped to ``[0, 1]``.

    The reference's data loader builds its colour pyramid the same way, a chain of PIL
    ``Resize(..., ANTIALIAS)`` (= Lanczos-3, whose kernel widens with the reduction: which
    ``jax.image.resize(method='lanczos3', antialias=True)`` reproduces on float images); it
    also rounds every level to uint8, which is not done here (a difference below 1/255).
    """
    levels = [image_BxHxWxC]
    b, h, w, c = image_BxHxWxC.shape
    for s in range(1, num_scales):
        shape = (b, h // 2 ** s, w // 2 ** s, c)
        resized = jax.image.resize(levels[-1], shape, method="lanczos3", antialias=True)
        levels.append(jnp.clip(resized, 0.0, 1.0))
    return levels


@dataclasses.dataclass(frozen=True)
class MonodepthOptions:
    """The loss's settings (hashable: a jitted function may close over them), with the
    defaults of Monodepth2 and DenseMTL's SDE configs.

    ``frame_ids``: the centre frame ``0`` first, then the neighbours in the order their
    losses are stacked (the order of ``[identity..., reprojection...]`` in the per-pixel
    minimum); ``scales``: the disparity scales, ``s`` at ``1 / 2^s`` of the input;
    ``min_depth``/``max_depth``: the range of :func:`~mtl_jax.sde.geometry.disp_to_depth`;
    ``disparity_smoothness``: the smoothness weight (divided by ``2^s`` at scale ``s``);
    ``no_ssim``: L1 only; ``avg_reprojection``: average the neighbours' errors instead of
    taking their minimum; ``disable_automasking``: no identity (unwarped) errors.
    """

    frame_ids: tuple[int, ...] = (0, -1, 1)
    scales: tuple[int, ...] = (0, 1, 2, 3)
    min_depth: float = 0.1
    max_depth: float = 100.0
    disparity_smoothness: float = 1e-3
    no_ssim: bool = False
    avg_reprojection: bool = False
    disable_automasking: bool = False

    def __post_init__(self):
        ids, scales = tuple(self.frame_ids), tuple(self.scales)
        if len(ids) < 2 or ids[0] != 0 or 0 in ids[1:] or len(set(ids)) != len(ids):
            raise UserError(f"monodepth frame_ids={ids}: give the centre frame 0 first, then "
                            "distinct neighbour ids, e.g. (0, -1, 1)")
        if not scales or len(set(scales)) != len(scales) or any(
                not isinstance(s, int) or s < 0 for s in scales):
            raise UserError(f"monodepth scales={scales}: give distinct non-negative "
                            "integers, e.g. (0, 1, 2, 3)")
        if not 0 < self.min_depth < self.max_depth:
            raise UserError(f"monodepth min_depth={self.min_depth}, max_depth={self.max_depth}:"
                            " need 0 < min_depth < max_depth, e.g. 0.1 and 100")
        object.__setattr__(self, "frame_ids", ids)
        object.__setattr__(self, "scales", scales)


def _merge(x: jax.Array, lead: tuple[int, ...], rest_ndim: int) -> jax.Array:
    """``x`` (its last ``rest_ndim`` axes follow the batch axis) broadcast to ``[*lead,
    *rest]`` and the leading axes merged: ``[prod(lead), *rest]``."""
    rest = x.shape[x.ndim - rest_ndim:]
    return jnp.broadcast_to(x, lead + rest).reshape((-1,) + rest)


def _check_inputs(disps, image, neighbours, poses, options):
    b, h, w, _ = image.shape
    for f in options.frame_ids[1:]:
        if f not in neighbours or f not in poses:
            raise ValueError(f"monodepth_loss: frame {f} of frame_ids={options.frame_ids} "
                             f"needs an image in neighbours ({sorted(neighbours)}) and a pose "
                             f"in poses ({sorted(poses)})")
        if neighbours[f].shape != image.shape:
            raise ValueError(f"monodepth_loss: neighbour {f} has shape {neighbours[f].shape}, "
                             f"the centre image {image.shape}: give full-resolution frames")
    for s in options.scales:
        want = (b, h // 2 ** s, w // 2 ** s, 1)
        if s not in disps or disps[s].shape != want:
            got = disps[s].shape if s in disps else "none"
            raise ValueError(f"monodepth_loss: the disparity of scale {s} must be {want} (the "
                             f"image's size / 2^{s}, one channel), got {got}")


def monodepth_loss(disps: dict[int, jax.Array], image: jax.Array,
                   neighbours: dict[int, jax.Array], intrinsics: jax.Array,
                   poses: dict[int, jax.Array], rng: jax.Array, options: MonodepthOptions,
                   ) -> tuple[jax.Array, dict[int, jax.Array], jax.Array]:
    """Monodepth2's self-supervised loss: ``(total, {scale: loss}, automask)``.

    Inputs: ``disps[s]`` the depth network's sigmoid disparity at its native resolution
    ``[B, H / 2^s, W / 2^s, 1]`` for every ``s`` in ``options.scales``; ``image`` the centre
    frame ``[B, H, W, 3]``; ``neighbours[f]`` frame ``f`` ``[B, H, W, 3]`` and ``poses[f]``
    its pose ``[B, 4, 4]`` (centre -> neighbour) for every ``f`` in ``options.frame_ids[1:]``;
    ``intrinsics [B, 4] = (fx, fy, cx, cy)`` of the ``H x W`` frames; ``rng`` a PRNG key
    for the tie-breaking noise.

    At each scale ``s`` (as the reference's ``generate_images_pred`` + ``compute_losses``):

    1. the disparity is upsampled to ``H x W`` (bilinear, ``align_corners=False``: torch's
       ``nn.Upsample``), converted to depth (``min_depth``, ``max_depth``) and every
       neighbour, at full resolution, is warped into the centre view through it;
    2. per pixel, the reprojection errors of the warped neighbours (``[B, H, W, n]``, or
       their mean with ``avg_reprojection``) against the full-resolution centre frame;
       unless ``disable_automasking``, the identity errors of the unwarped neighbours
       (likewise averaged or not) plus ``1e-5`` standard normal noise (ties) are stacked
       first; the per-pixel minimum over the stack (no minimum over a single map) is
       averaged over the batch and pixels;
    3. plus ``disparity_smoothness / 2^s`` times :func:`smooth_loss` of ``disp / (mean
       disp + 1e-7)`` (mean per example) at its native size, against the centre image at
       that size (:func:`image_pyramid`).

    All scales' and neighbours' warps and SSIMs run as one batch of ``S * F * B`` images
    (one warp and one SSIM in the compiled program, not ``S * F``).

    ``total`` is the mean over the scales. ``automask [B, H, W]`` (bool, scale 0) is the
    reference's auto-mask: True where a warped neighbour beat every unwarped one (the pixel
    moves with the camera and trains depth and pose), False where an unwarped neighbour is
    at least as close (a static pixel: a static camera, an object moving with the camera,
    textureless regions), which the minimum then trains nothing on. All True when
    ``disable_automasking`` (or when 0 is not among the scales).
    """
    _check_inputs(disps, image, neighbours, poses, options)
    b, h, w, _ = image.shape
    scales, nbr_ids = options.scales, options.frame_ids[1:]
    n_s, n_f = len(scales), len(nbr_ids)
    k, inv_k = intrinsics_matrices(intrinsics)
    pyramid = image_pyramid(image, max(scales) + 1)

    def combine(losses):  # [..., F, B, H, W] -> [..., B, H, W, F] (or its mean over F)
        stacked = jnp.moveaxis(losses, -4, -1)
        return jnp.mean(stacked, axis=-1, keepdims=True) if options.avg_reprojection else stacked

    # Every (scale, neighbour) warp in one batch of S * F * B: one warp, one SSIM.
    depth = jnp.stack([disp_to_depth(resize_bilinear(disps[s], (h, w))[..., 0],
                                     options.min_depth, options.max_depth) for s in scales])
    frames = jnp.stack([neighbours[f] for f in nbr_ids])  # [F, B, H, W, 3]
    pose = jnp.stack([poses[f] for f in nbr_ids])  # [F, B, 4, 4]

    lead = (n_s, n_f, b)
    warped = warp(_merge(frames, lead, 3), _merge(depth[:, None], lead, 2),
                  _merge(k, lead, 2), _merge(inv_k, lead, 2), _merge(pose, lead, 2))
    target = _merge(image, lead, 3)
    reprojection = combine(reprojection_loss(warped, target, options.no_ssim)
                           .reshape(lead + (h, w)))  # [S, B, H, W, F or 1]

    if options.disable_automasking:
        combined = reprojection
    else:  # the unwarped neighbours: independent of the scale, computed once
        identity = combine(reprojection_loss(
            _merge(frames, (n_f, b), 3), _merge(image, (n_f, b), 3),
            options.no_ssim).reshape((n_f, b, h, w)))  # [B, H, W, F or 1]
        noise = 1e-5 * jax.random.normal(rng, (n_s,) + identity.shape, identity.dtype)
        combined = jnp.concatenate([identity + noise, reprojection], axis=-1)
    if combined.shape[-1] == 1:
        to_optimise = combined[..., 0]
    else:
        to_optimise = jnp.min(combined, axis=-1)  # [S, B, H, W]
    automask = jnp.ones((b, h, w), bool)
    if not options.disable_automasking and 0 in scales:
        automask = jnp.argmin(combined[scales.index(0)], axis=-1) >= identity.shape[-1]

    per_scale = {}
    for i, s in enumerate(scales):
        disp = disps[s]
        mean_disp = jnp.mean(disp, axis=(1, 2), keepdims=True)
        smooth = smooth_loss(disp / (mean_disp + 1e-7), pyramid[s])
        per_scale[s] = (jnp.mean(to_optimise[i])
                        + options.disparity_smoothness * smooth / (2 ** s))
    total = sum(per_scale[s] for s in scales) / n_s
    return total, per_scale, automask
