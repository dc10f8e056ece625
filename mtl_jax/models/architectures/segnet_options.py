"""``config.model`` options shared by the SegNet-family builders (MTAN, ATI-Net, baselines).

Keys (all optional): ``width`` (first SegNet width, default 64; the widths scale with it, e.g.
4 for tests), ``pixel_mean`` / ``pixel_std`` (default 0 / 1: MTAN's code feeds images in
[0, 1] unstandardised), ``dtype``, ``param_dtype``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtl_jax.models.encoders.segnet import SEGNET_WIDTHS, scaled_widths
from mtl_jax.models.options import pixel_stats, precision


def widths_of(model_cfg: Mapping[str, Any], base: Sequence[int] = SEGNET_WIDTHS
              ) -> tuple[int, ...]:
    width = int(model_cfg.get("width", 0) or base[0])
    if width < 1:
        raise ValueError(f"model.width must be >= 1, got {width}")
    return scaled_widths(base, width)


def common(model_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(precision kwargs, MultiTaskModel kwargs)``: dtype/param_dtype and the image
    standardisation (identity unless the config sets ``pixel_mean`` / ``pixel_std``)."""
    prec = precision(model_cfg)
    stats = {"pixel_mean": (0.0, 0.0, 0.0), "pixel_std": (1.0, 1.0, 1.0),
             **pixel_stats(model_cfg)}
    return prec, dict(stats, dtype=prec["dtype"])
