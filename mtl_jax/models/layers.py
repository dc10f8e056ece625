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

import contextlib
import contextvars
import functools
import os
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

_NHWC = ("NHWC", "HWIO", "NHWC")


def taps_pay_off(kernel_shape: Sequence[int], positions: int | None = None) -> bool:
    """Whether the kernel gradient by taps beats XLA's on the CPU backend for this HWIO kernel
    (``positions``: batch × output rows × columns, if known).

    Measured (``benchmarks/conv_grad.py --sweep``, docs/benchmarks.md "Train-step speed on
    CPU"; batch × size from 2×56×72 to 16×96×128): every 1×1 kernel (3-30× faster); larger
    kernels with at least 64 output channels and no more inputs than outputs, or with at least
    128 output channels (1.4-6× faster). On maps large enough to be taken in row chunks
    (:func:`taps_chunk_rows`) also kernels with 32-63 outputs (16×48×64, 48 → 32: XLA's 39 ms,
    by chunked taps 16 ms). With 16 outputs XLA's own stays faster.
    """
    kh, kw, c_in, c_out = kernel_shape
    if kh == kw == 1:
        return True
    if positions is not None and positions > TAPS_CHUNK_MIN_POSITIONS and c_out >= 32:
        return True
    return c_out >= 128 or (c_out >= 64 and c_in <= c_out)


_TAPS_ENABLED = contextvars.ContextVar("mtl_jax_conv_taps", default=True)
# ``MTL_JAX_CPU_CONV_GRAD=xla`` switches the kernel gradient by taps off for a whole process
# (read when a model is traced), e.g. to compare: ``benchmarks/step_time.py --conv_grad xla``.
CONV_GRAD_ENV = "MTL_JAX_CPU_CONV_GRAD"


def taps_enabled() -> bool:
    """Whether :func:`conv_general_dilated` may take the kernel gradient by taps (on CPU)."""
    mode = os.environ.get(CONV_GRAD_ENV, "taps").strip().lower()
    if mode not in ("taps", "xla"):
        raise ValueError(f"{CONV_GRAD_ENV}={mode!r}: use 'taps' (default) or 'xla'")
    return _TAPS_ENABLED.get() and mode == "taps"


@contextlib.contextmanager
def xla_conv_gradients():
    """Within this context, convolutions traced by :func:`conv_general_dilated` keep XLA's own
    gradients on every backend (to measure the difference; benchmarks/conv_grad.py). The
    environment variable ``MTL_JAX_CPU_CONV_GRAD=xla`` does the same for a whole process."""
    token = _TAPS_ENABLED.set(False)
    try:
        yield
    finally:
        _TAPS_ENABLED.reset(token)


