"""Look inside a trained model: DenseMTL xTAM attention maps (for notebooks and figures).

``xtam_attention(model, variables, image)`` runs the model once and returns, for every xTAM
of the spatial kind, the softmax attention of its correlation-guided branch,
``A = softmax_keys(Q Kᵀ / √C)``, as ``[B, h, w, h, w]`` (query position, key position) at
the module's subsampled resolution ``h × w``. ``query_attention`` picks the map of one query
given as a pixel of the input image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp


def xtam_attention(model: Any, variables: Mapping[str, Any], image_BxHxWx3: jax.Array
                   ) -> dict[str, jax.Array]:
    """``{'<module path>': probabilities [B, h, w, h, w]}`` for every spatial xTAM, keyed by
    its parameter path (e.g. ``'exchange_stage1/depth_to_semseg'``); empty when the
    model has none. The xTAM named ``<source>_to_<target>`` attends from the target task's
    positions (queries) to the source task's (keys)."""
    _, state = model.apply(dict(variables), image_BxHxWx3, train=False,
                           mutable=["intermediates"])
    flat = flax.traverse_util.flatten_dict(state.get("intermediates", {}), sep="/")
    out = {}
    for path, value in sorted(flat.items()):
        if not path.endswith("/attention_query"):
            continue
        prefix = path[: -len("/attention_query")]
        q_BxhxwxC, k_BxhxwxC = value[0], flat[prefix + "/attention_key"][0]
        b, h, w, c = q_BxhxwxC.shape
        q = q_BxhxwxC.reshape(b, h * w, c).astype(jnp.float32)
        k = k_BxhxwxC.reshape(b, h * w, c).astype(jnp.float32)
        probs = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", q, k) / jnp.sqrt(float(c)), axis=-1)
        out[prefix] = probs.reshape(b, h, w, h, w)
    return out


def query_attention(probs_BxhxwxHxW: jax.Array, query_yx: Sequence[int],
                    image_hw: Sequence[int]) -> jax.Array:
    """Attention ``[B, h, w]`` (sums to 1) of the query at input pixel ``(y, x)`` of an image
    of size ``image_hw``, mapped to the module's grid by ``floor(y · h / H)``."""
    _, h, w = probs_BxhxwxHxW.shape[:3]
    y = min(h - 1, int(query_yx[0]) * h // int(image_hw[0]))
    x = min(w - 1, int(query_yx[1]) * w // int(image_hw[1]))
    return probs_BxhxwxHxW[:, y, x]
