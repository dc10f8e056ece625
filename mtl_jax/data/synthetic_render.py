"""Procedural indoor scenes rendered by ray casting, with exact dense labels.

One example is a pure function of ``(seed, split, index, resolution, domain)``: a room (floor,
walls, ceiling) seen from a random camera, with 3-8 objects of several shape classes, rendered
with Lambertian shading from a directional plus an ambient light. Every label comes from the
same ray hit, so they are exact and mutually consistent:

* ``semseg``  int8 ``[H,W]``: class of the first surface hit (``CLASSES``), ``-1`` on "clutter"
  objects, which play the role of unlabelled pixels (a small void fraction).
* ``depth``   float32 ``[H,W,1]``: metric z-depth in metres (distance along the optical axis),
  ``0`` where invalid.
* ``normals`` float32 ``[H,W,3]``: unit surface normals in the camera frame (x right, y down,
  z forward; normals face the camera), all-zero where invalid.
* ``edges``   int8 ``[H,W]``: ``1`` where a 4-neighbour has a different ``semseg`` value
  (void counts as a value of its own), else ``0``.
* ``image``   uint8 ``[H,W,3]``: shaded, textured, noisy RGB.
* ``intrinsics`` float32 ``[4]``: ``(fx, fy, cx, cy)`` in pixels; ``light`` float32 ``[3]``: unit
  vector towards the directional light, in the camera frame.

Depth and normals are invalidated Kinect-style: beyond a random maximal range and inside a few
random elliptical blobs. Two visual domains (``source``, ``target``) differ in palettes,
lighting, textures and sensor noise, not in geometry or label statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mtl_jax.data import raycast

CLASSES = (
    "floor", "wall", "ceiling", "box", "sphere", "cylinder", "table", "chair", "painting", "rug",
)
NUM_CLASSES = len(CLASSES)
VOID = -1
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER, TABLE, CHAIR, PAINTING, RUG = range(NUM_CLASSES)
DOMAINS = ("source", "target")
SPLITS = ("train", "val")

# Base colours (linear RGB). Classes draw from palettes that overlap on purpose (boxes,
# cylinders and spheres share one; tables and chairs share another), so colour alone does not
# give the class and a network has to use shape and geometry.
_PALETTES = {
    "source": {
        "floor": [(0.55, 0.40, 0.25), (0.45, 0.33, 0.22), (0.60, 0.55, 0.50)],
        "wall": [(0.80, 0.78, 0.70), (0.70, 0.75, 0.80), (0.85, 0.80, 0.65)],
        "ceiling": [(0.90, 0.90, 0.88), (0.85, 0.85, 0.80)],
        "object": [(0.75, 0.20, 0.15), (0.20, 0.45, 0.75), (0.25, 0.60, 0.30), (0.85, 0.70, 0.20),
                   (0.60, 0.55, 0.50), (0.55, 0.40, 0.25)],
        "wood": [(0.55, 0.40, 0.25), (0.40, 0.28, 0.18), (0.70, 0.55, 0.35), (0.20, 0.45, 0.75)],
        "art": [(0.90, 0.30, 0.20), (0.20, 0.30, 0.80), (0.95, 0.85, 0.30), (0.30, 0.70, 0.40)],
        "clutter": [(0.50, 0.50, 0.50), (0.75, 0.20, 0.15), (0.85, 0.70, 0.20)],
    },
    "target": {
        "floor": [(0.30, 0.32, 0.38), (0.25, 0.30, 0.28), (0.40, 0.40, 0.45)],
        "wall": [(0.45, 0.55, 0.62), (0.55, 0.62, 0.55), (0.60, 0.58, 0.66)],
        "ceiling": [(0.62, 0.66, 0.72), (0.55, 0.60, 0.70)],
        "object": [(0.30, 0.65, 0.70), (0.55, 0.30, 0.65), (0.70, 0.70, 0.30), (0.25, 0.30, 0.55),
                   (0.40, 0.40, 0.45), (0.30, 0.32, 0.38)],
        "wood": [(0.30, 0.32, 0.38), (0.45, 0.45, 0.50), (0.25, 0.30, 0.55), (0.55, 0.30, 0.65)],
        "art": [(0.10, 0.80, 0.80), (0.80, 0.10, 0.80), (0.60, 0.90, 0.20), (0.90, 0.90, 0.90)],
        "clutter": [(0.40, 0.40, 0.45), (0.30, 0.65, 0.70), (0.70, 0.70, 0.30)],
    },
}
_PALETTE_OF_CLASS = {
    FLOOR: "floor", WALL: "wall", CEILING: "ceiling", BOX: "object", SPHERE: "object",
    CYLINDER: "object", TABLE: "wood", CHAIR: "wood", PAINTING: "art", RUG: "art", VOID: "clutter",
}


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """How a visual domain looks: lighting, texture contrast, sensor noise, tone curve."""

    ambient: tuple[float, float]
    diffuse: tuple[float, float]
    light_tint: tuple[float, float, float]
    texture_contrast: float
    texture_frequency: float
    noise_std: float
    gamma: float


STYLES = {
    "source": DomainStyle(ambient=(0.25, 0.35), diffuse=(0.65, 0.85), light_tint=(1.0, 0.96, 0.88),
                          texture_contrast=0.25, texture_frequency=3.0, noise_std=0.015,
                          gamma=1.0 / 2.2),
    "target": DomainStyle(ambient=(0.12, 0.22), diffuse=(0.75, 1.0), light_tint=(0.85, 0.92, 1.0),
                          texture_contrast=0.45, texture_frequency=7.0, noise_std=0.04,
                          gamma=1.0 / 1.8),
}


@dataclasses.dataclass
class _Prims:
    """Primitives of one scene, grouped by type so that each type is intersected at once."""

    # Oriented boxes: centre [K,3], half sizes [K,3], yaw [K], label [K], colour [K,3].
    box_c: list = dataclasses.field(default_factory=list)
    box_h: list = dataclasses.field(default_factory=list)
    box_yaw: list = dataclasses.field(default_factory=list)
    box_label: list = dataclasses.field(default_factory=list)
    box_color: list = dataclasses.field(default_factory=list)
    # Spheres: centre [K,3], radius [K].
    sph_c: list = dataclasses.field(default_factory=list)
    sph_r: list = dataclasses.field(default_factory=list)
    sph_label: list = dataclasses.field(default_factory=list)
    sph_color: list = dataclasses.field(default_factory=list)
    # Vertical cylinders: base centre [K,3] (y = bottom), radius [K], height [K].
    cyl_c: list = dataclasses.field(default_factory=list)
    cyl_r: list = dataclasses.field(default_factory=list)
    cyl_h: list = dataclasses.field(default_factory=list)
    cyl_label: list = dataclasses.field(default_factory=list)
    cyl_color: list = dataclasses.field(default_factory=list)

    def box(self, centre, half, yaw, label, color):
        self.box_c.append(centre), self.box_h.append(half), self.box_yaw.append(yaw)
        self.box_label.append(label), self.box_color.append(color)

    def sphere(self, centre, radius, label, color):
        self.sph_c.append(centre), self.sph_r.append(radius)
        self.sph_label.append(label), self.sph_color.append(color)

    def cylinder(self, base, radius, height, label, color):
        self.cyl_c.append(base), self.cyl_r.append(radius), self.cyl_h.append(height)
        self.cyl_label.append(label), self.cyl_color.append(color)


def example_rng(seed: int, split: str, index: int, domain: str) -> np.random.Generator:
    """The generator that fully determines one example (same arguments, same bytes)."""
    return np.random.default_rng([seed, SPLITS.index(split), DOMAINS.index(domain), index])


def _pick(rng: np.random.Generator, palette: list) -> np.ndarray:
    base = np.asarray(palette[rng.integers(len(palette))], np.float64)
    return np.clip(base * rng.uniform(0.85, 1.15, 3), 0.02, 1.0)


def _colour(rng, domain, label):
    return _pick(rng, _PALETTES[domain][_PALETTE_OF_CLASS[label]])


def sample_scene(rng: np.random.Generator, domain: str, width: int, height: int):
    """Room, camera and objects. Units: metres; world y is up, the floor is y = 0."""
    room = np.array([rng.uniform(5.0, 9.0), rng.uniform(2.6, 3.4), rng.uniform(5.0, 9.0)])
    lo = np.array([-room[0] / 2, 0.0, -room[2] / 2])
    hi = np.array([room[0] / 2, room[1], room[2] / 2])

    fov_x = np.deg2rad(rng.uniform(55.0, 75.0))
    focal = (width / 2.0) / np.tan(fov_x / 2.0)
    intrinsics = np.array([focal, focal, (width - 1) / 2.0, (height - 1) / 2.0])

    yaw = rng.uniform(-np.pi, np.pi)
    pitch = np.deg2rad(rng.uniform(-30.0, -5.0))
    roll = np.deg2rad(rng.uniform(-4.0, 4.0))
    forward_dir = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch),
                            np.cos(yaw) * np.cos(pitch)])
    # Put the camera near the wall behind it, so that the room lies in front.
    flat = np.array([np.sin(yaw), 0.0, np.cos(yaw)])
    back = np.where(flat < 0, hi, lo)  # the wall the camera turns its back to
    pos = np.zeros(3)
    for ax in (0, 2):
        span = hi[ax] - lo[ax]
        pos[ax] = lo[ax] + span * rng.uniform(0.2, 0.8)
    pos[[0, 2]] = 0.5 * pos[[0, 2]] + 0.5 * (back[[0, 2]] * 0.7)
    pos[1] = rng.uniform(1.2, 1.9)
    down = np.array([0.0, -1.0, 0.0])
    down = down - down.dot(forward_dir) * forward_dir
    down /= np.linalg.norm(down)
    right = np.cross(down, forward_dir)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    cam_to_world = np.stack([right, down, forward_dir], axis=1)  # columns: camera axes in world

    prims = _Prims()
    n_objects = int(rng.integers(3, 9))
    half_fov = fov_x / 2.0
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_objects):
        kind = rng.choice(["box", "sphere", "cylinder", "table", "chair", "painting", "rug",
                           "clutter"], p=[0.18, 0.14, 0.14, 0.13, 0.13, 0.1, 0.08, 0.1])
        # Objects in front of the camera (so that they are seen), inside the room.
        for _attempt in range(10):
            ang = yaw + rng.uniform(-half_fov, half_fov)
            dist = rng.uniform(1.5, 5.0)
            x, z = pos[0] + dist * np.sin(ang), pos[2] + dist * np.cos(ang)
            margin = 0.8
            if lo[0] + margin < x < hi[0] - margin and lo[2] + margin < z < hi[2] - margin:
                if all((x - px) ** 2 + (z - pz) ** 2 > (0.6 + pr) ** 2 for px, pz, pr in placed):
                    break
        else:
            continue
        obj_yaw = rng.uniform(-np.pi, np.pi)
        if kind == "box":
            h = rng.uniform([0.15, 0.15, 0.15], [0.5, 0.6, 0.5])
            prims.box([x, h[1], z], h, obj_yaw, BOX, _colour(rng, domain, BOX))
            placed.append((x, z, max(h[0], h[2])))
        elif kind == "sphere":
            r = rng.uniform(0.2, 0.5)
            lift = rng.uniform(0.0, 0.6) if rng.uniform() < 0.3 else 0.0
            prims.sphere([x, r + lift, z], r, SPHERE, _colour(rng, domain, SPHERE))
            placed.append((x, z, r))
        elif kind == "cylinder":
            r, hgt = rng.uniform(0.12, 0.4), rng.uniform(0.3, 1.6)
            prims.cylinder([x, 0.0, z], r, hgt, CYLINDER, _colour(rng, domain, CYLINDER))
            placed.append((x, z, r))
        elif kind == "table":
            hx, hz, top = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6), rng.uniform(0.65, 0.85)
            col = _colour(rng, domain, TABLE)
            prims.box([x, top - 0.03, z], [hx, 0.03, hz], obj_yaw, TABLE, col)
            cy, sy = np.cos(obj_yaw), np.sin(obj_yaw)
            for lx, lz in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                ox, oz = lx * (hx - 0.06), lz * (hz - 0.06)
                wx, wz = x + cy * ox + sy * oz, z - sy * ox + cy * oz
                prims.cylinder([wx, 0.0, wz], 0.035, top - 0.06, TABLE, col)
            placed.append((x, z, max(hx, hz)))
        elif kind == "chair":
            hs, seat = rng.uniform(0.2, 0.28), rng.uniform(0.42, 0.5)
            col = _colour(rng, domain, CHAIR)
            cy, sy = np.cos(obj_yaw), np.sin(obj_yaw)
            prims.box([x, seat - 0.025, z], [hs, 0.025, hs], obj_yaw, CHAIR, col)
            bx, bz = x + sy * (-hs + 0.02), z + cy * (-hs + 0.02)
            prims.box([bx, seat + 0.25, bz], [hs, 0.25, 0.02], obj_yaw, CHAIR, col)
            for lx, lz in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                ox, oz = lx * (hs - 0.03), lz * (hs - 0.03)
                prims.box([x + cy * ox + sy * oz, (seat - 0.05) / 2, z - sy * ox + cy * oz],
                          [0.02, (seat - 0.05) / 2, 0.02], obj_yaw, CHAIR, col)
            placed.append((x, z, hs))
        elif kind == "painting":
            # A thin panel on a wall: same geometry as the wall, only appearance differs.
            ax = int(rng.integers(2))
            side = hi if rng.uniform() < 0.5 else lo
            centre = np.array([x, rng.uniform(1.2, 1.9), z])
            centre[2 * ax] = side[2 * ax] + (-0.01 if side is hi else 0.01)
            half = np.array([0.01, rng.uniform(0.25, 0.5), 0.01])
            half[2 - 2 * ax] = rng.uniform(0.3, 0.7)
            prims.box(centre, half, 0.0, PAINTING, _colour(rng, domain, PAINTING))
        elif kind == "rug":
            h = [rng.uniform(0.5, 1.2), 0.004, rng.uniform(0.4, 0.9)]
            prims.box([x, 0.004, z], h, obj_yaw, RUG, _colour(rng, domain, RUG))
        else:  # clutter: small unlabelled objects (the void class)
            for _ in range(int(rng.integers(1, 4))):
                ox, oz = x + rng.uniform(-0.4, 0.4), z + rng.uniform(-0.4, 0.4)
                r = rng.uniform(0.06, 0.15)
                if rng.uniform() < 0.5:
                    prims.sphere([ox, r, oz], r, VOID, _colour(rng, domain, VOID))
                else:
                    prims.box([ox, r, oz], [r, r, r], rng.uniform(-np.pi, np.pi), VOID,
                              _colour(rng, domain, VOID))
            placed.append((x, z, 0.4))

    room_colors = {k: _colour(rng, domain, k) for k in (FLOOR, WALL, CEILING)}
    # Light: a directional light from above, at a random azimuth.
    style = STYLES[domain]
    el, az = np.deg2rad(rng.uniform(35.0, 75.0)), rng.uniform(-np.pi, np.pi)
    to_light = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    light = dict(
        to_light=to_light,
        ambient=rng.uniform(*style.ambient),
        diffuse=rng.uniform(*style.diffuse),
        tint=np.asarray(style.light_tint),
    )
    return dict(room=(lo, hi), cam_pos=pos, cam_to_world=cam_to_world, intrinsics=intrinsics,
                prims=prims, room_colors=room_colors, light=light)


def texture_phases(rng: np.random.Generator) -> np.ndarray:
    """The random phases of the class textures, ``[NUM_CLASSES + 1, 3]`` (void first)."""
    return rng.uniform(0, 2 * np.pi, size=(NUM_CLASSES + 1, 3))


def _texture(phase: np.ndarray, style: DomainStyle, points: np.ndarray, label: np.ndarray):
    """Procedural albedo modulation in [1 - contrast, 1 + contrast] from world positions.

    Each class gets its own pattern (stripes, checker, smooth noise), with the random phases
    ``phase`` (:func:`texture_phases`). A function of the world point and its class only, so a
    surface looks the same from every camera.
    """
    f = style.texture_frequency
    out = np.ones(len(points))
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    for cls in range(-1, NUM_CLASSES):
        m = label == cls
        if not m.any():
            continue
        ph = phase[cls + 1]
        px, py, pz = x[m], y[m], z[m]
        if cls in (FLOOR, TABLE, CHAIR):  # planks / wood grain
            pat = np.sin(f * 2.0 * (px * 0.8 + pz * 0.6) + ph[0])
        elif cls in (RUG, PAINTING):  # checker / blocks
            pat = np.sign(np.sin(f * 1.5 * px + ph[0]) * np.sin(f * 1.5 * (py + pz) + ph[1]))
        elif cls in (WALL, CEILING):  # faint smooth noise
            pat = 0.5 * (np.sin(f * 0.7 * px + ph[0]) * np.sin(f * 0.9 * pz + ph[1])
                         + np.sin(f * 1.1 * py + ph[2]))
        else:  # objects and clutter: smooth noise
            pat = np.sin(f * px + ph[0]) * np.sin(f * py + ph[1]) * np.sin(f * pz + ph[2])
        out[m] = 1.0 + style.texture_contrast * pat
    return out


def _invalid_mask(rng: np.random.Generator, depth: np.ndarray) -> np.ndarray:
    """Kinect-like holes: far range plus a few random elliptical blobs."""
    h, w = depth.shape
    invalid = depth > rng.uniform(6.0, 8.0)
    v, u = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.02, 0.08) * h, rng.uniform(0.02, 0.08) * w
        invalid |= ((v - cy) / ry) ** 2 + ((u - cx) / rx) ** 2 <= 1.0
    return invalid


def semantic_edges(semseg: np.ndarray) -> np.ndarray:
    """1 where a 4-neighbour has another label (void counts as a label), else 0. int8 [H,W]."""
    e = np.zeros(semseg.shape, bool)
    dv = semseg[1:, :] != semseg[:-1, :]
    dh = semseg[:, 1:] != semseg[:, :-1]
    e[1:, :] |= dv
    e[:-1, :] |= dv
    e[:, 1:] |= dh
    e[:, :-1] |= dh
    return e.astype(np.int8)


def cast(scene: dict, origin: np.ndarray, cam_to_world: np.ndarray, height: int,
         width: int) -> dict[str, np.ndarray]:
    """First hits of the camera rays of one view of ``scene`` (camera centre ``origin``,
    rotation ``cam_to_world``, the scene's intrinsics): per pixel (flattened, row-major) the
    world ray ``d`` (unit z in the camera frame), ray parameter / z-depth ``t``, unit world
    normal facing the camera, class ``label`` and base ``color``."""
    o = origin
    d = raycast.rays(scene["intrinsics"], cam_to_world, height, width)
    n_pix = len(d)

    t, normal, label = raycast.hit_room(o, d, *scene["room"], labels=(FLOOR, CEILING, WALL))
    color = np.stack([scene["room_colors"][k] for k in (FLOOR, WALL, CEILING)])[
        np.where(label == FLOOR, 0, np.where(label == WALL, 1, 2))]
    p = scene["prims"]
    groups = []
    if p.box_c:
        bt, bn = raycast.hit_boxes(o, d, np.array(p.box_c, float), np.array(p.box_h, float),
                                   np.array(p.box_yaw, float))
        groups.append((bt, bn, p.box_label, p.box_color))
    if p.sph_c:
        st, sn = raycast.hit_spheres(o, d, np.array(p.sph_c, float), np.array(p.sph_r, float))
        groups.append((st, sn, p.sph_label, p.sph_color))
    if p.cyl_c:
        ct, cn = raycast.hit_cylinders(o, d, np.array(p.cyl_c, float), np.array(p.cyl_r, float),
                                       np.array(p.cyl_h, float))
        groups.append((ct, cn, p.cyl_label, p.cyl_color))
    for gt, gn, glabel, gcolor in groups:
        k = np.argmin(gt, axis=0)
        tk = gt[k, np.arange(n_pix)]
        closer = tk < t
        t = np.where(closer, tk, t)
        normal = np.where(closer[:, None], gn[k, np.arange(n_pix)], normal)
        label = np.where(closer, np.asarray(glabel)[k], label)
        color = np.where(closer[:, None], np.asarray(gcolor)[k], color)

    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    # Normals face the camera.
    normal *= np.where(np.einsum("nj,nj->n", normal, d) > 0, -1.0, 1.0)[:, None]
    return dict(d=d, t=t, normal=normal, label=label, color=color)


def shade(scene: dict, style: DomainStyle, origin: np.ndarray, hit: dict[str, np.ndarray],
          phase: np.ndarray) -> np.ndarray:
    """Noise-free RGB in [0, 1] (flattened ``[N, 3]``) of the hits of :func:`cast`: textured
    albedo (:func:`_texture`) under Lambertian shading from the scene's directional and
    ambient light, tone-mapped. View-independent: every term depends on the world point, its
    normal and class only."""
    points = origin[None] + hit["t"][:, None] * hit["d"]
    albedo = hit["color"] * _texture(phase, style, points, hit["label"])[:, None]
    light = scene["light"]
    lambert = np.maximum(hit["normal"] @ light["to_light"], 0.0)
    radiance = albedo * (light["ambient"] + light["diffuse"] * lambert)[:, None] * light["tint"]
    return np.clip(radiance, 0.0, 1.0) ** style.gamma


def render_example(seed: int, split: str, index: int, height: int = 96, width: int = 128,
                   domain: str = "source") -> dict[str, np.ndarray]:
    """Render one example. Pure function of its arguments; see the module docstring."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = example_rng(seed, split, index, domain)
    scene = sample_scene(rng, domain, width, height)
    o = scene["cam_pos"]
    hit = cast(scene, o, scene["cam_to_world"], height, width)
    style = STYLES[domain]
    img = shade(scene, style, o, hit, texture_phases(rng))
    img = img.reshape(height, width, 3) + rng.normal(0.0, style.noise_std, (height, width, 3))
    image = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)

    depth = hit["t"].reshape(height, width)
    normals_cam = (hit["normal"] @ scene["cam_to_world"]).reshape(height, width, 3)
    semseg = hit["label"].reshape(height, width).astype(np.int8)
    invalid = _invalid_mask(rng, depth)
    depth = np.where(invalid, 0.0, depth).astype(np.float32)[..., None]
    normals_cam = np.where(invalid[..., None], 0.0, normals_cam).astype(np.float32)
    light = scene["light"]
    return {
        "image": image,
        "semseg": semseg,
        "depth": depth,
        "normals": normals_cam,
        "edges": semantic_edges(semseg),
        "intrinsics": scene["intrinsics"].astype(np.float32),
        "light": (light["to_light"] @ scene["cam_to_world"]).astype(np.float32),
    }
