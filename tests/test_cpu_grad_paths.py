"""The other CPU kernels of models/cpu_grads, through the layers models use: ``add_relu`` (a
residual block's output, bit for bit ``relu(a + b)``, written so that XLA's CPU fusion
materialises it once) and ``max_pool`` (its gradient without select-and-scatter on CPU, XLA's
elsewhere); the switch that turns every kernel off; the guard that models use these layers."""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import cpu_grads, layers


def test_add_relu_is_relu_of_the_sum_bit_for_bit_with_relus_gradient():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6, 7)).astype(np.float32)
    b = rng.normal(size=a.shape).astype(np.float32)
    b.flat[:40] = -a.flat[:40]  # ties: a + b == 0 exactly, where relu's gradient is 0
    a.flat[40:60] = 0.0
    b.flat[40:60] = 0.0  # both zero (zero-initialised last BN, relu-off shortcut)
    b.flat[60:80] = 1e-30 * rng.normal(size=20)  # tiny values next to 0
    a, b = jnp.asarray(a), jnp.asarray(b)
    np.testing.assert_array_equal(layers.add_relu(a, b), nn.relu(a + b))
    w = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    ours = jax.grad(lambda a_, b_: jnp.sum(w * layers.add_relu(a_, b_)), (0, 1))(a, b)
    ref = jax.grad(lambda a_, b_: jnp.sum(w * nn.relu(a_ + b_)), (0, 1))(a, b)
    for x, y in zip(ours, ref):
        np.testing.assert_array_equal(x, y)
    nan = layers.add_relu(jnp.array([jnp.nan, 1.0]), jnp.array([0.0, jnp.nan]))
    assert np.isnan(nan).all()


def _largest_fusion_operands(n_blocks: int) -> int:
    """A chain of residual blocks (1×1 conv, batch-norm-like normalisation, add, relu):
    operands of the largest fused computation XLA's CPU backend compiles for its gradient."""
    def net(ks, x):
        for k in ks:
            y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            m = jnp.mean(y, (0, 1, 2))
            y = (y - m) * jax.lax.rsqrt(jnp.mean(jnp.square(y - m), (0, 1, 2)) + 1e-5)
            x = layers.add_relu(y, x)
        return jnp.mean(x ** 2)

    ks = [jnp.full((1, 1, 32, 32), 0.01 * (i + 1), jnp.float32) for i in range(n_blocks)]
    x = jnp.ones((2, 4, 5, 32), jnp.float32)
    text = jax.jit(jax.grad(net)).lower(ks, x).compile().as_text()
    bodies = re.findall(r"\n%?fused_computation[\w.]* \(.*?\n\}", text, re.S)
    return max(len(re.findall(r"parameter\(", body)) for body in bodies)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU fusion is the subject")
def test_add_relu_keeps_cpu_fusions_from_re_deriving_the_residual_stream():
    # With ``relu(y + x)`` each block's fusion re-derived every earlier block's output: its
    # operand count grew by 3 per block (25 at 8 blocks, 98 at 32 on jax 0.10.2;
    # benchmarks/fusion_chain.py). With ``add_relu`` it stays the same however deep.
    assert _largest_fusion_operands(8) == _largest_fusion_operands(3) <= 12


