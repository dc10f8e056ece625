"""SegNet (VGG-16 widths 64-128-256-512-512) as MTAN's code builds it.

Level ``i`` of the encoder = ``enc_block{i}`` (conv3×3 + BN + ReLU to ``widths[i]``, its output
``u_i`` is the "first conv" feature MTAN's attention reads) then ``enc_conv{i}_{k}`` (one more
such layer at levels 0-1, two at levels 2-4; output ``p_i``), then 2×2 max-pooling that keeps
the window mask (:mod:`~mtl_jax.models.pooling`). The decoder mirrors it from the deepest level
``k = 4`` to ``k = 0``: max-unpooling with level ``k``'s mask (output ``up_k``), ``dec_block{k}``
(to ``widths[k-1]``, ``widths[0]`` at ``k = 0``) and ``dec_conv{k}_{m}`` (one layer at ``k < 2``,
two above; output ``d_k``). Every "layer" is :class:`ConvLayer`: ``repeats`` ×
(conv3×3 with bias + BN + ReLU) -- 1 for SegNet, 2 for the "deep" Split baseline.

Initialisation as MTAN's code: Xavier-normal conv kernels (PyTorch's ``xavier_normal_``:
untruncated normal, variance 2 / (fan_in + fan_out) with the receptive field counted), zero
biases, BN scale 1 / bias 0. (Dense and Cross-stitch use Xavier-uniform.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.initializers import Initializer, xavier_normal, xavier_uniform
from mtl_jax.models.layers import ConvBNAct
from mtl_jax.models.pooling import max_pool_with_mask, max_unpool

Dtype = Any

SEGNET_WIDTHS = (64, 128, 256, 512, 512)
WIDE_WIDTHS = (64, 128, 256, 512, 1024)


class SegNetMaps(NamedTuple):
    """The 20 maps of ``SegNet(outputs='all')`` by name (the encoder returns them as one list,
    :meth:`as_list`; MTAN's attention reads them back with :meth:`from_list`)."""

    first: list[jax.Array]  #: ``u_0..u_4``: each encoder level's first layer (``enc_block{i}``)
    encoded: list[jax.Array]  #: ``p_0..p_4``: each encoder level's output, before pooling
    unpooled: list[jax.Array]  #: ``up_4..up_0``: each decoder level's unpooled input
    decoded: list[jax.Array]  #: ``d_4..d_0``: each decoder level's output

    def as_list(self) -> list[jax.Array]:
        return [*self.first, *self.encoded, *self.unpooled, *self.decoded]

    @classmethod
    def from_list(cls, features: Sequence[jax.Array]) -> SegNetMaps:
        if len(features) != 20:
            raise ValueError(f"SegNet(outputs='all') gives 20 maps, got {len(features)}")
        f = list(features)
        return cls(f[0:5], f[5:10], f[10:15], f[15:20])


class SegNetEncoded(NamedTuple):
    """The output of ``SegNet(outputs='encoder')`` by name (as one list: :meth:`as_list`)."""

    pooled: jax.Array  #: the pooled bottleneck ``[B, H/32, W/32, widths[4]]``
    masks: list[jax.Array]  #: the max-pool window masks of levels 0..4

    def as_list(self) -> list[jax.Array]:
        return [self.pooled, *self.masks]

    @classmethod
    def from_list(cls, features: Sequence[jax.Array]) -> SegNetEncoded:
        if len(features) != 6:
            raise ValueError(f"SegNet(outputs='encoder') gives 6 maps, got {len(features)}")
        return cls(features[0], list(features[1:6]))


def scaled_widths(widths: Sequence[int], width: int) -> tuple[int, ...]:
    """``widths`` scaled so that the first is ``width`` (tiny models for tests: width=4)."""
    return tuple(max(1, int(w) * int(width) // int(widths[0])) for w in widths)


class ConvLayer(nn.Module):
    """``repeats`` × (conv3×3 with bias → BN → ReLU) to ``features`` channels (``cba{r}``)."""

    features: int
    repeats: int = 1
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for r in range(self.repeats):
            x = ConvBNAct(self.features, 3, use_bias=True, kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"cba{r}")(
                              x, train)
        return x


def enc_convs(level: int) -> int:
    """Extra layers after ``enc_block{level}`` (1 at levels 0-1, 2 at 2-4); same for dec."""
    return 1 if level < 2 else 2


class SegNet(nn.Module):
    """The SegNet backbone (module docstring); standardised image ``[B, H, W, 3]`` in.

    ``outputs``:
      * ``'final'``: ``[d_0]``, the last decoder feature ``[B, H, W, widths[0]]`` (STL/Split);
      * ``'all'``: the 20 maps MTAN's attention reads, :class:`SegNetMaps` as a list;
      * ``'encoder'``: no decoder; :class:`SegNetEncoded` as a list (PAD-Net).

    ``latent``: an optional module applied to the pooled bottleneck before the decoder (ATI-Net's
    latent distillation, parameters ``latent``), used only when ``use_latent`` is True.
    H and W must be divisible by 32 (``UserError`` otherwise).
    """

    widths: Sequence[int] = SEGNET_WIDTHS
    repeats: int = 1
    outputs: str = "final"
    latent: nn.Module | None = None
    use_latent: bool = True
    kernel_init: Initializer = xavier_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> list[int]:
        return [int(self.widths[0])]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        if self.outputs not in ("final", "all", "encoder"):
            raise ValueError(f"SegNet.outputs must be final|all|encoder, got {self.outputs!r}")
        w = [int(c) for c in self.widths]
        kw = dict(repeats=self.repeats, kernel_init=self.kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        us, ps, masks = [], [], []
        for i in range(5):
            x = ConvLayer(w[i], name=f"enc_block{i}", **kw)(x, train)
            us.append(x)
            for k in range(enc_convs(i)):
                x = ConvLayer(w[i], name=f"enc_conv{i}_{k}", **kw)(x, train)
            ps.append(x)
            x, mask = max_pool_with_mask(x)
            masks.append(mask)
        if self.outputs == "encoder":
            return SegNetEncoded(x, masks).as_list()
        if self.latent is not None and self.use_latent:
            x = self.latent(x, train=train).astype(x.dtype)
        ups, ds = segnet_decoder_levels(x, masks, w, train, **kw)
        if self.outputs == "final":
            return [ds[-1]]
        return SegNetMaps(us, ps, ups, ds).as_list()


def segnet_decoder_levels(x: jax.Array, masks: Sequence[jax.Array], widths: Sequence[int],
                          train: bool, **layer_kw: Any) -> tuple[list[jax.Array], list[jax.Array]]:
    """SegNet's decoder from the pooled bottleneck ``x`` (call inside a compact module: it
    creates ``dec_block{k}`` and ``dec_conv{k}_{m}`` there). Returns ``(ups, ds)`` in decoding
    order (level 4 first): the unpooled inputs and the level outputs."""
    w = [int(c) for c in widths]
    ups, ds = [], []
    for k in range(4, -1, -1):
        x = max_unpool(x, masks[k])
        ups.append(x)
        out = w[k - 1] if k > 0 else w[0]
        x = ConvLayer(out, name=f"dec_block{k}", **layer_kw)(x, train)
        for m in range(enc_convs(k)):
            x = ConvLayer(out, name=f"dec_conv{k}_{m}", **layer_kw)(x, train)
        ds.append(x)
    return ups, ds


class ConvStack(nn.Module):
    """conv3×3 (bias) + BN + ReLU to each of ``features`` in turn (``cba{r}``): the blocks of
    MTAN's Dense and Cross-stitch baselines (2 or 3 layers)."""

    features: Sequence[int]
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for r, f in enumerate(self.features):
            x = ConvBNAct(int(f), 3, use_bias=True, kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"cba{r}")(
                              x, train)
        return x


def stack_widths(level: int, mid: int, out: int) -> tuple[int, ...]:
    """Dense/Cross-stitch block widths: ``(mid, out)`` at levels 0-1, ``(mid, mid, out)``
    above (MTAN's ``bottle_neck=True`` / ``False`` blocks)."""
    return (mid, out) if level < 2 else (mid, mid, out)

