"""Parameter counting by model part (the numbers ``mtl-jax params`` prints).

Counts are of trainable parameters only (the ``params`` collection); BatchNorm running
statistics live in ``batch_stats`` and are not counted. Works on concrete arrays and on the
``jax.ShapeDtypeStruct`` trees returned by ``jax.eval_shape(model.init, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(params: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts per top-level part: ``encoder``, ``decoders/<task>`` (one entry per task),
    each interaction module by its name (``transfer/<a>_to_<b>`` one entry per task-transfer
net), and ``total`` (last).

    ``params`` is the ``params`` collection; a full variables dict (``{'params': ...,
    'batch_stats': ...}``) is accepted too and only its ``params`` are counted.
    """
    if "params" in params and "encoder" not in params:
        params = params["params"]
    counts: dict[str, int] = {}
    keys = sorted(params, key=lambda k: (k != "encoder", k != "decoders"))
    for key in keys:
        if key in ("decoders", "transfer"):  # one entry per task / per TTNet (XTasC-Net)
            for task, tree in params[key].items():
                counts[f"{key}/{task}"] = _size(tree)
        else:
            counts[key] = _size(params[key])
    counts["total"] = sum(counts.values())
    return counts


def format_param_table(counts: Mapping[str, int]) -> str:
    """Two aligned columns, ``part`` and ``params`` with thousands separators, one row a part."""
    rows = [(part, f"{n:,}") for part, n in counts.items()]
    name_width = max([len("part")] + [len(part) for part, _ in rows])
    num_width = max([len("params")] + [len(num) for _, num in rows])
    lines = [f"{'part':<{name_width}}  {'params':>{num_width}}"]
    lines += [f"{part:<{name_width}}  {num:>{num_width}}" for part, num in rows]
    return "\n".join(lines)
