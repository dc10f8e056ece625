"""What the discriminators see: the model's outputs mapped to a domain-comparable form.

Each task says it (``Task.discriminator_input``; DenseMTL's choices): semseg -> weighted
self-information ``-p·log2(p) / log2(C)`` per class channel (ADVENT); depth -> the
prediction min-max normalised per image to [0, 1]; normals -> unit vectors; edges -> the edge
probability. Every input is float32 ``[B, H, W, C]`` at the output size (side outputs are
already resized to it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from mtl_jax.models.multitask import side_outputs
from mtl_jax.tasks import TASKS, Task


def _supports_uda(cls: type[Task]) -> bool:
    return cls.discriminator_input.__func__ is not Task.discriminator_input.__func__


#: task name -> map from its raw output to the discriminator input (``Task.discriminator_input``
#: of the tasks that define one; task options do not change it).
DISCRIMINATOR_INPUTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    name: cls.discriminator_input for name, cls in TASKS.items()
    if _supports_uda(cls)}


def input_channels(task: str, task_channels: int) -> int:
    """Channels of the discriminator input of ``task`` whose head has ``task_channels``."""
    return TASKS[task].discriminator_channels or task_channels


def discriminator_key(task: str, scale: int) -> str:
    return f"{task}_s{int(scale)}"


def discriminator_keys(tasks: Sequence[str], scales: Sequence[int]) -> tuple[str, ...]:
    """``('<task>_s<k>', ...)`` in task order, scales in the given order."""
    return tuple(discriminator_key(t, s) for t in tasks for s in scales)


def discriminator_inputs(preds: Mapping[str, jax.Array], aux: Mapping[str, jax.Array],
                         tasks: Sequence[str], scales: Sequence[int]) -> dict[str, jax.Array]:
    """``{'<task>_s<k>': input}`` from the model's outputs: scale 0 is the prediction, scale
    k > 0 the side output ``'<task>/side/<k>'``."""
    out = {}
    for t in tasks:
        sides = side_outputs(aux, t)
        for s in scales:
            if int(s) == 0:
                raw = preds[t]
            elif str(s) in sides:
                raw = sides[str(s)]
            else:
                raise ValueError(f"the model has no side output {s} for task {t!r} (it has "
                                 f"{sorted(sides) or 'none'}); set config.uda.scales to "
                                 f"(0,) or to scales the model outputs")
            out[discriminator_key(t, s)] = DISCRIMINATOR_INPUTS[t](raw)
    return out
