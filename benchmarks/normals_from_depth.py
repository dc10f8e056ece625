"""Normals from depth: ours (``data.geometry.normals_from_depth``) against DenseMTL's
(``data.geometry.densemtl_normals_from_depth``: ``d2normals(unproject(depth), n_bases=4)`` with
its border/dilation mask), both scored against the exact normals of the procedural dataset (its
renderer knows the surfaces).

    python benchmarks/normals_from_depth.py [--num=50] [--height=96] [--width=128]

Prints, per method, the fraction of valid-depth pixels that get a normal and the mean / median
angle error (degrees) on them. DenseMTL's z-sign convention (``normals[:, 2].abs_()``: the
camera-facing normals, z < 0, are mirrored to z > 0) is undone before scoring (ours face the
camera), so the numbers compare geometry only. ``--inverse`` also scores DenseMTL's released
loss input: the point cloud of the *inverse-depth encoding* ``65536 / (depth_cm + 1)`` (its
``NormalsLoss`` unprojects ``x['gt_depth']``, the encoded value). Writes nothing;
docs/models/densemtl.md quotes the output.
"""

from __future__ import annotations

import argparse

import numpy as np

from mtl_jax.data.geometry import densemtl_normals_from_depth, normals_from_depth
from mtl_jax.data.synthetic_render import render_example


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.sum(a * b, axis=-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=50)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--inverse", action="store_true")
    args = p.parse_args()
    stats = {k: [[], 0] for k in ("ours", "densemtl", "densemtl_inverse")}
    total_valid = 0
    for i in range(args.num):
        ex = render_example(0, "val", i, args.height, args.width)
        depth, exact, k = ex["depth"][..., 0].astype(np.float64), ex["normals"], ex["intrinsics"]
        valid = depth > 0
        total_valid += int(valid.sum())
        ours = normals_from_depth(depth, k)
        ok = np.any(ours != 0, axis=-1) & valid
        stats["ours"][0].append(angles(ours, exact)[ok])
        stats["ours"][1] += int(ok.sum())
        inputs = [("densemtl", depth)]
        if args.inverse:
            inputs.append(("densemtl_inverse", 65536.0 / (100.0 * depth + 1.0)))
        for name, d in inputs:
            n, ok = densemtl_normals_from_depth(d, k, valid)
            # |n_z| mirrors the camera-facing normals (z < 0 for a camera looking along +z)
            # through the image plane: a reflection, so angles between two such normals are
            # those of the true ones. Undo it to score the geometry.
            n = n * np.array([1.0, 1.0, -1.0])
            stats[name][0].append(angles(n, exact)[ok])
            stats[name][1] += int(ok.sum())
    print(f"{args.num} val images at {args.height}x{args.width}; {total_valid} valid-depth px")
    for name, (errs, kept) in stats.items():
        if not errs:
            continue
        e = np.concatenate(errs)
        print(f"{name:17s} kept {100 * kept / total_valid:5.1f} %  mean {e.mean():6.2f} deg  "
              f"median {np.median(e):6.2f} deg  within 11.25: {100 * np.mean(e < 11.25):5.1f} %")


if __name__ == "__main__":
    main()
