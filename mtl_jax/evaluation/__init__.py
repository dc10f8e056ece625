"""Metric accumulation over a split and Δm against single-task baselines."""

from mtl_jax.evaluation.delta_m import delta_m, delta_m_terms, load_baseline
from mtl_jax.evaluation.metrics import (
    collect_metrics,
    compute_metrics,
    directions_for,
    empty_metrics,
    merge_metrics,
)

__all__ = [
    "collect_metrics",
    "compute_metrics",
    "delta_m",
    "delta_m_terms",
    "directions_for",
    "empty_metrics",
    "load_baseline",
    "merge_metrics",
]
