"""Reading ``config.model`` options shared by every architecture builder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp


def as_dict(value: Any) -> dict[str, Any]:
    """A config sub-dict (``ConfigDict``, mapping or ``None``) as a plain ``dict``."""
    if value is None:
        return {}
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return value.to_dict()
    return dict(value)


def precision(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{'dtype': ..., 'param_dtype': ...}`` from ``model_cfg`` (defaults float32)."""
    return dict(dtype=jnp.dtype(model_cfg.get("dtype", "float32")),
                param_dtype=jnp.dtype(model_cfg.get("param_dtype", "float32")))


def pixel_stats(model_cfg: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """``pixel_mean`` / ``pixel_std`` given in ``model_cfg`` (image standardisation)."""
    return {key: tuple(float(v) for v in model_cfg.get(key))
            for key in ("pixel_mean", "pixel_std") if model_cfg.get(key, None) is not None}
