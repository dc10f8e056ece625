"""xTAM: the directional cross-task attention module of DenseMTL (docs/models/densemtl.md; the
paper's §3.1).

For an ordered task pair, source j → target i, at a decoder stage with C channels and downscale
factor s, ``XTAM()(f_i, f_j)`` returns the directional feature f_{j→i} ``[B, H, W, C]``:

* extractor: e = ReLU(conv3×3(f_j) + b)  (C → C, with bias);
* self-attention branch: self = conv3×3(e) ⊙ sigmoid(conv3×3(e))  (both C → C/2, bias-free);
* correlation-guided branch: Q = P_Q(↓s f_i) (nearest subsampling), K = P_K(maxpool_s(e)),
  V = P_V(maxpool_s(e)), each P a bias-free 1×1 conv C → C + BN + ReLU; then

  - ``attention='spatial'`` (the paper's): A = softmax over keys of Q·Kᵀ/√C (an
    ``[n, n]`` matrix for the n = (H/s)·(W/s) positions), corr = A·V;
  - ``attention='channel'`` (ours; the released code never defined it): channel attention over
    the C×C correlations, A_c = softmax over c' of (Qᵀ·K)[c, c']/√n and
    corr[p, c] = Σ_c' A_c[c, c']·V[p, c'] -- each output channel is a convex mix of the value
    channels, weighted by how the target's channel c correlates with the source's channel c'
    over all positions (the "channel attention module" of DANet, with Q/K from the two tasks);
  - ``attention='both'``: the two, each with its own per-channel weight (``alpha`` for the
    spatial one, ``alpha_channel`` for the channel one), summed;

  upsampled back to ``H × W`` (nearest) and multiplied by the per-channel weight α (shape
  ``[C]``, **initialised to 0**, so training starts from the self-attention branch alone);
* projection: f_{j→i} = ReLU(BN(conv1×1(concat(self, α·corr))))  (C/2 + C → C, bias-free).

The spatial attention is computed by :func:`mtl_jax.models.attention.attention`: with
``attention_impl='blocked'`` (default) in query × key blocks with an online softmax and
recomputation in the backward pass, so that memory grows linearly in the number of key blocks
instead of holding the ``[n, n]`` matrix; ``'naive'`` materialises it.

Parameters (C = 128): 369,920 per directional module: extractor 147,584, self branch 147,456,
Q/K/V 3 × 16,640, α 128, projection 24,832.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.attention import attention as dot_product_attention
from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.layers import (
    ConvBNAct,
    conv,
    max_pool,
    resize_nearest,
)

Dtype = Any

ATTENTIONS = ("spatial", "channel", "both")


def subsample_nearest(x_BxHxWxC: jax.Array, factor: int) -> jax.Array:
    """Nearest downsampling by ``factor`` to ``(H // factor, W // factor)`` (PyTorch
    ``interpolate(mode='nearest')``: row ``floor(i · H / h)``; ``x[:, ::s, ::s]`` when H, W are
    multiples of s)."""
    if factor == 1:
        return x_BxHxWxC
    _, h, w, _ = x_BxHxWxC.shape
    return resize_nearest(x_BxHxWxC, (h // factor, w // factor))


def channel_attention(q_BxNxC: jax.Array, k_BxNxC: jax.Array, v_BxNxC: jax.Array) -> jax.Array:
    """``corr[b, p, c] = Σ_c' softmax_c'((Qᵀ K)[c, c'] / √N) · V[b, p, c']`` (float32 softmax)."""
    n = q_BxNxC.shape[1]
    logits_BxCxC = jnp.einsum("bnc,bnd->bcd", q_BxNxC.astype(jnp.float32),
                              k_BxNxC.astype(jnp.float32)) / jnp.sqrt(jnp.float32(n))
    weights = jax.nn.softmax(logits_BxCxC, axis=-1).astype(v_BxNxC.dtype)
    return jnp.einsum("bcd,bnd->bnc", weights, v_BxNxC)


class XTAM(nn.Module):
    """One directional xTAM (source → target); see the module docstring.

    Call: ``XTAM()(target_BxHxWxC, source_BxHxWxC, train=False) -> [B, H, W, C]`` (``dtype``).
    C is read from the target; the source must have the same shape.

    Attributes:
      downscale: s, the subsampling factor of the correlation-guided branch.
      attention: ``'spatial'`` | ``'channel'`` | ``'both'``.
      attention_impl: ``'blocked'`` | ``'naive'`` (spatial attention only).
      block_size: query and key block length of the blocked attention.
    """

    downscale: int = 4
    attention: str = "spatial"
    attention_impl: str = "blocked"
    block_size: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, target_BxHxWxC: jax.Array, source_BxHxWxC: jax.Array,
                 train: bool = False) -> jax.Array:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"xTAM attention must be one of {ATTENTIONS}, got "
                             f"{self.attention!r}")
        if target_BxHxWxC.shape != source_BxHxWxC.shape:
            raise ValueError(f"xTAM needs target and source of the same shape, got "
                             f"{target_BxHxWxC.shape} and {source_BxHxWxC.shape}")
        b, h, w, c = target_BxHxWxC.shape
        s = int(self.downscale)
        if h // s < 1 or w // s < 1:
            raise ValueError(f"xTAM downscale {s} is too large for a {h}x{w} feature map")
        kw = dict(kernel_init=torch_default_kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        target = target_BxHxWxC.astype(self.dtype)
        source = source_BxHxWxC.astype(self.dtype)

        e = nn.relu(conv(c, 3, use_bias=True, name="extract", **kw)(source))
        feat = conv(c // 2, 3, name="self_feat", **kw)(e)
        mask = nn.sigmoid(conv(c // 2, 3, name="self_mask", **kw)(e).astype(jnp.float32))
        self_branch = (feat.astype(jnp.float32) * mask).astype(self.dtype)

        def project(name: str, x: jax.Array) -> jax.Array:
            return ConvBNAct(c, kernel_size=1, name=name, **kw)(x, train)

        pooled = e if s == 1 else max_pool(e, (s, s), (s, s))  # floor mode
        q = project("query", subsample_nearest(target, s))
        k = project("key", pooled)
        v = project("value", pooled)
        hs, ws = q.shape[1:3]
        # Kept only when "intermediates" is mutable (models/inspection.py, the notebooks).
        self.sow("intermediates", "attention_query", q)
        self.sow("intermediates", "attention_key", k)
        q, k, v = (x.reshape(b, hs * ws, c) for x in (q, k, v))

        corr = jnp.zeros((b, hs * ws, c), jnp.float32)
        if self.attention in ("spatial", "both"):
            spatial = dot_product_attention(q, k, v, scale=1.0 / float(c) ** 0.5,
                                            impl=self.attention_impl,
                                            block_q=self.block_size, block_k=self.block_size)
            alpha = self.param("alpha", nn.initializers.zeros, (c,), self.param_dtype)
            corr = corr + alpha * spatial.astype(jnp.float32)
        if self.attention in ("channel", "both"):
            name = "alpha" if self.attention == "channel" else "alpha_channel"
            alpha_c = self.param(name, nn.initializers.zeros, (c,), self.param_dtype)
            corr = corr + alpha_c * channel_attention(q, k, v).astype(jnp.float32)
        corr = resize_nearest(corr.reshape(b, hs, ws, c).astype(self.dtype), (h, w))
        return project("project", jnp.concatenate([self_branch, corr], axis=-1))
