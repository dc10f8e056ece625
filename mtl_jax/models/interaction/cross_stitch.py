"""MTAN's Cross-stitch SegNet baseline (Misra et al. 2016, as in Liu et al.'s code).

One SegNet-like network per task (blocks as the Dense baseline's, Xavier-uniform), whose
level-0 encoder blocks are :class:`~mtl_jax.models.encoders.segnet_dense.CrossStitchStem`.
Before encoder level i ≥ 1 and before every decoder level, a cross-stitch unit mixes the
tasks' maps: ``x = Σ_s α[level, s] · x_s`` -- one learned scalar per (level, source task),
initialised to 1, the *same* mixture fed to every task (as the reference code's
``cs_unit_encoder [4, T]`` and ``cs_unit_decoder [5, T]``). Each task unpools with its own
masks. Parameters: ``cs_unit_encoder``, ``cs_unit_decoder``, ``<task>_enc{i}`` (i ≥ 1),
``<task>_dec{k}``.

Interaction contract: ``([pooled_t, mask_t for t], train) -> ({task: [feature]}, {})``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.segnet import SEGNET_WIDTHS, ConvStack, stack_widths
from mtl_jax.models.initializers import Initializer, xavier_uniform
from mtl_jax.models.pooling import max_pool_with_mask, max_unpool

Dtype = Any


class CrossStitchNetworks(nn.Module):
    """Levels 1-4 of the task encoders and all decoder levels, with cross-stitch units."""

    tasks: Sequence[str]
    widths: Sequence[int] = SEGNET_WIDTHS
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool
                 ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array]]:
        tasks = tuple(self.tasks)
        n = len(tasks)
        w = [int(c) for c in self.widths]
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        alpha_enc = self.param("cs_unit_encoder", nn.initializers.ones, (4, n), self.param_dtype)
        alpha_dec = self.param("cs_unit_decoder", nn.initializers.ones, (5, n), self.param_dtype)

        def stitch(alpha_row: jax.Array, maps: Sequence[jax.Array]) -> jax.Array:
            return sum(alpha_row[s].astype(m.dtype) * m for s, m in enumerate(maps))

        xs = [features[2 * s] for s in range(n)]
        masks = [[features[2 * s + 1]] for s in range(n)]
        for i in range(1, 5):
            mixed = stitch(alpha_enc[i - 1], xs)
            new = []
            for s, t in enumerate(tasks):
                y = ConvStack(stack_widths(i, w[i], w[i]), name=f"{t}_enc{i}", **kw)(mixed, train)
                y, mask = max_pool_with_mask(y)
                masks[s].append(mask)
                new.append(y)
            xs = new
        for j, k in enumerate(range(4, -1, -1)):
            mixed = stitch(alpha_dec[j], xs)
            widths = (w[0], w[0]) if k == 0 else stack_widths(k, w[k - 1], w[k - 1])
            xs = [ConvStack(widths, name=f"{t}_dec{k}", **kw)(max_unpool(mixed, masks[s][k]),
                                                                 train)
                  for s, t in enumerate(tasks)]
        return {t: [x] for t, x in zip(tasks, xs, strict=True)}, {}
