"""A task network of MTAN's "Dense" SegNet baseline (decoder contract).

Reads :class:`~mtl_jax.models.encoders.segnet_dense.DenseShared`'s
``[image, pooled_0..4, up_4..up_0]``. Encoder level 0 = ``enc0`` on the image; level i ≥ 1 =
``enc{i}`` on ``concat(own pooled_{i-1}, shared pooled_{i-1})``; own max-pool masks. Decoder
level k from 4 to 0: unpool the own map with the own mask of level k, ``dec{k}`` on
``concat(it, shared up_k)``. Then :class:`~mtl_jax.models.decoders.segnet.SegNetHead`
(``head``). Block widths as MTAN's ``model_segnet_dense.py``; Xavier-uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.decoders.segnet import SegNetHead
from mtl_jax.models.encoders.segnet import SEGNET_WIDTHS, ConvStack, stack_widths
from mtl_jax.models.initializers import Initializer, xavier_uniform
from mtl_jax.models.pooling import max_pool_with_mask, max_unpool

Dtype = Any


class DenseTaskNet(nn.Module):
    """One task's network + head: ``(features, output_size, train) -> (pred, {})``."""

    out_channels: int = 1
    widths: Sequence[int] = SEGNET_WIDTHS
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        image, pooled, ups = features[0], features[1:6], features[6:11]
        w = [int(c) for c in self.widths]
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x, masks = image, []
        for i in range(5):
            inp = x if i == 0 else jnp.concatenate([x, pooled[i - 1]], axis=-1)
            x = ConvStack(stack_widths(i, w[i], w[i]), name=f"enc{i}", **kw)(inp, train)
            x, mask = max_pool_with_mask(x)
            masks.append(mask)
        for j, k in enumerate(range(4, -1, -1)):
            x = max_unpool(x, masks[k])
            inp = jnp.concatenate([x, ups[j]], axis=-1)
            widths = ((2 * w[0], w[0]) if k == 0 else stack_widths(k, w[k - 1], w[k - 1]))
            x = ConvStack(widths, name=f"dec{k}", **kw)(inp, train)
        return SegNetHead(int(self.out_channels), name="head", **kw)([x], output_size, train)
