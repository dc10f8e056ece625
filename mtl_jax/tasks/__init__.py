"""Dense prediction tasks: head size, loss, metric statistics, metric directions.

``TASKS`` maps a task name to its class; ``make_task(name, **kwargs)`` builds one with
checked arguments. See ``docs/metrics.md`` for the exact metric definitions.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtl_jax.tasks.base import SumMetric, Task
from mtl_jax.tasks.depth import Depth
from mtl_jax.tasks.edges import Edges
from mtl_jax.tasks.normals import Normals
from mtl_jax.tasks.reconstruction import Reconstruction
from mtl_jax.tasks.semseg import SemSeg
from mtl_jax.tasks.video_depth import VideoDepth

TASKS: dict[str, type[Task]] = {
    "semseg": SemSeg,
    "depth": Depth,
    "normals": Normals,
    "edges": Edges,
    "reconstruction": Reconstruction,
    "disp": VideoDepth,
}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with constructor arguments ``kwargs``.

    Raises ValueError for an unknown name (listing the valid ones) and TypeError for an
    argument the task does not take (listing the ones it does).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"task {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    return cls(**kwargs)


__all__ = [
    "TASKS",
    "Depth",
    "Edges",
    "Normals",
    "Reconstruction",
    "SemSeg",
    "SumMetric",
    "Task",
    "VideoDepth",
    "make_task",
]
