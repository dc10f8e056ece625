"""The CPU kernel gradient by taps (models/cpu_grads): same values and gradients as XLA's
convolution for every shape the models use, only on the CPU backend, and never for what it
does not handle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import cpu_grads, layers

NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, strides, padding, kernel dilation): 1×1 (stride 1 and 2; fewer
# and more outputs than inputs), 3×3 kernels where the taps pay off (stride 2, dilation 2,
# asymmetric padding), odd sizes.
CASES = [
    ((2, 7, 9, 8), (1, 1, 8, 12), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 7, 9, 8), (1, 1, 8, 12), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((2, 7, 9, 12), (1, 1, 12, 8), (1, 1), ((0, 0), (0, 0)), (1, 1)),  # gᵀ·tap, transposed
    ((1, 7, 6, 130), (3, 3, 130, 128), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((1, 6, 5, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 7, 6, 128), (3, 3, 128, 130), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((1, 9, 8, 128), (3, 3, 128, 128), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((1, 8, 7, 128), (3, 2, 128, 128), (2, 1), ((0, 2), (1, 0)), (1, 2)),
    # space-to-depth (strided, few input channels): ResNet's 7×7/2 stem on odd sizes; stride 3
    # × 2 with asymmetric padding and a kernel that is not a multiple of the stride.
    ((2, 23, 29, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((1, 17, 13, 4), (5, 4, 4, 64), (3, 2), ((1, 2), (0, 3)), (1, 1)),
]


@pytest.mark.parametrize("xshape,kshape,strides,padding,dilation",
                         [c for c in CASES if c[1][2] > 16])  # not the space-to-depth ones
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_row_chunks_give_the_same_kernel_gradient(xshape, kshape, strides, padding, dilation,
                                                  rows):
    """Chunks of 1-3 output rows (the last one short where the rows do not divide) sum to the
    kernel gradient of the whole map, with strides, dilation and asymmetric padding."""
    x, k = _inputs(xshape, kshape)
    y = _xla(x, k, strides, padding, dilation)
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    (dk_xla,) = jax.vjp(lambda k_: _xla(x, k_, strides, padding, dilation), k)[1](g)
    grad = jax.jit(cpu_grads.kernel_grad_by_taps, static_argnums=(2, 3, 4, 5, 6))
    dk = grad(x, g, kshape, strides, padding, dilation, rows)
    np.testing.assert_allclose(dk, dk_xla, rtol=1e-5, atol=1e-4)


def test_large_maps_are_chunked_and_take_the_taps_from_32_outputs():
    assert cpu_grads.taps_chunk_rows(2, 56, 72) == 56  # 8,064 positions: one chunk
    assert cpu_grads.taps_chunk_rows(2, 224, 288) == 4  # 2,304 positions per chunk
    assert cpu_grads.taps_chunk_rows(16, 96, 128) == 1
    big = 16 * 48 * 64
    assert cpu_grads.taps_pay_off((3, 3, 48, 32), big)
    assert not cpu_grads.taps_pay_off((3, 3, 48, 32))
    assert not cpu_grads.taps_pay_off((3, 3, 32, 16), big)
    # the CPU backward of a large map loops over the chunks; a small one does not
    cpu = _backward_hlo("cpu", (1, 130, 130, 32), (3, 3, 32, 32), padding=((1, 1), (1, 1)))
    assert "stablehlo.while" in cpu and "dot_general" in cpu
    cpu = _backward_hlo("cpu", (1, 60, 60, 64), (3, 3, 64, 64), padding=((1, 1), (1, 1)))
    assert "stablehlo.while" not in cpu and "dot_general" in cpu


def _xla(x, k, strides, padding, dilation):
    return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=NHWC)


def _ours(x, k, strides, padding, dilation):
    return cpu_grads.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                       dimension_numbers=NHWC)


def _inputs(xshape, kshape, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=xshape), jnp.float32),
            jnp.asarray(rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:3])), jnp.float32))


@pytest.mark.parametrize("xshape,kshape,strides,padding,dilation", CASES)
def test_taps_kernel_gradient_matches_xla(xshape, kshape, strides, padding, dilation):
    x, k = _inputs(xshape, kshape)
    y = _xla(x, k, strides, padding, dilation)
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    _, vjp = jax.vjp(lambda k_: _xla(x, k_, strides, padding, dilation), k)
    (dk_xla,) = vjp(g)
    dk = jax.jit(cpu_grads.kernel_grad_by_taps, static_argnums=(2, 3, 4, 5))(
        x, g, kshape, strides, padding, dilation)
    np.testing.assert_allclose(dk, dk_xla, rtol=1e-5, atol=1e-4)

    def loss(conv, x_, k_):
        return jnp.sum(jnp.sin(conv(x_, k_, strides, padding, dilation)))

    ours = jax.jit(jax.value_and_grad(lambda x_, k_: loss(_ours, x_, k_), argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(lambda x_, k_: loss(_xla, x_, k_), argnums=(0, 1)))
    (v, (dx, dk)), (v_ref, (dx_ref, dk_ref)) = ours(x, k), ref(x, k)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


def _backward_hlo(platform: str, xshape, kshape, strides=(1, 1), padding=((0, 0), (0, 0))):
    x, k = _inputs(xshape, kshape)
    grad = jax.jit(jax.grad(lambda k_: jnp.sum(_ours(x, k_, strides, padding, (1, 1)) ** 2)))
    return grad.trace(k).lower(lowering_platforms=(platform,)).as_text()


def test_only_the_cpu_backend_takes_the_taps():
    cpu = _backward_hlo("cpu", (2, 7, 9, 8), (1, 1, 8, 12))
    assert "dot_general" in cpu and cpu.count("stablehlo.convolution") == 1  # forward only
    for platform in ("cuda", "tpu"):  # XLA's own kernel gradient: a second convolution
        other = _backward_hlo(platform, (2, 7, 9, 8), (1, 1, 8, 12))
        assert "dot_general" not in other and other.count("stablehlo.convolution") == 2


@pytest.mark.parametrize("c_in,c_out,taps", [(32, 32, False), (64, 16, False), (128, 64, False),
                                              (16, 64, True), (64, 64, True), (256, 128, True)])
def test_which_kernels_take_the_taps(c_in, c_out, taps):
    assert cpu_grads.taps_pay_off((3, 3, c_in, c_out)) is taps
    assert cpu_grads.taps_pay_off((1, 1, c_in, c_out))  # every 1×1 kernel
    cpu = _backward_hlo("cpu", (1, 5, 5, c_in), (3, 3, c_in, c_out), padding=((1, 1), (1, 1)))
    assert ("dot_general" in cpu) is taps
    assert cpu.count("stablehlo.convolution") == (1 if taps else 2)


def test_strided_stem_kernels_take_space_to_depth():
    stem = ((7, 7, 3, 64), (2, 2), (1, 1))
    assert cpu_grads.space_to_depth_pays_off(*stem)
    for kshape, strides, dilation in [((7, 7, 3, 64), (1, 1), (1, 1)),  # not strided
                                      ((3, 3, 3, 64), (2, 2), (2, 2)),  # dilated
                                      ((1, 1, 3, 64), (2, 2), (1, 1)),  # one tap already
                                      ((3, 3, 128, 128), (2, 2), (1, 1))]:  # wide: plain taps
        assert not cpu_grads.space_to_depth_pays_off(kshape, strides, dilation)
    cpu = _backward_hlo("cpu", (1, 16, 16, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)))
    assert cpu.count("stablehlo.dot_general") == 16  # 4 × 4 products, not 7 × 7
    # the wide strided 3×3 keeps one product per tap
    cpu = _backward_hlo("cpu", (1, 8, 8, 128), (3, 3, 128, 128), (2, 2), ((1, 1), (1, 1)))
    assert cpu.count("stablehlo.dot_general") == 9


def test_switches_back_to_xla_gradients(monkeypatch):
    with cpu_grads.xla_conv_gradients():
        assert "dot_general" not in _backward_hlo("cpu", (2, 7, 9, 8), (1, 1, 8, 12))
    monkeypatch.setenv(cpu_grads.CONV_GRAD_ENV, "xla")
    assert "dot_general" not in _backward_hlo("cpu", (2, 7, 9, 8), (1, 1, 8, 12))
    monkeypatch.setenv(cpu_grads.CONV_GRAD_ENV, "fast")
    with pytest.raises(ValueError, match="MTL_JAX_CPU_CONV_GRAD='fast'"):
        _backward_hlo("cpu", (2, 7, 9, 8), (1, 1, 8, 12))


def test_unsupported_convolutions_fall_back_to_xla():
    x, k = _inputs((1, 6, 6, 4), (3, 3, 2, 8))
    grouped = cpu_grads.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=NHWC, feature_group_count=2)
    ref = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                       feature_group_count=2)
    np.testing.assert_allclose(grouped, ref, rtol=1e-6)
    text = jax.jit(jax.grad(lambda k_: jnp.sum(cpu_grads.conv_general_dilated(
        x, k_, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)))).trace(
            k).lower().as_text()
    assert "dot_general" not in text


def test_flax_conv_uses_it_and_bfloat16_gradients_keep_their_dtype():
    module = layers.conv(16, 1, dtype=jnp.bfloat16)
    x = jnp.ones((2, 5, 5, 8), jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32)))(params)
    assert grads["params"]["kernel"].dtype == jnp.float32  # param dtype
    text = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32)))).trace(
        params).lower().as_text()
    assert "dot_general" in text
    # every kernel entry: sum over 2*5*5 positions of x (= 1) times g (= 1)
    np.testing.assert_allclose(np.asarray(grads["params"]["kernel"], np.float32), 50.0)


def test_valid_padding_takes_the_taps():  # DenseMTL's reflection-padded decoder convs
    x, k = _inputs((2, 7, 8, 16), (3, 3, 16, 64))

    def loss(conv, x_, k_):
        return jnp.sum(jnp.cos(conv(x_, k_, (1, 1), "VALID", dimension_numbers=NHWC)))

    ours = jax.jit(jax.grad(lambda x_, k_: loss(cpu_grads.conv_general_dilated, x_, k_), (0, 1)))
    ref = jax.jit(jax.grad(lambda x_, k_: loss(jax.lax.conv_general_dilated, x_, k_), (0, 1)))
    for a, b in zip(ours(x, k), ref(x, k)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "dot_general" in ours.trace(x, k).lower().as_text()
