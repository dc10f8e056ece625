"""ATI-Net's latent distillation on SegNet's bottleneck (docs/models/segnet.md).

On the pooled 512-channel bottleneck ``z``: per task a "deconv" head ``<task>_deconv{0,1,2}``
of three 1×1 conv (bias) + BN + ReLU (512 → 256 → 128 → 64) giving initial-prediction
features; PAD-Net multi-modal distillation between them at 64 channels
(:class:`~mtl_jax.models.interaction.padnet.PADNetDistillation`, 3×3 convs with bias,
``distillation``); per task a re-encoder ``<task>_reencode{0,1,2}`` (1×1 conv + BN + ReLU,
64 → 128 → 256 → 512). The output is the **mean of the re-encoded maps**, which replaces ``z``
as the decoder's input -- the paper's design. (The authors' released ``atinet.py`` computes
this mean and then unpools the original ``z``, i.e. discards it; we do not copy that.)
Widths scale with the SegNet widths ``w``: 512/256/128/64 = w4/w2/w1/w0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.segnet import SEGNET_WIDTHS
from mtl_jax.models.initializers import Initializer, xavier_normal
from mtl_jax.models.interaction.padnet import PADNetDistillation
from mtl_jax.models.layers import ConvBNAct

Dtype = Any


class LatentDistillation(nn.Module):
    """``z [B, h, w, widths[4]]`` → mean of the tasks' re-encoded distilled features, same
    shape (module docstring). Needs at least two tasks."""

    tasks: Sequence[str]
    widths: Sequence[int] = SEGNET_WIDTHS
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        w = [int(c) for c in self.widths]
        kw = dict(use_bias=True, kernel_init=self.kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        feats = {}
        for t in self.tasks:
            x = z
            for n, c in enumerate((w[2], w[1], w[0])):
                x = ConvBNAct(c, 1, name=f"{t}_deconv{n}", **kw)(x, train)
            feats[t] = x
        distilled, _ = PADNetDistillation(tuple(self.tasks), use_bias=True,
                                          kernel_init=self.kernel_init, dtype=self.dtype,
                                          param_dtype=self.param_dtype,
                                          name="distillation")(feats, train)
        encoded = []
        for t in self.tasks:
            x = distilled[t]
            for n, c in enumerate((w[1], w[2], w[4])):
                x = ConvBNAct(c, 1, name=f"{t}_reencode{n}", **kw)(x, train)
            encoded.append(x.astype(jnp.float32))
        return (sum(encoded) / len(encoded)).astype(self.dtype)
