"""Loss-weighting strategies (see ``base.py`` for the interface); one file each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.errors import UserError
from mtl_jax.weighting.aligned_mtl import AlignedMTL
from mtl_jax.weighting.base import Weighting, WeightingOutput
from mtl_jax.weighting.cagrad import CAGrad
from mtl_jax.weighting.conflict_free import ConFIG
from mtl_jax.weighting.db_mtl import DBMTL
from mtl_jax.weighting.dualproj import DualProj
from mtl_jax.weighting.dwa import DynamicWeightAverage
from mtl_jax.weighting.ew import EqualWeighting
from mtl_jax.weighting.excess_mtl import ExcessMTL
from mtl_jax.weighting.fairgrad import FairGrad
from mtl_jax.weighting.famo import FAMO
from mtl_jax.weighting.fixed import FixedWeighting
from mtl_jax.weighting.gls import GLS
from mtl_jax.weighting.grad_magnitude import GradMagnitude
from mtl_jax.weighting.graddrop import GradDrop
from mtl_jax.weighting.gradnorm import GradNorm
from mtl_jax.weighting.gradvac import GradVac
from mtl_jax.weighting.imtl import IMTL
from mtl_jax.weighting.imtl_full import IMTLFull
from mtl_jax.weighting.imtl_l import IMTLL
from mtl_jax.weighting.krum import Krum
from mtl_jax.weighting.mgda import MGDA
from mtl_jax.weighting.moco import MoCo
from mtl_jax.weighting.nash_mtl import NashMTL
from mtl_jax.weighting.pcgrad import PCGrad
from mtl_jax.weighting.rlw import RandomLossWeighting
from mtl_jax.weighting.stch import STCH
from mtl_jax.weighting.trimmed_mean import TrimmedMean
from mtl_jax.weighting.upgrad import UPGrad
from mtl_jax.weighting.uw import UncertaintyWeighting, UncertaintyWeightingXTasC

WEIGHTINGS: dict[str, type[Weighting]] = {
    "ew": EqualWeighting,
    "fixed": FixedWeighting,
    "uw": UncertaintyWeighting,
    "uw_xtasc": UncertaintyWeightingXTasC,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
    "famo": FAMO,
    "grad_magnitude": GradMagnitude,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "cagrad": CAGrad,
    "imtl": IMTL,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
    # issue 18: the rest of LibMTL's and TorchJD's strategies
    "gradvac": GradVac, "graddrop": GradDrop, "moco": MoCo, "db_mtl": DBMTL,
    "fairgrad": FairGrad, "gls": GLS, "stch": STCH, "excess_mtl": ExcessMTL, "imtl_l": IMTLL,
    "imtl_full": IMTLFull, "dualproj": DualProj, "conflict_free": ConFIG, "krum": Krum,
    "trimmed_mean": TrimmedMean,
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
