"""Metric statistics of several tasks at once: collect, merge, compute to a flat dict.

A *metric dict* maps task name -> that task's ``SumMetric``. It is a pytree, so it can be
returned from a jitted eval step and merged there or on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from mtl_jax.tasks.base import Batch, SumMetric, Task

Tasks = Mapping[str, Task] | Sequence[Task]


def as_task_dict(tasks: Tasks) -> dict[str, Task]:
    """``{task.name: task}`` from a sequence of tasks (a mapping is returned as a dict)."""
    if isinstance(tasks, Mapping):
        return dict(tasks)
    out = {t.name: t for t in tasks}
    if len(out) != len(tasks):
        raise ValueError(f"duplicate task names in {[t.name for t in tasks]}")
    return out


def collect_metrics(tasks: Tasks, preds: Mapping[str, jax.Array], batch: Batch) -> dict:
    """``{name: task.metrics(preds[name], batch)}`` for every task (jit-compatible)."""
    return {name: task.metrics(preds[name], batch) for name, task in as_task_dict(tasks).items()}


def empty_metrics(tasks: Tasks) -> dict[str, SumMetric]:
    """Zero statistics for every task (neutral element of ``merge_metrics``)."""
    return {name: task.empty_metrics() for name, task in as_task_dict(tasks).items()}


def merge_metrics(
    a: Mapping[str, SumMetric] | None, b: Mapping[str, SumMetric]
) -> dict[str, SumMetric]:
    """Task-wise ``a[t].merge(b[t])``; ``a=None`` returns ``b`` (start of an accumulation)."""
    if a is None:
        return dict(b)
    if set(a) != set(b):
        raise ValueError(f"cannot merge metrics of tasks {sorted(a)} and {sorted(b)}")
    return {name: a[name].merge(b[name]) for name in a}


def compute_metrics(metrics: Mapping[str, SumMetric]) -> dict[str, float]:
    """Flat ``{'<task>/<metric>': float}`` (host side; fetches the statistics first)."""
    out: dict[str, float] = {}
    for name, metric in jax.device_get(dict(metrics)).items():
        for key, value in metric.compute().items():
            out[f"{name}/{key}"] = float(value)
    return out


def directions_for(tasks: Tasks) -> dict[str, bool]:
    """Flat ``{'<task>/<metric>': higher_is_better}`` for every metric the tasks report."""
    return {
        f"{name}/{key}": bool(higher)
        for name, task in as_task_dict(tasks).items()
        for key, higher in task.directions.items()
    }
