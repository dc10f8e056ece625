"""Small building blocks shared by encoders, decoders and interaction modules.

Precision convention (DESIGN.md, "precision"): every module takes ``dtype`` (the computation
dtype of its convolutions, e.g. ``jnp.bfloat16``) and ``param_dtype`` (``jnp.float32``).
BatchNorm always normalises in float32; blocks cast their outputs back to ``dtype`` so
activations between layers stay in the computation dtype.

Convolutions use PyTorch-style symmetric padding (``dilation * (k - 1) // 2`` on every side)
rather than ``'SAME'``, so strided layers give the same output sizes and the same sampling
grid as the torchvision reference, and converted torchvision weights behave identically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# torchvision ResNet: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d kernel init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)

BN_MOMENTUM = 0.9  # flax convention: running = 0.9 * running + 0.1 * batch (torch momentum 0.1)
BN_EPSILON = 1e-5


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer = kaiming_normal_fan_out,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square ``nn.Conv`` with torch-style symmetric padding; bias (if any) starts at 0."""
    pad = dilation * (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def batch_norm(
    train: bool,
    *,
    scale_init: Initializer = nn.initializers.ones,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.BatchNorm:
    """BatchNorm computed in float32 (output float32); running stats live in ``batch_stats``.

    With ``train=True`` it normalises with the statistics of the (global) batch and updates the
    running averages, so ``batch_stats`` must be mutable; with ``train=False`` it reads them.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        scale_init=scale_init,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
    )


class ConvBNAct(nn.Module):
    """conv(k×k) → BatchNorm (float32) → activation; output cast to ``dtype``.

    Input ``[B, H, W, Cin]`` → output ``[B, H', W', features]`` with
    ``H' = (H - 1) // strides + 1`` (odd kernels, torch rule). ``act=None`` skips the activation.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    use_bias: bool = False
    act: Callable[[jax.Array], jax.Array] | None = nn.relu
    kernel_init: Initializer = kaiming_normal_fan_out
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
        y = conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            dilation=self.dilation,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x_BxHxWxC)
        y = batch_norm(train, param_dtype=self.param_dtype, name="bn")(y)
        if self.act is not None:
            y = self.act(y)
        return y.astype(self.dtype)


def resize_bilinear(x_BxHxWxC: jax.Array, size: Sequence[int], *,
                    align_corners: bool = False) -> jax.Array:
    """Bilinear resize of ``[B, H, W, C]`` to ``[B, size[0], size[1], C]``, same dtype.

    No antialiasing. ``align_corners=False`` (default): half-pixel centres, output pixel i
    samples the input at ``(i + 0.5) · n_in / n_out − 0.5`` (clamped to the edges), i.e.
    PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``. ``align_corners=True``:
    the corner pixels of input and output coincide, output pixel i samples the input at
    ``i · (n_in − 1) / (n_out − 1)`` (0 when ``n_out == 1``), i.e. PyTorch's
    ``align_corners=True`` (``nn.Upsample(scale_factor=2, mode='bilinear',
    align_corners=True)`` of the XTasC-Net and DenseMTL reference codes). Returns the input
    unchanged when the size already matches (both conventions are the identity then).
    """
    out_h, out_w = int(size[0]), int(size[1])
    _, h, w, _ = x_BxHxWxC.shape
    if (h, w) == (out_h, out_w):
        return x_BxHxWxC
    # Separable: two small interpolation matrices (built on the host) applied as matmuls.
    # Compiles and differentiates much faster than a gather-based resize, and runs on the
    # matrix units of accelerators.
    dtype = x_BxHxWxC.dtype
    m_h = jnp.asarray(interp_matrix(out_h, h, bool(align_corners)), dtype)
    m_w = jnp.asarray(interp_matrix(out_w, w, bool(align_corners)), dtype)
    y = jnp.einsum("Hh,bhwc->bHwc", m_h, x_BxHxWxC)
    return jnp.einsum("Ww,bHwc->bHWc", m_w, y)


@functools.lru_cache(maxsize=256)
def interp_matrix(n_out: int, n_in: int, align_corners: bool = False) -> np.ndarray:
    """``[n_out, n_in]`` float32 weights of 1-D linear interpolation (no antialiasing): row i
    mixes the two inputs around its source coordinate (see :func:`resize_bilinear` for the
    two conventions); each row sums to 1."""
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
    else:
        src = (i + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_nearest(x_BxHxWxC: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize to ``size`` (PyTorch ``mode='nearest'``: source index
    ``floor(i · in / out)``); exact ×k repetition when the sizes are multiples."""
    _, h, w, _ = x_BxHxWxC.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return x_BxHxWxC
    if out_h % h == 0 and out_w % w == 0 and out_h // h == out_w // w:
        factor = out_h // h
        return jnp.repeat(jnp.repeat(x_BxHxWxC, factor, axis=1), factor, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x_BxHxWxC[:, rows][:, :, cols]


def upsample_nearest(x_BxHxWxC: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour ×``factor`` upsampling: ``[B, H, W, C]`` → ``[B, fH, fW, C]``."""
    _, h, w, _ = x_BxHxWxC.shape
    return resize_nearest(x_BxHxWxC, (factor * h, factor * w))
