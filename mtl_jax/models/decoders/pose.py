"""Monodepth2's pose decoder: relative camera motion from the encoder's deepest feature.

Layout (nianticlabs/monodepth2 ``networks/pose_decoder.py``, as DenseMTL's ``PoseNetwork``
builds it with ``num_input_features=1``): ``squeeze`` 1×1 conv C → 256 + ReLU, ``pose_0`` 3×3
conv 256 → 256 + ReLU, ``pose_1`` 3×3 conv 256 → 256 + ReLU, ``pose_2`` 1×1 conv 256 →
6·``num_frames`` (every conv with bias, padding 1 on the 3×3 ones), the spatial mean, times
0.01, reshaped to ``[B, num_frames, 6]``: axis-angle = ``[..., :3]``, translation = ``[..., 3:]``.
The reference predicts ``num_frames_to_predict_for=2`` motions per pair and uses the first one
only; the second one's weights exist (and count) but never receive a gradient.

Parameter names: ``squeeze``, ``pose_0``, ``pose_1``, ``pose_2`` (the reference's state_dict
``net.0`` .. ``net.3``). Initialisation: PyTorch's default conv kernel init (the reference
keeps it), biases 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.layers import conv

Dtype = Any

#: Monodepth2's scale of the raw pose output (small initial motions).
POSE_SCALE = 0.01


class PoseDecoder(nn.Module):
    """``[B, h, w, C]`` feature → (axis-angle ``[B, num_frames, 3]``, translation
    ``[B, num_frames, 3]``), float32 (see the module docstring).

    Attributes:
      num_frames: motions predicted per input (the reference's ``num_frames_to_predict_for``,
        2 in DenseMTL's pose network).
      features: channels of the hidden convs (256 in the reference).
    """

    num_frames: int = 2
    features: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature_BxhxwxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        kw = dict(use_bias=True, kernel_init=torch_default_kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = nn.relu(conv(self.features, 1, name="squeeze", **kw)(feature_BxhxwxC))
        x = nn.relu(conv(self.features, 3, name="pose_0", **kw)(x))
        x = nn.relu(conv(self.features, 3, name="pose_1", **kw)(x))
        x = conv(6 * self.num_frames, 1, name="pose_2", **kw)(x)
        out = POSE_SCALE * jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = out.reshape(out.shape[0], self.num_frames, 6)
        return out[..., :3], out[..., 3:]
