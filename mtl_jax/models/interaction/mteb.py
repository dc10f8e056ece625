"""mTEB: DenseMTL's multi-task exchange block (docs/models/densemtl.md; the paper's §3.2.1).

For every ordered pair of distinct tasks (j → i) one :class:`~mtl_jax.models.interaction.xtam.
XTAM` gives the directional feature f_{j→i}; for each target task i the T − 1 directional
features are fused into its feature f_i:

* ``fusion='add'`` (the paper's eq. 5): f̃_i = f_i + F_i(concat_{j≠i} f_{j→i});
* ``fusion='prod'`` (Table 4a, ⊕ replaced by ⊙): f̃_i = f_i ⊙ F_i(concat_{j≠i} f_{j→i});
* ``fusion='concat'`` (Table 4a): f̃_i = F_i(concat(f_i, f_{j→i} for j≠i));

with F_i a bias-free 1×1 conv ((T − 1)·C → C, or T·C → C for ``concat``) + BN + ReLU. Works for
any number of tasks ≥ 2; every task's feature must have the same shape ``[B, H, W, C]``.

Parameters (``add``/``prod``), C = 128: 773,120 for S-D, 2,318,592 for S-D-N, 4,636,672 for
S-D-N-E; at a 256-channel stage S-D-N has 9,257,472. Submodules: ``<j>_to_<i>`` (xTAM) and
``fuse_<i>``.

The same call signature (``block(features: {task: x}, train) -> ({task: x}, aux)``) is shared
by every exchange module, e.g. :class:`~mtl_jax.models.interaction.padnet.PADNetDistillation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.interaction.xtam import XTAM
from mtl_jax.models.layers import ConvBNAct

Dtype = Any

FUSIONS = ("add", "prod", "concat")


class MTEB(nn.Module):
    """Multi-task exchange block over ``tasks`` (see the module docstring).

    Attributes:
      tasks: task names (≥ 2), the keys of the feature dict.
      downscale, attention, attention_impl, block_size: passed to every xTAM.
      fusion: ``'add'`` | ``'prod'`` | ``'concat'``.
    """

    tasks: Sequence[str]
    downscale: int = 4
    fusion: str = "add"
    attention: str = "spatial"
    attention_impl: str = "blocked"
    block_size: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], train: bool = False
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        tasks = tuple(self.tasks)
        if len(tasks) < 2:
            raise ValueError(f"an exchange block needs at least 2 tasks, got {tasks}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"mTEB fusion must be one of {FUSIONS}, got {self.fusion!r}")
        missing = [t for t in tasks if t not in features]
        if missing:
            raise ValueError(f"mTEB got no feature for task(s) {missing}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xtam_kw = dict(downscale=self.downscale, attention=self.attention,
                       attention_impl=self.attention_impl, block_size=self.block_size, **kw)
        out = {}
        for i in tasks:
            f_i = features[i].astype(self.dtype)
            messages = [XTAM(name=f"{j}_to_{i}", **xtam_kw)(f_i, features[j], train)
                        for j in tasks if j != i]
            if self.fusion == "concat":
                messages = [f_i, *messages]
            fused = ConvBNAct(f_i.shape[-1], kernel_size=1, name=f"fuse_{i}",
                              kernel_init=torch_default_kernel_init, **kw)(
                jnp.concatenate(messages, axis=-1), train)
            if self.fusion == "add":
                fused = f_i + fused
            elif self.fusion == "prod":
                fused = f_i * fused
            out[i] = fused.astype(self.dtype)
        return out, {}
