"""Relative multi-task gain Δm against single-task baselines.

Δm = 100 · mean_i (−1)^{l_i} · (M_i − B_i) / B_i, with l_i = 1 when lower is better, over the
metrics i present in both the results and the baseline. Keys are flat ``'<task>/<metric>'``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

PathLike = str | os.PathLike


def delta_m_terms(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    directions: Mapping[str, bool],
    keys: Iterable[str] | None = None,
) -> dict[str, float]:
    """Per-metric signed relative gain in percent, 100 · (−1)^{l_i} · (M_i − B_i) / B_i.

    Args:
      results: ``{'<task>/<metric>': value}`` of the run to judge.
      baseline: same keys for the single-task baselines.
      directions: ``{'<task>/<metric>': higher_is_better}``.
      keys: metrics to use; default: every key of ``results`` that the baseline also has.

    Returns:
      ``{key: term}`` in sorted key order; its keys are exactly the metrics used.

    Raises:
      ValueError: no metric in common, a requested key missing, a zero or non-finite
        baseline value.
      KeyError: a used metric has no direction.
    """
    if keys is None:
        used = sorted(set(results) & set(baseline))
    else:
        used = sorted(set(keys))
        missing = [k for k in used if k not in results or k not in baseline]
        if missing:
            raise ValueError(f"metrics requested but missing from results or baseline: {missing}")
    if not used:
        raise ValueError(
            "no metric in common between results and baseline; "
            f"results: {sorted(results)}, baseline: {sorted(baseline)}"
        )
    no_direction = [k for k in used if k not in directions]
    if no_direction:
        raise KeyError(f"no metric direction (higher is better?) for {no_direction}")
    terms = {}
    for k in used:
        m, b = float(results[k]), float(baseline[k])
        if b == 0.0 or not math.isfinite(b):
            raise ValueError(f"baseline value of {k!r} is {b}; Δm needs a finite nonzero value")
        sign = 1.0 if directions[k] else -1.0
        terms[k] = 100.0 * sign * (m - b) / b
    return terms


def delta_m(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    directions: Mapping[str, bool],
    keys: Iterable[str] | None = None,
) -> float:
    """Δm in percent (positive = better than the baselines); see ``delta_m_terms``.

    The metrics used are ``sorted(delta_m_terms(...))``: the keys of ``results`` also in
    ``baseline`` (or ``keys``); results metrics absent from the baseline are skipped.
    """
    terms = delta_m_terms(results, baseline, directions, keys)
    return sum(terms.values()) / len(terms)


def _flatten(tree: Mapping[str, Any], prefix: str, out: dict[str, float], source: str) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + "/", out, source)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            raise ValueError(f"{source}: value of {name!r} is not a number: {value!r}")


def load_baseline(paths: PathLike | Iterable[PathLike]) -> dict[str, float]:
    """Read baseline metrics from one JSON file or merge several (e.g. one per STL run).

    Each file holds ``{"semseg/miou": 0.4, ...}``; nested objects are flattened with '/'
    (``{"semseg": {"miou": 0.4}}`` is the same). A key found in two files with different
    values raises ValueError; the same value twice is accepted.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    merged: dict[str, float] = {}
    origin: dict[str, str] = {}
    from mtl_jax import paths as path_layer  # local files or gs://... (mtl_jax.paths)

    for path in paths:
        data = json.loads(path_layer.read_text(path))
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{path}: expected a JSON object of metrics, got {type(data).__name__}"
            )
        flat: dict[str, float] = {}
        _flatten(data, "", flat, str(path))
        for key, value in flat.items():
            if key in merged and merged[key] != value:
                raise ValueError(
                    f"conflicting baseline values for {key!r}: {merged[key]} in {origin[key]}, "
                    f"{value} in {path}"
                )
            merged[key] = value
            origin.setdefault(key, str(path))
    return merged
