"""The convolution's CPU gradient: the kernel gradient by taps (in row chunks on large maps, by
space-to-depth for strided stem kernels) and the 1×1 input gradient as one matrix product.

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (what
``layers.conv`` hands to ``nn.Conv``). Where the kernel is on (:mod:`.switch`, kernel
``conv``) and the convolution is one it handles (:func:`taps_pay_off`), its custom VJP picks
the CPU gradient **when lowering** (``jax.lax.platform_dependent`` inside the backward pass),
so GPU and TPU programs compute XLA's own gradients. The forward pass and the saved residuals
(input and kernel) are XLA's everywhere. Measurements: docs/benchmarks.md, "Train-step speed
on CPU".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.models.cpu_grads.switch import enabled

_NHWC = ("NHWC", "HWIO", "NHWC")

def taps_pay_off(kernel_shape: Sequence[int], positions: int | None = None) -> bool:
    """Whether the kernel gradient by taps beats XLA's on the CPU backend for this HWIO kernel
    (``positions``: batch × output rows × columns, if known).

    Where it measured faster (``benchmarks/conv_grad.py --sweep``; docs/benchmarks.md,
    "Train-step speed on CPU"): every 1×1 kernel; larger kernels with at least 64 output
    channels and no more inputs than outputs, or with at least 128 output channels; on maps
    large enough to be taken in row chunks (:func:`taps_chunk_rows`) also kernels with 32-63
    outputs. With 16 outputs XLA's own stays faster.
    """
    kh, kw, c_in, c_out = kernel_shape
    if kh == kw == 1:
        return True
    if positions is not None and positions > TAPS_CHUNK_MIN_POSITIONS and c_out >= 32:
        return True
    return c_out >= 128 or (c_out >= 64 and c_in <= c_out)



def _accumulator(dtype) -> jnp.dtype:
    """The accumulation dtype of the gradient products: float32, float64 for float64."""
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
    convolution whose window is the whole output map, many times slower than the forward pass
    (benchmarks/conv_grad.py). Accumulates in float32 (float64 for float64 inputs); returns
    the dtype of ``x``.

    XLA's CPU matrix product (YNNPACK) wants its left operand with the contracted axis minor,
    so it copies that operand transposed; the right one it reads as it is. For a 1×1 kernel the
    smaller of ``x`` (``I`` channels) and ``g`` (``O`` channels) goes left; for larger kernels
    ``g`` goes left (one transposed copy shared by all taps) and the taps right, so each tap is
    a plain slice (faster than transposing every tap on large maps).

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
    large map is written to memory and read back. Small maps stay one chunk (chunking them was
    slower)."""
    if b * ho * wo <= TAPS_CHUNK_MIN_POSITIONS:
        return ho
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
    on the image (ResNet's 7×7 stride-2 stem is faster this way than by plain taps or XLA's).
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
            # the transposed kernel copy XLA makes for its input-gradient convolution.
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
    :func:`kernel_grad_by_taps`, and a stride-1 unpadded 1×1 convolution's input gradient.
    The choice of backend is made when lowering (``jax.lax.platform_dependent`` inside the
    backward pass only), so GPU and TPU programs run XLA's gradients; the forward pass and the
    saved residuals (input and kernel) are XLA's everywhere. Switched off (kernel ``conv``):
    plain ``jax.lax.conv_general_dilated``."""
    def xla(lhs_, rhs_):
        return jax.lax.conv_general_dilated(
            lhs_, rhs_, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)

    if isinstance(padding, str) and padding.upper() == "VALID":
        padding = ((0, 0), (0, 0))
    if (not enabled("conv") or lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1
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