def _accumulator(dtype) -> Any:
    """The accumulation dtype of the CPU gradient products: float32, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _conv_nhwc(x, k, strides, padding, dilation):
    return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=_NHWC)


def kernel_grad_by_taps(x_BxHxWxI: jax.Array, g_BxOHxOWxO: jax.Array,
                        kernel_shape: Sequence[int], strides: Sequence[int],
                        padding: Sequence[tuple[int, int]],
                        dilation: Sequence[int], chunk_rows: int | None = None) -> jax.Array:
    """The kernel gradient of an NHWC/HWIO convolution as one matrix product per kernel tap:

        dk[a, b, i, o] = Σ_{n,y,x} x_pad[n, y·s₀ + a·d₀, x·s₁ + b·d₁, i] · g[n, y, x, o]

    (``x_pad``: ``x`` zero-padded by ``padding``; ``s``: strides; ``d``: kernel dilation). The
    same sums as XLA's kernel-gradient convolution, which XLA's CPU backend runs as a
    convolution whose window is the whole output map: 3-20× slower than the forward pass
    (benchmarks/conv_grad.py). Accumulates in float32 (float64 for float64 inputs); returns
    the dtype of ``x``.

    XLA's CPU matrix product (YNNPACK) wants its left operand with the contracted axis minor,
    so it copies that operand transposed; the right one it reads as it is. For a 1×1 kernel the
    smaller of ``x`` (``I`` channels) and ``g`` (``O`` channels) goes left; for larger kernels
    ``g`` goes left (one transposed copy shared by all taps) and the taps right, so each tap is
    a plain slice (at 2×224×288×64 this is 1.4× faster than transposing every tap).

    Large maps are taken in chunks of ``chunk_rows`` output rows (default
    :func:`taps_chunk_rows`) in a ``fori_loop`` that sums the chunks' kernel gradients, so each
    chunk's slices are read back from the cache. Strided stem kernels take
    :func:`kernel_grad_space_to_depth`.
    """
    kh, kw, _, _ = kernel_shape
    if space_to_depth_pays_off(kernel_shape, strides, dilation):
        return kernel_grad_space_to_depth(x_BxHxWxI, g_BxOHxOWxO, kernel_shape, strides,
                                          padding)
    (plh, phh), (plw, phw) = padding
    b, ho, wo, c_out = g_BxOHxOWxO.shape
    c_in = x_BxHxWxI.shape[-1]
    rows = chunk_rows if chunk_rows is not None else taps_chunk_rows(b, ho, wo)
    if rows >= ho:  # one chunk: the whole map
        x_pad = jnp.pad(x_BxHxWxI, ((0, 0), (plh, phh), (plw, phw), (0, 0)))
        dk = _tap_products(x_pad, g_BxOHxOWxO, kernel_shape, strides, dilation)
        return dk.astype(x_BxHxWxI.dtype)
    # Row chunks: output rows [r·R, (r + 1)·R) read input rows [r·R·s₀, r·R·s₀ + span); the
    # last chunk is completed by zero rows of g (which add nothing).
    n_chunks = -(-ho // rows)
    span = (rows - 1) * strides[0] + (kh - 1) * dilation[0] + 1
    h_pad = x_BxHxWxI.shape[1] + plh + phh
    extra = max(0, (n_chunks - 1) * rows * strides[0] + span - h_pad)
    x_pad = jnp.pad(x_BxHxWxI, ((0, 0), (plh, phh + extra), (plw, phw), (0, 0)))
    g = jnp.pad(g_BxOHxOWxO, ((0, 0), (0, n_chunks * rows - ho), (0, 0), (0, 0)))
    w_pad = x_pad.shape[2]

    def chunk(r, acc):
        x_r = jax.lax.dynamic_slice(x_pad, (0, r * rows * strides[0], 0, 0),
                                    (b, span, w_pad, c_in))
        g_r = jax.lax.dynamic_slice(g, (0, r * rows, 0, 0), (b, rows, wo, c_out))
        return acc + _tap_products(x_r, g_r, kernel_shape, strides, dilation)

    dk = jax.lax.fori_loop(0, n_chunks, chunk,
                           jnp.zeros(tuple(kernel_shape), _accumulator(x_BxHxWxI.dtype)))
    return dk.astype(x_BxHxWxI.dtype)


def taps_chunk_rows(b: int, ho: int, wo: int) -> int:
    """Output rows per chunk of :func:`kernel_grad_by_taps`: about ``TAPS_CHUNK_POSITIONS``
    positions (batch × rows × columns) per chunk, so that a chunk's tap slices and its part of
    ``g`` stay in the CPU's caches while the products read them. Unchunked, every tap slice of a
    large map is written to memory and read back (at 2×224×288×64 → 64, 3×3: 270 ms; in chunks of
    4 rows 145 ms; at 2×112×144×192 → 128: 200 → 132 ms; docs/benchmarks.md)."""
    if b * ho * wo <= TAPS_CHUNK_MIN_POSITIONS:
        return ho  # small maps: one chunk (chunks of 2×56×72 were 10-90 % slower)
    return max(1, TAPS_CHUNK_POSITIONS // max(1, b * wo))


TAPS_CHUNK_POSITIONS = 2304  # positions per chunk (2×224×288: 4 rows)
TAPS_CHUNK_MIN_POSITIONS = 16384  # larger maps are chunked (2×112×144, 16×48×64 are)


def _tap_products(x_pad: jax.Array, g_BxOHxOWxO: jax.Array, kernel_shape: Sequence[int],
                  strides: Sequence[int], dilation: Sequence[int]) -> jax.Array:
    """The HWIO kernel gradient (float32; float64 for float64) of the output ``g`` read from
    the padded input ``x_pad`` (whose first rows and columns are those of output position
    (0, 0))."""
    kh, kw, c_in, c_out = kernel_shape
    b, ho, wo, _ = g_BxOHxOWxO.shape
    g_left = c_in > c_out or kh * kw > 1
    acc = _accumulator(x_pad.dtype)
    g_KxO = g_BxOHxOWxO.reshape(-1, c_out)
    g_OxK = g_KxO.T if g_left else None  # one transposed copy, shared by every tap
    taps = []
    for a in range(kh):
        for c in range(kw):
            h0, w0 = a * dilation[0], c * dilation[1]
            tap_KxI = jax.lax.slice(
                x_pad, (0, h0, w0, 0),
                (b, h0 + (ho - 1) * strides[0] + 1, w0 + (wo - 1) * strides[1] + 1, c_in),
                (1, strides[0], strides[1], 1)).reshape(-1, c_in)
            if g_left:  # [O, I] = gᵀ tap, transposed below
                taps.append(jnp.dot(g_OxK, tap_KxI, preferred_element_type=acc))
            else:  # [I, O] = tapᵀ g
                taps.append(jnp.dot(tap_KxI.T, g_KxO, preferred_element_type=acc))
    dk = jnp.stack(taps)
    if g_left:
        dk = jnp.swapaxes(dk, 1, 2)
    return dk.reshape(kernel_shape)


def space_to_depth_pays_off(kernel_shape: Sequence[int], strides: Sequence[int],
                            dilation: Sequence[int]) -> bool:
    """Whether :func:`kernel_grad_by_taps` takes :func:`kernel_grad_space_to_depth`: a strided,
    undilated kernel larger than 1×1 with few input channels (≤ 16), i.e. a stem convolution
    on the image. ResNet's 7×7 stride-2 stem (3 → 64 at 2×224×288): 64-71 ms by taps, 29-34 ms
    by XLA's, 12-13 ms by space-to-depth (docs/benchmarks.md, "Train-step speed on CPU").
    Wide strided 3×3 kernels (128-256 inputs) are as fast or faster by plain taps."""
    kh, kw, c_in, _ = kernel_shape
    return (kh * kw > 1 and max(strides) > 1 and tuple(dilation) == (1, 1)
            and c_in <= 16)


def kernel_grad_space_to_depth(x_BxHxWxI: jax.Array, g_BxOHxOWxO: jax.Array,
                               kernel_shape: Sequence[int], strides: Sequence[int],
                               padding: Sequence[tuple[int, int]]) -> jax.Array:
    """:func:`kernel_grad_by_taps` for a strided (s₀, s₁) undilated kernel, by space-to-depth.

    Kernel row ``a = s₀·a' + r`` reads ``x_pad[y·s₀ + a] = x_pad[s₀·(y + a') + r]``, so with
    ``x_pad`` rearranged into ``s₀ × s₁`` blocks (``X[n, y, x, (r, q, i)] = x_pad[n, s₀y + r,
    s₁x + q, i]``) the strided kernel becomes a stride-1 kernel of ``⌈kh/s₀⌉ × ⌈kw/s₁⌉`` taps
    over ``s₀·s₁·I`` channels: fewer, larger matrix products over contiguous slices (ResNet's
    7×7/2 stem: 16 products of 12 channels instead of 49 strided ones of 3). The taps past the
    kernel (``s₀·a' + r ≥ kh``) are computed and dropped. Same sums as XLA's kernel gradient.
    """
    kh, kw, c_in, c_out = kernel_shape
    sh, sw = strides
    b, ho, wo, _ = g_BxOHxOWxO.shape
    th, tw = -(-kh // sh), -(-kw // sw)  # taps of the rearranged kernel
    hh, ww = sh * (ho + th - 1), sw * (wo + tw - 1)  # the padded rows / columns any tap reads
    (plh, _), (plw, _) = padding
    h, w = x_BxHxWxI.shape[1:3]
    x = jnp.pad(x_BxHxWxI, ((0, 0), (plh, max(0, hh - h - plh)), (plw, max(0, ww - w - plw)),
                            (0, 0)))[:, :hh, :ww]
    x = x.reshape(b, hh // sh, sh, ww // sw, sw, c_in).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hh // sh, ww // sw, sh * sw * c_in)
    g_KxO = g_BxOHxOWxO.reshape(-1, c_out)
    taps = [jax.lax.dot_general(x[:, a:a + ho, c:c + wo].reshape(-1, sh * sw * c_in), g_KxO,
                                (((0,), (0,)), ((), ())),
                                preferred_element_type=_accumulator(x.dtype))
            for a in range(th) for c in range(tw)]
    dk = jnp.stack(taps).reshape(th, tw, sh, sw, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
    dk = dk.reshape(th * sh, tw * sw, c_in, c_out)[:kh, :kw]
    return dk.astype(x_BxHxWxI.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_taps_kernel_grad(x, k, strides, padding, dilation):
    return _conv_nhwc(x, k, strides, padding, dilation)


def _conv_taps_fwd(x, k, strides, padding, dilation):
    return _conv_nhwc(x, k, strides, padding, dilation), (x, k)


def _conv_taps_bwd(strides, padding, dilation, residuals, g):
    x, k = residuals

    def xla_grads(x_, k_, g_):
        return jax.vjp(lambda a, b: _conv_nhwc(a, b, strides, padding, dilation), x_, k_)[1](g_)

    def cpu_grads(x_, k_, g_):
        kh, kw, c_in, c_out = k_.shape
        if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and not any(map(any, padding)):
            # A 1×1 convolution is a matrix product; its input gradient as one (g · kᵀ) skips
            # the transposed kernel copy XLA makes for its input-gradient convolution (1.3-2.7×
            # faster on ResNet shapes, docs/benchmarks.md).
            dx = jnp.dot(g_.reshape(-1, c_out), k_.reshape(c_in, c_out).T,
                         preferred_element_type=_accumulator(x_.dtype)
                         ).reshape(x_.shape).astype(x_.dtype)
        else:
            (dx,) = jax.vjp(lambda a: _conv_nhwc(a, k_, strides, padding, dilation), x_)[1](g_)
        dk = kernel_grad_by_taps(x_, g_, k_.shape, strides, padding, dilation)
        return dx, dk.astype(k_.dtype)

    return jax.lax.platform_dependent(x, k, g, cpu=cpu_grads, default=xla_grads)


_conv_taps_kernel_grad.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _output_positions(x_shape, k_shape, strides, padding, dilation) -> int:
    """batch × output rows × output columns of an NHWC/HWIO convolution."""
    dilation = dilation or (1, 1)
    size = [(x_shape[1 + i] + padding[i][0] + padding[i][1] - (k_shape[i] - 1) * dilation[i]
             - 1) // strides[i] + 1 for i in range(2)]
    return int(x_shape[0] * size[0] * size[1])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``jax.lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``: the same
    values and gradients on every backend. What differs is how the CPU backend computes the
    kernel gradient of a plain 2-D NHWC convolution (explicit non-negative padding or
    ``'VALID'``, no input dilation or groups) where XLA's own is slow (:func:`taps_pay_off`) by
    :func:`kernel_grad_by_taps`. The choice of backend is made when lowering
    (``jax.lax.platform_dependent`` inside the backward pass only), so GPU and TPU programs
    run XLA's gradients; the forward pass and the saved residuals (input and kernel) are
    XLA's everywhere."""
    def xla(lhs_, rhs_):
        return jax.lax.conv_general_dilated(
            lhs_, rhs_, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)

    if isinstance(padding, str) and padding.upper() == "VALID":
        padding = ((0, 0), (0, 0))
    if (not taps_enabled() or lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1
            or precision is not None or preferred_element_type is not None
            or isinstance(padding, str)
            or any(d != 1 for d in (lhs_dilation or (1, 1)))
            or any(p < 0 for pair in padding for p in pair)
            or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            or not taps_pay_off(rhs.shape, _output_positions(lhs.shape, rhs.shape,
                                                               window_strides, padding,
                                                               rhs_dilation))):
        return xla(lhs, rhs)
    return _conv_taps_kernel_grad(lhs, rhs, tuple(int(s) for s in window_strides),
                                  tuple((int(lo), int(hi)) for lo, hi in padding),
                                  tuple(int(d) for d in (rhs_dilation or (1, 1))))


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
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _max_pool_nhwc(x, window, strides, padding):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                                 (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def max_pool_grad_by_mask(x_BxHxWxC: jax.Array, g_BxOHxOWxC: jax.Array,
                          window: Sequence[int], strides: Sequence[int],
                          padding: Sequence[tuple[int, int]]) -> jax.Array:
    """The input gradient of a max-pool (``-inf`` padding) without select-and-scatter: each
    output's gradient goes to the first maximum of its window in row-major order (as XLA's
    ``select_and_scatter`` and PyTorch do; a NaN counts as the maximum).

    Two element-wise passes over the window offsets, which XLA fuses into a few loops. The
    first finds, per output, the offset of the first maximum (a running maximum that only a
    strictly larger value, or a first NaN, replaces). The second spreads each output's
    gradient to that offset's input with an interior-padded ``pad``. XLA's CPU backend instead
    expands select-and-scatter into a reduce-window carrying four int32 index arrays and a
    scatter.

    The window's maximum is found again here from ``x``, never compared with the forward
    pass's output: XLA may compute the pool's input twice, once in the forward fusion and once
    in the backward one, and the two can differ in the last bit (e.g. a BatchNorm + ReLU
    fused into both with different multiply-add contraction). An equality test against the
    saved output then found no maximum in some windows and lost their gradient (0.4 % of the
    windows of a ResNet stem at 224×288, a 25 % error in the stem kernel's gradient).
    Here every window sends its gradient to exactly one input.
    """
    kh, kw = window
    sh, sw = strides
    (plh, phh), (plw, phw) = padding
    b, h, w, c = x_BxHxWxC.shape
    ho = (h + plh + phh - kh) // sh + 1
    wo = (w + plw + phw - kw) // sw + 1
    x_pad = jnp.pad(x_BxHxWxC, ((0, 0), (plh, phh), (plw, phw), (0, 0)),
                    constant_values=-jnp.inf)
    hp, wp = x_pad.shape[1:3]
    span_h, span_w = (ho - 1) * sh + 1, (wo - 1) * sw + 1  # input rows/cols one offset reads
    offsets = [(a, d) for a in range(kh) for d in range(kw)]

    def window_slice(a: int, d: int) -> jax.Array:
        return jax.lax.slice(x_pad, (0, a, d, 0), (b, a + span_h, d + span_w, c),
                             (1, sh, sw, 1))

    best = window_slice(*offsets[0])
    first = jnp.zeros(best.shape, jnp.int32)
    for t, (a, d) in enumerate(offsets[1:], start=1):
        cand = window_slice(a, d)
        better = (cand > best) | (jnp.isnan(cand) & ~jnp.isnan(best))
        best = jnp.where(better, cand, best)
        first = jnp.where(better, jnp.int32(t), first)
    zero = jnp.zeros((), g_BxOHxOWxC.dtype)
    dx_pad = None
    for t, (a, d) in enumerate(offsets):
        spread = jax.lax.pad(jnp.where(first == t, g_BxOHxOWxC, zero), zero,
                             ((0, 0, 0), (a, hp - a - span_h, sh - 1),
                              (d, wp - d - span_w, sw - 1), (0, 0, 0)))
        dx_pad = spread if dx_pad is None else dx_pad + spread
    return dx_pad[:, plh:plh + h, plw:plw + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return _max_pool_nhwc(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    return _max_pool_nhwc(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, g):
    def xla_grad(x_, g_):
        return jax.vjp(lambda a: _max_pool_nhwc(a, window, strides, padding), x_)[1](g_)[0]

    def cpu_grad(x_, g_):
        return max_pool_grad_by_mask(x_, g_, window, strides, padding)

    return (jax.lax.platform_dependent(x, g, cpu=cpu_grad, default=xla_grad),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x_BxHxWxC: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
    """``flax.linen.max_pool`` for NHWC with explicit padding (``-inf``), the same values on
    every backend; on CPU its gradient is :func:`max_pool_grad_by_mask` (chosen when lowering,
    as :func:`conv_general_dilated`'s kernel gradient), elsewhere XLA's select-and-scatter."""
    return _max_pool(x_BxHxWxC, tuple(int(v) for v in window), tuple(int(v) for v in strides),
                     tuple((int(lo), int(hi)) for lo, hi in padding))


@jax.custom_vjp
def add_relu(a: jax.Array, b: jax.Array) -> jax.Array:
    """``relu(a + b)`` for two arrays of one shape and dtype (a residual block's output), bit
    for bit, with relu's gradient (0 at 0).

    Written as ``max(a, -b) + b``: equal to ``max(a + b, 0)`` in floating point (``a > -b``
    gives the same rounded sum; otherwise ``-b + b`` is exactly +0; NaN propagates), but the
    last operation now reads two full-size arrays. That matters to XLA's CPU fusion, which
    duplicates "effectively unary" element-wise producers into every consumer: with
    ``max(a + b, 0)`` last, each block's output fusion re-derived the whole residual stream
    back to the stage's first block (a fusion with ~350 operations and ~115 operands in
    ResNet-101's layer3), forward and backward, so the elementwise cost grew with the square
    of the depth (``benchmarks/fusion_chain.py``). With a binary last op the output is
    materialised once, where the next convolution needs it anyway.

    The backward pass masks by the *output* (``out > 0`` exactly when ``a + b > 0``), so the
    saved residual is the output, the array the next layer keeps alive anyway.
    """
    return jnp.maximum(a, -b) + b


def _add_relu_fwd(a, b):
    out = jnp.maximum(a, -b) + b
    return out, out


def _add_relu_bwd(out, g):
    g = jnp.where(out > 0, g, jnp.zeros_like(g))
    return g, g


add_relu.defvjp(_add_relu_fwd, _add_relu_bwd)


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
            y, mean, var = batch_norm_train(x, jnp.asarray(scale, dt), jnp.asarray(bias, dt),
                                            self.epsilon, self.use_fast_variance)
            if not self.is_initializing():
                n = int(np.prod(x.shape[:-1]))
                running_var = var * (n / (n - 1)) if self.unbiased_running_var and n > 1 else var
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * running_var
            return y
        inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * jnp.asarray(scale, dt)
        return (x - ra_mean.value) * inv + jnp.asarray(bias, dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     fast_variance: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all axes but the last (float32 in and out): returns
    ``(y, mean, var)``, ``y = (x - mean) · rsqrt(var + ε) · scale + bias`` with the batch mean
    and the biased batch variance (two-pass, or one-pass with ``fast_variance``).

    Its gradient is the closed form (as cuDNN's and PyTorch's BatchNorm backward), with ``x̂ =
    (x - mean) · rsqrt(var + ε)`` and ``n`` values per channel:

        dbias = Σ g,  dscale = Σ g·x̂,  dx = scale · rsqrt(var + ε) · (g - (dbias + x̂·dscale) / n)

    plus the (usually zero) cotangents of ``mean`` and ``var``. It is the same function as
    differentiating the forward pass, written so that the backward reads ``x - mean`` (saved
    by the forward) and ``g`` once for its two per-channel sums and once for ``dx``; JAX's own
    derivative takes a third sum (the mean's cotangent, which is analytically
    ``dbias · rsqrt(var + ε) · scale``) and one more pass over a full-size array.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon, fast_variance)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, fast_variance):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    xc = x - mean
    if fast_variance:
        var = jnp.maximum(jnp.mean(x * x, axis=axes) - mean * mean, 0.0)
    else:
        var = jnp.mean(jnp.square(xc), axis=axes)
    inv = jax.lax.rsqrt(var + epsilon)
    y = xc * (inv * scale) + bias
    return (y, mean, var), (xc, inv, scale)


def _batch_norm_train_bwd(epsilon, fast_variance, residuals, cotangents):
    del epsilon, fast_variance
    xc, inv, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(xc.ndim - 1))
    n = int(np.prod(xc.shape[:-1]))
    d_bias = jnp.sum(g, axis=axes)
    d_scale = jnp.sum(g * xc, axis=axes) * inv  # Σ g·x̂
    # dx = scale·inv·(g - dbias/n - x̂·dscale/n) + g_mean/n + 2·(x - mean)·g_var/n
    a = scale * inv
    shift = g_mean / n - a * d_bias / n
    slope = 2.0 * g_var / n - a * inv * d_scale / n
    dx = a * g + xc * slope + shift
    return dx, d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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
