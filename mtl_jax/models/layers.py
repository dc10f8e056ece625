"""The building blocks models are made of: convolution, max-pool, residual ``relu(a + b)``,
BatchNorm (float32, PyTorch's conventions), conv + BN + activation, resizes, initialisers.

Models build their layers from here, never from Flax's own convolution, max-pool or
BatchNorm (guard tests): :func:`conv`, :func:`max_pool`, :func:`add_relu` and
:class:`BatchNorm` route through :mod:`mtl_jax.models.cpu_grads`, the faster CPU gradients
(a table there says which op, on which backend, how to switch each off).

Precision convention: every module takes ``dtype`` (the computation dtype of its
convolutions, e.g. ``jnp.bfloat16``) and ``param_dtype`` (``jnp.float32``). BatchNorm always
normalises in float32; blocks cast their outputs back to ``dtype`` so activations between
layers stay in the computation dtype.

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

from mtl_jax.models import cpu_grads
from mtl_jax.models.initializers import Initializer, kaiming_normal_fan_out

Dtype = Any

BN_MOMENTUM = 0.9  # flax convention: running = 0.9 * running + 0.1 * batch (torch momentum 0.1)
BN_EPSILON = 1e-5


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    dilation: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
    kernel_init: Initializer = kaiming_normal_fan_out,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square ``nn.Conv`` with torch-style symmetric padding (``padding`` on every side,
    default ``dilation * (kernel_size - 1) // 2``; ``0`` for a valid convolution); bias (if
    any) starts at 0. Its gradients go through :func:`cpu_grads.conv_general_dilated`."""
    pad = dilation * (kernel_size - 1) // 2 if padding is None else int(padding)
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
        conv_general_dilated=cpu_grads.conv_general_dilated,
        name=name,
    )


def max_pool(x_BxHxWxC: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
    """The one max-pool of the models: NHWC, explicit ``-inf`` padding, floor mode (PyTorch's
    ``MaxPool2d`` with ``ceil_mode=False``; ``flax.linen.max_pool``'s values). Its gradient
    goes to the **first** maximum of each window in row-major order (PyTorch's rule and XLA's
    select-and-scatter's; a NaN counts as the maximum), by :func:`cpu_grads.max_pool` on CPU.
    SegNet's pooling that keeps the argmax for unpooling is ``pooling.max_pool_with_mask``
    (same values and tie rule)."""
    return cpu_grads.max_pool(x_BxHxWxC, tuple(int(v) for v in window),
                              tuple(int(v) for v in strides),
                              tuple((int(lo), int(hi)) for lo, hi in padding))


def add_relu(a: jax.Array, b: jax.Array) -> jax.Array:
    """``relu(a + b)`` for two arrays of one shape and dtype (a residual block's output), bit
    for bit, with relu's gradient (0 at 0); written so that XLA's CPU fusion materialises it
    once (:func:`cpu_grads.add_relu`)."""
    return cpu_grads.add_relu(a, b)


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, computed in float32 (output float32; a float64
    input stays float64, for gradient checks under ``jax.enable_x64``).

    Variables (the names of ``flax.linen.BatchNorm``, so checkpoints and weight converters see
    the same tree): ``params`` ``scale``, ``bias`` ``[C]``; ``batch_stats`` ``mean``, ``var``
    ``[C]`` (running averages, initialised to 0 and 1).

    ``train=True``: normalises with the batch mean and the *biased* batch variance (as PyTorch
    and Flax both do) and updates the running averages ``r = momentum * r + (1 - momentum) *
    batch`` (not during ``init``). The batch statistics are those of the array the module sees,
    i.e. of the **global** batch under ``jit`` with a sharded batch. ``train=False``:
    normalises with the running averages.

    Running-variance update (``unbiased_running_var``):
      ``True`` (default): PyTorch's -- the batch variance times ``n / (n - 1)``, ``n`` = the
        number of values per channel (batch × pixels); with ``n == 1`` the factor is 1.
      ``False``: Flax's -- the biased batch variance. With few positions per channel (a
        ResNet's last stage at 128×256 input has 32 per image) the two running variances differ
        by several per cent, so a model trained by the PyTorch reference evaluates differently.

    Batch variance formula (``use_fast_variance``):
      ``False`` (default): two passes, ``mean((x - mean(x))**2)``.
      ``True``: Flax's default one-pass ``mean(x**2) - mean(x)**2`` (clamped at 0). In float32
        it loses the variance to cancellation when the mean is large against the spread
        (measured on 2,048 values per channel against float64, tests/test_fidelity_layers.py:
        mean 10 / std 0.1 gives a 0.16 % variance error one-pass, mean 100 / std 0.1 5.9 %;
        two-pass stays under 1e-7 in both), so it is off. The second pass is one more fused
        reduction over the activation.

    The training-mode gradient is the closed form of :func:`cpu_grads.batch_norm_train` on
    every backend (JAX's derivative with ``MTL_JAX_CPU_KERNELS=off``).
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    unbiased_running_var: bool = True
    use_fast_variance: bool = False
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # float32 for float32 and narrower inputs; a float64 model (gradient checks under
        # ``jax.enable_x64``) stays float64 throughout.
        dt = jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
        x = jnp.asarray(x, dt)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), dt))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), dt))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        if train:
            y, mean, var = cpu_grads.batch_norm_train(
                x, jnp.asarray(scale, dt), jnp.asarray(bias, dt), self.epsilon,
                self.use_fast_variance)
            if not self.is_initializing():
                n = int(np.prod(x.shape[:-1]))
                running_var = var * (n / (n - 1)) if self.unbiased_running_var and n > 1 else var
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * running_var
            return y
        inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * jnp.asarray(scale, dt)
        return (x - ra_mean.value) * inv + jnp.asarray(bias, dt)


def batch_norm(
    train: bool,
    *,
    scale_init: Initializer = nn.initializers.ones,
    param_dtype: Dtype = jnp.float32,
    unbiased_running_var: bool = True,
    name: str | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """The shared :class:`BatchNorm` (float32, PyTorch's running-variance update by default)
    bound to ``train``: returns ``f(x) -> normalised x``; running stats live in
    ``batch_stats``.

    With ``train=True`` it normalises with the statistics of the (global) batch and updates the
    running averages, so ``batch_stats`` must be mutable; with ``train=False`` it reads them.
    """
    module = BatchNorm(scale_init=scale_init, param_dtype=param_dtype,
                       unbiased_running_var=unbiased_running_var, name=name)
    return functools.partial(module, train=train)


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
