"""Loss-weighting strategies (see ``base.py`` for the interface); one file each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import Weighting, WeightingOutput
from mtl_jax.weighting.ew import EqualWeighting
from mtl_jax.weighting.fixed import FixedWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "ew": EqualWeighting,
    "fixed": FixedWeighting,
}


def make_weighting(cfg: Mapping[str, Any] | str) -> Weighting:
    """``{'name': 'fixed', 'weights': {...}}`` (or just a name) -> strategy object."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = cfg.pop("name", "ew")
    if name not in WEIGHTINGS:
        raise UserError(f"unknown weighting {name!r}; available: {sorted(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](**cfg)
    except TypeError as e:
        raise UserError(f"weighting {name!r}: bad options {sorted(cfg)} ({e})") from e


__all__ = ["WEIGHTINGS", "Weighting", "WeightingOutput", "make_weighting"]
