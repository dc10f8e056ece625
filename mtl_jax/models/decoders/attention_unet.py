"""AdaMT-Net's task decoder: a U-Net decoder with a soft-attention mask in every block
(Jha et al., CVPR-W 2020, §3.1 "Attention learning framework"; docs/models/adamt.md).

Symmetric to the encoder (:mod:`~mtl_jax.models.encoders.dense_unet`). From the deepest
block to the finest, block ``l``:

1. up-samples its input ×2 to the size of encoder bridge ``l`` (``upsample='bilinear'``:
   half-pixel bilinear, PyTorch ``align_corners=False``, no parameters; ``'transpose'``: a
   learnt 2×2 stride-2 transposed conv to the block's width, U-Net's "up-conv"), then
   concatenates the bridge;
2. ``M¹ = conv3×3 + BN + ReLU`` and ``M² = conv3×3 + BN + ReLU`` of M¹, both at the block's
   width ``C_l`` (the bridge's channels unless ``widths`` is given);
3. with ``attention=True``: the mask ``A = σ(BN(conv3×3(σ(BN(conv3×3(M¹))))))`` -- two conv3×3
   each followed by BN and a sigmoid, as the paper writes it, ``C_l`` channels, values in
   [0, 1] -- and the block's output ``concat(M², A ⊙ M²)`` (``2·C_l`` channels); without
   attention the output is ``M²`` (the paper's "dense encoder without decoder attention"
   ablation).

A 1×1 conv with bias maps the last block's output to ``out_channels``; the prediction is
resized to ``output_size`` (the identity when the first bridge is at the input size, as with
the dense encoder).

Aux: ``'attention/block{l}'`` = A of block ``l`` (float32 ``[B, h_l, w_l, C_l]`` in [0, 1]),
which the model namespaces as ``'<task>/attention/block{l}'`` and ``predict_step`` draws.

Parameters: ``block{l}_up`` (transpose only), ``block{l}_m1``, ``block{l}_m2``,
``block{l}_att1``, ``block{l}_att2`` (each ``{conv, bn}``; l = 1 the deepest) and ``head``.
Convs before a BN are bias-free; Kaiming-normal (fan-out) initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.layers import ConvBNAct, conv, resize_bilinear

Dtype = Any

UPSAMPLES = ("bilinear", "transpose")


class AttentionUNetDecoder(nn.Module):
    """One task's attention U-Net decoder (module docstring) over ``features = [bridge_1
    (finest), ..., bridge_L, bottleneck]``; returns ``(pred [B, H, W, out_channels] float32,
    {'attention/block{l}': mask})``."""

    widths: Sequence[int] | None = None
    attention: bool = True
    upsample: str = "bilinear"
    out_channels: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"AttentionUNetDecoder: upsample must be one of {UPSAMPLES}, got "
                             f"{self.upsample!r}")
        *bridges, x = features
        bridges = bridges[::-1]  # deepest first
        if self.widths is not None and len(self.widths) != len(bridges):
            raise ValueError(f"AttentionUNetDecoder: {len(self.widths)} widths for "
                             f"{len(bridges)} bridges")
        prec = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        aux: dict[str, jax.Array] = {}
        x = x.astype(self.dtype)
        for index, bridge in enumerate(bridges):
            name = f"block{index + 1}"
            width = int(self.widths[index]) if self.widths is not None else bridge.shape[-1]
            size = bridge.shape[1:3]
            if self.upsample == "transpose":
                x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), padding="VALID",
                                     name=f"{name}_up", **prec)(x)
            x_BxhxwxC = resize_bilinear(x, size)  # exact ×2 or odd-size fix-up (identity)
            x = jnp.concatenate([x_BxhxwxC, bridge.astype(self.dtype)], axis=-1)
            m1 = ConvBNAct(width, 3, name=f"{name}_m1", **prec)(x, train)
            m2 = ConvBNAct(width, 3, name=f"{name}_m2", **prec)(m1, train)
            if self.attention:
                a = ConvBNAct(width, 3, act=nn.sigmoid, name=f"{name}_att1", **prec)(m1, train)
                a = ConvBNAct(width, 3, act=nn.sigmoid, name=f"{name}_att2", **prec)(a, train)
                aux[f"attention/{name}"] = a.astype(jnp.float32)
                x = jnp.concatenate([m2, a * m2], axis=-1)
            else:
                x = m2
        logits = conv(self.out_channels, 1, use_bias=True, name="head", **prec)(x)
        return resize_bilinear(logits.astype(jnp.float32), output_size), aux
