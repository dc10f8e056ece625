"""Conventions of the reference PyTorch codes in the shared layers: BatchNorm's running
variance (PyTorch's unbiased update), its float32 variance formula, and DenseMTL's
aligned-corner resize of side outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import build_model
from mtl_jax.models.cpu_grads import batch_norm_train
from mtl_jax.models.layers import BatchNorm, ConvBNAct, batch_norm, resize_bilinear

KEY = jax.random.key(0)


def _bn_step(module, x):
    variables = module.init(KEY, x, train=True)
    y, upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, y, upd["batch_stats"]


@pytest.fixture(scope="module")
def x_small():
    # 2 images x 4 x 4 positions = 32 values per channel: the ResNet's last stage at 128x256.
    return np.random.default_rng(0).normal(2.0, 3.0, (2, 4, 4, 3)).astype(np.float32)


def test_running_variance_is_pytorchs_unbiased_update(x_small):
    variables, y, stats = _bn_step(BatchNorm(), x_small)
    flat = x_small.reshape(-1, 3).astype(np.float64)
    n = flat.shape[0]
    # torch: running = 0.9 * running + 0.1 * var(unbiased); running starts at 0 / 1.
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], 0.1 * flat.mean(0), rtol=1e-6)
    # Normalisation itself uses the biased variance (as torch and flax).
    expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)
    # The unbiased factor n/(n-1) = 32/31 is 3 % here.
    assert n == 32
    assert set(variables["params"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]) == {"mean", "var"}


def test_flax_update_kept_as_an_option(x_small):
    _, y, stats = _bn_step(BatchNorm(unbiased_running_var=False), x_small)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ref_vars = ref.init(KEY, x_small)
    y_ref, upd = ref.apply(ref_vars, x_small, mutable=["batch_stats"])
    np.testing.assert_allclose(stats["var"], upd["batch_stats"]["var"], rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], upd["batch_stats"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # Same variable tree as flax's BatchNorm: checkpoints and converters keep working.
    assert jax.tree.structure(ref_vars) == jax.tree.structure(
        BatchNorm().init(KEY, x_small, train=True))


def test_eval_mode_reads_running_stats(x_small):
    module = BatchNorm()
    variables = module.init(KEY, x_small, train=True)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.full((3,), 2.0), "var": jnp.full((3,), 4.0)}}
    y = module.apply(variables, x_small, train=False)
    np.testing.assert_allclose(y, (x_small - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu, sd, fast_err, two_pass_err", [
    (10.0, 0.1, 1e-3, 1e-6), (100.0, 0.1, 1e-2, 1e-6)])
def test_two_pass_variance_is_accurate_in_float32(mu, sd, fast_err, two_pass_err):
    x = (mu + sd * np.random.default_rng(0).standard_normal((8, 16, 16, 4))).astype(np.float32)
    exact = x.astype(np.float64).reshape(-1, 4).var(0)
    errs = {}
    for fast in (False, True):
        m = BatchNorm(use_fast_variance=fast, unbiased_running_var=False, momentum=0.0)
        _, _, stats = _bn_step(m, x)
        errs[fast] = float(np.max(np.abs(np.asarray(stats["var"]) - exact) / exact))
    assert errs[False] < two_pass_err
    assert errs[True] > fast_err  # what flax's default one-pass formula loses


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 4)])
@pytest.mark.parametrize("fast", [False, True])
def test_batchnorm_closed_form_gradient_matches_autodiff(shape, fast):
    """batch_norm_train's hand-written backward against JAX's derivative of the same forward
    formula (float64), for the input, scale and bias, with nonzero cotangents on all three
    outputs (y, mean, var)."""
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = rng.normal(1.5, 2.0, size=shape)
    scale, bias = rng.normal(size=c), rng.normal(size=c)
    g, g_mean, g_var = rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c)

    def reference(x_, s_, b_):
        axes = tuple(range(x_.ndim - 1))
        mean = jnp.mean(x_, axis=axes)
        var = (jnp.maximum(jnp.mean(x_ * x_, axis=axes) - mean * mean, 0.0) if fast
               else jnp.mean(jnp.square(x_ - mean), axis=axes))
        return (x_ - mean) * jax.lax.rsqrt(var + 1e-5) * s_ + b_, mean, var

    def loss(f, *args):
        y, mean, var = f(*args)
        return jnp.sum(y * g) + jnp.sum(mean * g_mean) + jnp.sum(var * g_var)

    with jax.enable_x64():
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(*args)
        got = jax.grad(lambda *a: loss(lambda *b: batch_norm_train(*b, 1e-5, fast), *a),
                       argnums=(0, 1, 2))(*args)
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(batch_norm_train(*args, 1e-5, fast)[0], reference(*args)[0],
                                   rtol=1e-12, atol=1e-12)
    # and in float32 through the module, against the module's own forward formula
    module = BatchNorm(use_fast_variance=fast)
    x32 = jnp.asarray(x, jnp.float32)
    variables = module.init(KEY, x32, train=True)

    def module_loss(params, x_):
        y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x_,
                            train=True, mutable=["batch_stats"])
        return jnp.sum(y * g)

    (dp, dx) = jax.grad(module_loss, argnums=(0, 1))(variables["params"], x32)
    with jax.enable_x64():
        want = jax.grad(lambda *a: jnp.sum(reference(*a)[0] * g), argnums=(0, 1, 2))(
            jnp.asarray(x, jnp.float64), jnp.ones(c), jnp.zeros(c))
    np.testing.assert_allclose(dx, want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp["scale"], want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp["bias"], want[2], rtol=1e-5, atol=1e-5)


def test_batchnorm_defaults_are_two_pass_and_pytorchs_update(x_small):
    bn = BatchNorm()
    assert bn.use_fast_variance is False and bn.unbiased_running_var is True
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)  # torch's momentum 0.1, eps 1e-5
    built = batch_norm(True).func  # the helper every ConvBNAct goes through
    assert built.use_fast_variance is False and built.unbiased_running_var is True
    # The defaults at work on mean 100 / std 0.1 in float32 (one pass loses 5.9 % there), the
    # running variance replaced by one step (momentum 0): the float64 variance times
    # n / (n - 1) = 2048 / 2047 (+0.05 %, far above the two-pass error).
    x = (100.0 + 0.1 * np.random.default_rng(0).standard_normal((8, 16, 16, 4))
         ).astype(np.float32)
    flat = x.astype(np.float64).reshape(-1, 4)
    errs = {}
    for name, kw in [("default", {}), ("one pass", dict(use_fast_variance=True)),
                     ("biased", dict(unbiased_running_var=False))]:
        _, _, stats = _bn_step(BatchNorm(momentum=0.0, **kw), x)
        errs[name] = np.max(np.abs(np.asarray(stats["var"]) / flat.var(0, ddof=1) - 1.0))
    assert errs["default"] < 1e-5
    assert errs["one pass"] > 1e-2 and 4e-4 < errs["biased"] < 6e-4, errs


def test_every_model_batchnorm_uses_the_unbiased_update():
    model = ConvBNAct(4, kernel_size=1)
    x = np.random.default_rng(1).normal(size=(2, 3, 3, 2)).astype(np.float32)
    variables = model.init(KEY, x, train=True)
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y = np.einsum("bhwc,cd->bhwd", x, np.asarray(variables["params"]["conv"]["kernel"][0, 0]))
    var = y.reshape(-1, 4).astype(np.float64).var(0, ddof=1)
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


def test_no_model_builds_flax_batchnorm_directly():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "mtl_jax" / "models"
    offenders = [str(p) for p in root.rglob("*.py") if "nn.BatchNorm" in p.read_text()]
    assert offenders == []


# ----------------------------------------------------- DenseMTL: side outputs, aligned corners
TINY_MODEL = dict(encoder="simple", encoder_kwargs=dict(widths=(4, 4, 4, 4, 4)),
                  decoder="three_ways",
    decoder_kwargs=dict(channels=(4, 8, 8, 8, 8), side_scales=(1,)))


def test_densemtl_side_outputs_resize_with_aligned_corners():
    # With an exchange block (the DenseMTL path); the plain decoder shares ``resize_side``.
    model = build_model(dict(TINY_MODEL, exchange=dict(name="mteb", stages=(1,))),
                        {"semseg": 3, "depth": 1})
    image = jax.random.uniform(KEY, (1, 32, 48, 3))

    @jax.jit
    def run(image):
        variables = model.init({"params": KEY, "dropout": KEY}, image, train=False)
        return model.apply(variables, image, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, name: name == "side")

    (_, aux), state = run(image)
    for t in ("semseg", "depth"):
        half = state["intermediates"]["decoders"][t]["side"][0]
        assert half.shape[1:3] == (16, 24)
        np.testing.assert_allclose(aux[f"{t}/side/1"],
                                   resize_bilinear(half, (32, 48), align_corners=True),
                                   rtol=1e-5, atol=1e-6)
        assert not np.allclose(aux[f"{t}/side/1"], resize_bilinear(half, (32, 48)), atol=1e-6)


def test_padnet_initial_predictions_resize_with_aligned_corners():
    model = build_model(dict(encoder="simple", encoder_kwargs=dict(widths=(4, 4, 4, 4, 8)),
                             decoder="padnet", decoder_kwargs=dict(width=8),
                             interaction=dict(name="padnet", width=8)), {"depth": 1, "normals": 3})
    image = jax.random.uniform(KEY, (1, 64, 64, 3))

    @jax.jit
    def run(image):
        variables = model.init({"params": KEY, "dropout": KEY}, image, train=False)
        return model.apply(variables, image, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, name: m.name == "padnet")

    (_, aux), state = run(image)
    initial = state["intermediates"]["padnet"]["__call__"][0][1]["depth/side/initial"]
    assert initial.shape[1:3] == (2, 2)
    np.testing.assert_allclose(aux["depth/side/initial"],
                               resize_bilinear(initial, (64, 64), align_corners=True),
                               rtol=1e-5, atol=1e-6)


# ------------------------- XTasC-Net decoders and TTNets, MTAN's attention: aligned corners
def _record_resizes(monkeypatch, module_names):
    """Wrap ``resize_bilinear`` where each module looks it up; returns the list of calls
    ``(module, input (h, w), output (h, w), align_corners)`` made while tracing."""
    import importlib

    calls = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        real = module.resize_bilinear

        def recording(x, size, *, align_corners=False, _real=real, _name=module_name):
            calls.append((_name.rsplit(".", 1)[-1], tuple(x.shape[1:3]),
                          tuple(int(s) for s in size), align_corners))
            return _real(x, size, align_corners=align_corners)

        monkeypatch.setattr(module, "resize_bilinear", recording)
    return calls


def _trace_init(model, image):
    # eval_shape traces init (every resize is called) without compiling or computing.
    return jax.eval_shape(lambda: model.init({"params": KEY, "dropout": KEY}, image,
                                             train=False))


def test_xtasc_decoders_and_ttnets_resize_with_aligned_corners(monkeypatch):
    calls = _record_resizes(monkeypatch, ["mtl_jax.models.decoders.unet",
                                          "mtl_jax.models.interaction.ttnet"])
    model = build_model(dict(architecture="xtasc", encoder="resnet18",
                             encoder_kwargs=dict(width=4),
                             decoder_kwargs=dict(features=4, hidden_features=4),
                             ttnet_kwargs=dict(features=(4, 4, 4))), {"semseg": 3, "depth": 1})
    _trace_init(model, jnp.zeros((1, 32, 64, 3)))
    # Each decoder: four x2 steps onto the skips (stride 32 -> 2), then the stem's size to the
    # output (x2); each TTNet: its three x2 steps back to 32x64.
    decoder = [((1, 2), (2, 4)), ((2, 4), (4, 8)), ((4, 8), (8, 16)), ((8, 16), (16, 32)),
               ((16, 32), (32, 64))]
    ttnet = [((4, 8), (8, 16)), ((8, 16), (16, 32)), ((16, 32), (32, 64))]
    assert sorted(calls) == sorted([("unet", i, o, True) for i, o in decoder] * 2
                                   + [("ttnet", i, o, True) for i, o in ttnet] * 2)


def test_mtan_attention_upsamples_with_aligned_corners(monkeypatch):
    calls = _record_resizes(monkeypatch, ["mtl_jax.models.interaction.mtan"])
    model = build_model(dict(architecture="segnet_mtan", width=4), {"semseg": 3, "depth": 1})
    _trace_init(model, jnp.zeros((1, 32, 32, 3)))
    # Per task, the five decoder levels: 1x1 -> 2x2 -> ... -> 32x32.
    steps = [((s, s), (2 * s, 2 * s), True) for s in (1, 2, 4, 8, 16)]
    assert sorted(calls) == sorted([("mtan", *c) for c in steps] * 2)
