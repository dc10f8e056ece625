"""Frame triplets of the procedural scenes, for self-supervised depth from video.

One triplet is the scene of :mod:`mtl_jax.data.synthetic_render` seen from three camera poses
along a smooth path, frames ``t-1``, ``t``, ``t+1``: a pure function of ``(seed, split, index,
resolution)`` (:func:`render_triplet`).

**Camera path.** The centre camera is the scene's own (near the wall behind it, looking into
the room, objects 1.5-5 m ahead). The path has a constant velocity and turn rate: frame
``k`` in (-1, 0, 1) sits at ``c + k·v`` and is turned by ``k·ψ`` about the world's vertical
axis, where per frame ``v`` is 0.15-0.30 m along the centre camera's view direction plus up to
±0.08 m sideways (camera x), and ``ψ`` is up to ±1.5°. At the default 96×128 (focal length
about 100 px) the true motion field has a median of 2-5 px and a maximum of 9-30 px (near
surfaces at the image border); surfaces nearer than 2.5 m move 5-7 px (median), those beyond
5 m 1-5 px: clear parallax between near and far surfaces. Most of the centre frame stays
visible in the neighbours: about 99 % of its pixels project inside frame t-1 (which sees more)
and 78-86 % inside frame t+1 (zoomed in); a few more are occluded there.

**Photometric consistency.** The textures are functions of the world point (fixed to the
surfaces), the shading is Lambertian under a light fixed in the world (view-independent), and
there is **no sensor noise**: a surface point has the same colour in the three frames, so
warping a neighbour with the true depth and pose reproduces the centre frame up to resampling
(one ray per pixel, no anti-aliasing) and occlusions. The palette is the ``source`` domain's.

Fields (centre frame unless said otherwise):

* ``image``, ``image_prev``, ``image_next``: uint8 ``[H,W,3]``, frames t, t-1, t+1;
* ``intrinsics``: float32 ``[4]`` ``(fx, fy, cx, cy)`` (the same for the three frames);
* ``pose_prev``, ``pose_next``: float32 ``[4,4]``, the rigid transform ``T`` from the centre
  camera's coordinates to frame t-1's / t+1's (``x_nb = T @ x_centre``; x right, y down, z
  forward);
* ``semseg``, ``edges``, ``normals``, ``light``: as in :mod:`~mtl_jax.data.synthetic_render`;
* ``depth``: float32 ``[H,W,1]`` z-depth in metres, valid everywhere (no Kinect-like holes:
  it is for evaluation, never for training the self-supervised depth).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mtl_jax.data import synthetic_render as render

#: The builder-config "domain" name of the triplet variant of the ``synthetic`` dataset.
TRIPLETS = "triplets"
#: The frames of a triplet, relative to the centre frame (Monodepth2's frame ids).
FRAME_IDS = (-1, 0, 1)
#: Appearance: the source domain without sensor noise (see the module docstring).
STYLE = dataclasses.replace(render.STYLES["source"], noise_std=0.0)
#: Per-frame camera motion: metres along the view direction, metres sideways (±), degrees of
#: yaw (±).
FORWARD_RANGE = (0.15, 0.30)
SIDEWAYS_MAX = 0.08
YAW_MAX_DEG = 1.5


def triplet_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that fully determines one triplet (a stream of its own, distinct from
    the single-image domains')."""
    stream = len(render.DOMAINS)
    return np.random.default_rng([seed, render.SPLITS.index(split), stream, index])


def _yaw(angle: float) -> np.ndarray:
    """Rotation by ``angle`` about the world's vertical (y) axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_path(rng: np.random.Generator, position: np.ndarray, cam_to_world: np.ndarray
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{frame id: (camera centre, cam_to_world)}`` of the three frames around the centre
    camera ``(position, cam_to_world)`` (module docstring)."""
    forward = rng.uniform(*FORWARD_RANGE)
    sideways = rng.uniform(-SIDEWAYS_MAX, SIDEWAYS_MAX)
    yaw = np.deg2rad(rng.uniform(-YAW_MAX_DEG, YAW_MAX_DEG))
    velocity = cam_to_world @ np.array([sideways, 0.0, forward])  # camera axes -> world
    return {k: (position + k * velocity, _yaw(k * yaw) @ cam_to_world) for k in FRAME_IDS}


def relative_pose(centre: tuple[np.ndarray, np.ndarray],
                  other: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """float64 ``[4,4]`` ``T`` with ``x_other = T @ x_centre`` (camera coordinates) for two
    cameras given as ``(centre, cam_to_world)``."""
    (p_c, r_c), (p_o, r_o) = centre, other
    t = np.eye(4)
    t[:3, :3] = r_o.T @ r_c
    t[:3, 3] = r_o.T @ (p_c - p_o)
    return t


def _to_uint8(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0).reshape(height, width, 3) * 255.0).astype(np.uint8)


def render_triplet(seed: int, split: str = "train", index: int = 0, height: int = 96,
                   width: int = 128) -> dict[str, np.ndarray]:
    """Render one triplet. Pure function of its arguments; see the module docstring."""
    if split not in render.SPLITS:
        raise ValueError(f"split must be one of {render.SPLITS}, got {split!r}")
    rng = triplet_rng(seed, split, index)
    scene = render.sample_scene(rng, "source", width, height)
    phase = render.texture_phases(rng)
    path = camera_path(rng, scene["cam_pos"], scene["cam_to_world"])
    images, centre_hit = {}, None
    for k, (origin, cam_to_world) in path.items():
        hit = render.cast(scene, origin, cam_to_world, height, width)
        images[k] = _to_uint8(render.shade(scene, STYLE, origin, hit, phase), height, width)
        if k == 0:
            centre_hit = hit
    r_c = path[0][1]
    semseg = centre_hit["label"].reshape(height, width).astype(np.int8)
    return {
        "image": images[0],
        "image_prev": images[-1],
        "image_next": images[1],
        "intrinsics": scene["intrinsics"].astype(np.float32),
        "pose_prev": relative_pose(path[0], path[-1]).astype(np.float32),
        "pose_next": relative_pose(path[0], path[1]).astype(np.float32),
        "semseg": semseg,
        "depth": centre_hit["t"].reshape(height, width, 1).astype(np.float32),
        "normals": (centre_hit["normal"] @ r_c).reshape(height, width, 3).astype(np.float32),
        "edges": render.semantic_edges(semseg),
        "light": (scene["light"]["to_light"] @ r_c).astype(np.float32),
    }
