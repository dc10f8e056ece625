"""Self-supervised depth from video (DenseMTL's "SDE" setting, Monodepth2's loss).

A depth network predicts the centre frame's disparity, a pose network the camera motion to the
previous and next frames; the neighbours are warped into the centre view through the predicted
depth and pose, and the photometric error of the warp (SSIM + L1, with Monodepth2's per-pixel
minimum and auto-masking) plus an edge-aware smoothness term train both networks. No depth
label is used for training.

* :mod:`mtl_jax.sde.geometry` -- cameras and warping: disparity to depth, axis-angle poses,
  intrinsics, back-projection, projection, ``grid_sample`` (bilinear, border padding,
  corner-aligned), the warp of a neighbour into the centre view.
* :mod:`mtl_jax.sde.photometric` -- the loss: SSIM distance, reprojection loss, edge-aware
  smoothness, :class:`~mtl_jax.sde.photometric.MonodepthOptions` and
  :func:`~mtl_jax.sde.photometric.monodepth_loss`.

Conventions (all arrays NHWC, batch first, float32): camera coordinates x right, y down,
z forward; pixel ``(u, v)`` = (column, row) of the pixel centre, pixel ``i`` at coordinate
``i``; intrinsics ``(fx, fy, cx, cy)`` in pixels of the image they come with; a pose ``T``
(4x4) maps centre-frame camera coordinates to the neighbour's: ``x_nb = T @ x_centre``.
"""
