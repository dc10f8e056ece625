"""What the discriminators see: the model's outputs mapped to a domain-comparable form.

Per task (SPEC §4.4; DenseMTL): semseg -> weighted self-information ``-p·log2(p) / log2(C)``
per class channel (ADVENT); depth -> the prediction min-max normalised per image to [0, 1];
normals -> unit vectors; edges -> the edge probability. Every input is float32
``[B, H, W, C_task]`` at the output size (side outputs are already resized to it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.models.multitask import side_outputs

_EPS = 1e-8


def semseg_self_information(logits_BxHxWxC: jax.Array) -> jax.Array:
    """ADVENT's weighted self-information ``-p log2 p / log2 C`` per class channel ``[B,H,W,C]``
    (each value in [0, 1 / (e ln C)]; their sum over channels is the normalised entropy)."""
    logits = jnp.asarray(logits_BxHxWxC, jnp.float32)
    c = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -p * logp / jnp.log(float(c))  # log2 p / log2 C == ln p / ln C


def depth_min_max(pred_BxHxWx1: jax.Array) -> jax.Array:
    """The depth output min-max normalised per image (invariant to the output's scale)."""
    x = jnp.asarray(pred_BxHxWx1, jnp.float32)
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    return (x - lo) / jnp.maximum(hi - lo, _EPS)


def normals_unit(pred_BxHxWx3: jax.Array) -> jax.Array:
    """Normals output scaled to unit length per pixel."""
    x = jnp.asarray(pred_BxHxWx3, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def edge_probability(logits_BxHxWx2: jax.Array) -> jax.Array:
    """Probability of the edge class, ``[B, H, W, 1]``."""
    return jax.nn.softmax(jnp.asarray(logits_BxHxWx2, jnp.float32), axis=-1)[..., 1:2]


#: task name -> map from its raw output to the discriminator input.
DISCRIMINATOR_INPUTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "semseg": semseg_self_information,
    "depth": depth_min_max,
    "normals": normals_unit,
    "edges": edge_probability,
}


def input_channels(task: str, task_channels: int) -> int:
    """Channels of the discriminator input of ``task`` whose head has ``task_channels``."""
    return 1 if task == "edges" else task_channels


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