POOLS = [  # (input, window, strides, padding): ResNet's stem pool (odd sizes), SegNet's 2×2,
    ((2, 9, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # a stride-1 overlapping pool
    ((1, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((2, 7, 10, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 7, 7, 2), (3, 2), (2, 3), ((0, 1), (1, 0))),
]


@pytest.mark.parametrize("shape,window,strides,padding", POOLS)
def test_max_pool_matches_flax_with_ties(shape, window, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, size=shape), jnp.float32)  # many tied maxima
    y_ref, vjp_ref = jax.vjp(lambda a: nn.max_pool(a, window, strides=strides,
                                                   padding=padding), x)
    y, vjp = jax.vjp(lambda a: layers.max_pool(a, window, strides, padding), x)
    np.testing.assert_array_equal(y, y_ref)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    (dx_ref,), (dx,) = vjp_ref(g), vjp(g)
    # The first maximum of each window gets the gradient in both: an element that is the
    # first maximum of several windows sums them (in another order: rounding only).
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dx != 0, dx_ref != 0)
    np.testing.assert_allclose(cpu_grads.max_pool_grad_by_mask(x, g, window, strides, padding),
                               dx_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_the_first_maximum_and_to_a_nan():
    x = jnp.array([[1.0, 5.0, 5.0, 2.0], [5.0, 0.0, 3.0, jnp.nan]]).reshape(1, 2, 4, 1)
    dx = jax.grad(lambda a: jnp.sum(layers.max_pool(a, (2, 2), (2, 2))))(x)
    np.testing.assert_array_equal(dx.reshape(2, 4), [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_max_pool_gradient_never_loses_a_window():
    """Near-ties one ulp apart: every output's gradient lands on exactly one input (the first
    maximum), so the gradient's sum is the cotangent's sum, whatever the values."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 3, size=(2, 9, 11, 3)).astype(np.float32)
    x = jnp.asarray(np.nextafter(base, np.float32(4)) * rng.integers(0, 2, base.shape) +
                    base * (1 - rng.integers(0, 2, base.shape)), jnp.float32)
    g = jnp.asarray(rng.integers(1, 4, size=(2, 5, 6, 3)), jnp.float32)
    dx = cpu_grads.max_pool_grad_by_mask(x, g, (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert float(jnp.sum(dx)) == float(jnp.sum(g))
    dx_ref = jax.vjp(lambda a: nn.max_pool(a, (3, 3), strides=(2, 2),
                                           padding=((1, 1), (1, 1))), x)[1](g)[0]
    np.testing.assert_array_equal(dx, dx_ref)


class _Stem(nn.Module):
    """A ResNet stem (conv 7×7/2 → BatchNorm → ReLU → max-pool 3×3/2) and one conv after it."""

    pool: Callable

    @nn.compact
    def __call__(self, x):
        x = layers.conv(64, 7, strides=2, name="conv1", dtype=x.dtype, param_dtype=x.dtype)(x)
        stem = nn.relu(layers.batch_norm(True, param_dtype=x.dtype, name="bn1")(x))
        stem = stem.astype(x.dtype)
        pooled = self.pool(stem, (3, 3), (2, 2), ((1, 1), (1, 1)))
        out = layers.conv(64, 3, name="conv2", dtype=x.dtype, param_dtype=x.dtype)(pooled)
        return [stem, pooled, out]


def test_stem_gradient_inside_a_model_equals_select_and_scatter_float64():
    """The stem's gradients with ``layers.max_pool`` equal those with XLA's select-and-scatter
    (``flax.linen.max_pool``) in float64. Inside a jitted model XLA may compute the pool's
    input (BatchNorm + ReLU) twice, once fused into the forward pool and once into the
    backward, and the two can differ in the last bit; a mask gradient that compared the input
    with the saved output then dropped ~0.4 % of the windows: the stem kernel's gradient was
    26 % off at this shape (and torchvision's ResNet-18 `conv1` 9 %, ResNet-101 `bn1.bias`
    22 %), while `layers.max_pool` alone agreed. Compiled with XLA's full optimisation
    pipeline (the suite's compile-light mode fuses too little to show it)."""
    def grads(pool):
        model = _Stem(pool)
        x = jax.random.normal(jax.random.key(0), (2, 48, 64, 3), jnp.float64)
        variables = model.init(jax.random.key(1), x)

        def loss(params):
            feats, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, mutable=["batch_stats"])
            return sum(jnp.mean(f.astype(jnp.float64) ** 2) for f in feats)
        return jax.jit(jax.grad(loss))(variables["params"])

    light = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        with jax.enable_x64():
            ours = grads(layers.max_pool)
            xla = grads(lambda x, w, s, p: nn.max_pool(x, w, strides=s, padding=p))
    finally:
        jax.config.update("jax_disable_most_optimizations", light)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def _pool_backward_hlo(platform: str) -> str:
    x = jnp.ones((2, 9, 11, 3), jnp.float32)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(layers.max_pool(a, (3, 3), (2, 2),
                                                              ((1, 1), (1, 1))) ** 2)))
    return grad.trace(x).lower(lowering_platforms=(platform,)).as_text()


def test_only_the_cpu_backend_takes_the_mask_gradient():
    assert "select_and_scatter" not in _pool_backward_hlo("cpu")
    for platform in ("cuda", "tpu"):  # XLA's own select-and-scatter, unchanged
        assert "select_and_scatter" in _pool_backward_hlo(platform)


def test_resnet_blocks_use_them(monkeypatch):
    from mtl_jax.models.encoders import build_encoder, resnet

    calls = {"add_relu": 0, "max_pool": 0}

    def spy(name):
        real = getattr(layers, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    for name in calls:
        monkeypatch.setattr(resnet, name, spy(name))
    model = build_encoder("resnet18", width=8)
    image = jnp.ones((1, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.key(0), image, train=False)
    assert calls == {"add_relu": 8, "max_pool": 1}  # every BasicBlock, the stem's pool
    text = jax.jit(jax.grad(lambda p: sum(jnp.sum(f) for f in model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, image, train=True,
        mutable=["batch_stats"])[0]))).trace(variables["params"]).lower(
            lowering_platforms=("cpu",)).as_text()
    assert "select_and_scatter" not in text


# ------------------------------------------------------------------ the switch: every kernel off
class _Block(nn.Module):
    """One of each: a 1×1 conv (kernel gradient by taps, 1×1 input gradient), a training
    BatchNorm, ``add_relu`` and the stem's max-pool."""

    @nn.compact
    def __call__(self, x):
        y = layers.conv(8, 1, name="conv")(x)
        y = layers.BatchNorm(name="bn")(y, train=True)
        y = layers.add_relu(y, x)
        return layers.max_pool(y, (3, 3), (2, 2), ((1, 1), (1, 1)))


def _block_grad():
    """(loss, gradients) of :class:`_Block` from a fresh jitted function (the switch is read
    when tracing), the loss's jaxpr and the gradient's CPU lowering."""
    model = _Block()
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 8), jnp.float32)
    variables = model.init(jax.random.key(1), x)

    def loss(params, x_):
        y, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x_,
                           mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (variables["params"], x)
    jaxpr = str(jax.make_jaxpr(loss)(*args))
    cpu = f.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    return f(*args), jaxpr, cpu


def test_one_switch_turns_every_kernel_off_and_the_results_agree(monkeypatch):
    monkeypatch.delenv(cpu_grads.CPU_KERNELS_ENV, raising=False)
    monkeypatch.delenv(cpu_grads.CONV_GRAD_ENV, raising=False)
    on, on_jaxpr, on_cpu = _block_grad()
    # conv, BatchNorm, add_relu and max-pool each have their own VJP; on CPU no
    # select-and-scatter, the kernel gradient a product (one convolution: the forward's).
    assert on_jaxpr.count("custom_vjp_call") == 4
    assert "select_and_scatter" not in on_cpu and on_cpu.count("stablehlo.convolution") == 1
    monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, "off")
    off, off_jaxpr, off_cpu = _block_grad()
    assert "custom_vjp_call" not in off_jaxpr  # plain relu(a + b), JAX's BatchNorm derivative
    assert "select_and_scatter" in off_cpu  # XLA's max-pool gradient
    assert off_cpu.count("stablehlo.convolution") == 3  # forward, input and kernel gradients
    for got, want in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # each kernel by name; the context manager does the same within one process
    for i, name in enumerate(cpu_grads.KERNELS):
        monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, name)
        assert _block_grad()[1].count("custom_vjp_call") == 3, name
        monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, ",".join(cpu_grads.KERNELS[:i + 1]))
        assert _block_grad()[1].count("custom_vjp_call") == 3 - i
    monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, "on")
    with cpu_grads.disabled():
        assert "custom_vjp_call" not in _block_grad()[1]
    with cpu_grads.disabled("max_pool"):
        assert "select_and_scatter" in _block_grad()[2]
    assert _block_grad()[1].count("custom_vjp_call") == 4


def test_switch_values_are_checked(monkeypatch):
    monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, "fast")
    with pytest.raises(cpu_grads.SwitchError, match="MTL_JAX_CPU_KERNELS='fast'.*'off'"):
        layers.add_relu(jnp.ones(2), jnp.ones(2))
    monkeypatch.setenv(cpu_grads.CPU_KERNELS_ENV, "max_pool,maxpool")
    with pytest.raises(cpu_grads.SwitchError, match="'maxpool'"):
        layers.add_relu(jnp.ones(2), jnp.ones(2))
    with pytest.raises(ValueError, match="'relu'"):  # a UserError and a ValueError
        with cpu_grads.disabled("relu"):
            pass


# ---------------------------------------------------- the guard: models use the covered layers
_RAW = {  # what the CPU kernels cover, built without them
    "nn.Conv", "linen.Conv", "flax.linen.Conv", "nn.max_pool", "linen.max_pool",
    "flax.linen.max_pool", "nn.pooling.max_pool", "lax.conv", "jax.lax.conv",
    "lax.conv_general_dilated", "jax.lax.conv_general_dilated", "lax.reduce_window",
    "jax.lax.reduce_window",
}


def _raw_layers(source: str) -> list[str]:
    """Raw convolutions / max-pools a module's code (not its docstrings) builds or imports."""
    import ast

    def dotted(node):
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return node.id if isinstance(node, ast.Name) else None

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and dotted(node) in _RAW:
            found.append(f"line {node.lineno}: {dotted(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("flax.linen", "jax.lax"):
            found += [f"line {node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if f"{node.module}.{a.name}" in _RAW]
    return found


def test_models_use_the_layers_the_cpu_kernels_cover():
    """No model module (nor the UDA discriminator) builds a convolution or max-pool without
    ``layers.conv`` / ``layers.max_pool``, which would silently miss the CPU kernels and the
    one max-pool's tie rule. ``nn.ConvTranspose`` has no CPU kernel and stays allowed."""
    import pathlib

    assert _raw_layers("import flax.linen as nn\nc = nn.Conv(4, (3, 3))\n") == ["line 2: nn.Conv"]
    assert _raw_layers("from jax.lax import reduce_window\n'''nn.Conv'''\n") == [
        "line 1: from jax.lax import reduce_window"]
    root = pathlib.Path(__file__).resolve().parents[1] / "mtl_jax"
    allowed = {root / "models" / "layers.py"} | set((root / "models" / "cpu_grads").rglob("*.py"))
    files = [*(root / "models").rglob("*.py"), *(root / "uda").rglob("*.py")]
    offenders = {str(p.relative_to(root)): raw for p in files if p not in allowed
                 for raw in [_raw_layers(p.read_text())] if raw}
    assert offenders == {}
    assert len(files) > 40  # the walk found the models


class _RawConvDiscriminator(nn.Module):
    """The patch discriminator as it was written before it used ``layers.conv``."""

    channels: tuple = (4,)

    @nn.compact
    def __call__(self, x, *, update_stats):
        features = (*self.channels, 1)
        for i, ch in enumerate(features):
            layer = nn.Conv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                            name=f"conv{i}")
            x = nn.SpectralNorm(layer, n_steps=1, name=f"sn{i}")(x, update_stats=update_stats)
            if i < len(features) - 1:
                x = nn.leaky_relu(x, 0.2)
        return x


def test_discriminator_on_layers_conv_keeps_its_tree_values_and_checkpoints():
    from mtl_jax.uda.discriminator import PatchDiscriminator

    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3), jnp.float32)
    old, new = _RawConvDiscriminator(), PatchDiscriminator(channels=(4,))
    v_old = jax.jit(lambda k: old.init(k, x, update_stats=False))(jax.random.key(0))
    v_new = jax.jit(lambda k: new.init(k, x, update_stats=False))(jax.random.key(0))
    # the same tree (names, shapes) and the same initial values from the same key
    assert jax.tree.structure(v_new) == jax.tree.structure(v_old)
    for a, b in zip(jax.tree.leaves(v_new), jax.tree.leaves(v_old), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # an old checkpoint's variables drive the new module to the old module's outputs and state
    trained = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                           v_old)
    y_old, s_old = jax.jit(lambda v: old.apply(v, x, update_stats=True,
                                               mutable=["batch_stats"]))(trained)
    y_new, s_new = jax.jit(lambda v: new.apply(v, x, update_stats=True,
                                               mutable=["batch_stats"]))(trained)
    np.testing.assert_allclose(y_new, y_old, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_new), jax.tree.leaves(s_old), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
