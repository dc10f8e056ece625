"""Model shape, parameter-count and API tests (small inputs, big models only via eval_shape)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.models import (
    DECODERS,
    ENCODERS,
    MultiTaskModel,
    build_model,
    count_params,
    encoder_out_channels,
    format_param_table,
)
from mtl_jax.models.decoders import UNetDecoder
from mtl_jax.models.layers import conv, resize_bilinear, upsample_nearest

KEY = jax.random.key(0)
TINY_CFG = {
    "encoder": "resnet18",
    "encoder_kwargs": {"width": 8},
    "decoder": "unet",
    "decoder_kwargs": {"features": 8, "convs_per_block": 1},
}
TASKS = {"semseg": 7, "depth": 1}


def _num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_176_512),
        ("resnet34", 21_284_672),
        ("resnet50", 23_508_032),
        ("resnet101", 42_500_160),
    ],
)
def test_resnet_param_counts_match_torchvision(name, expected):
    encoder = ENCODERS[name]()
    variables = jax.eval_shape(lambda: encoder.init(KEY, jnp.zeros((1, 64, 64, 3)), train=False))
    assert _num_params(variables["params"]) == expected
    # Running statistics are state, not trainable parameters.
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize(
    "dilation, strides",
    [((False, False, False), [2, 4, 8, 16, 32]), ((False, False, True), [2, 4, 8, 16, 16])],
)
def test_resnet_feature_shapes_and_strides(dilation, strides):
    encoder = ENCODERS["resnet18"](width=8, replace_stride_with_dilation=dilation)
    features, _ = jax.eval_shape(
        lambda: encoder.init_with_output(KEY, jnp.zeros((1, 64, 64, 3)), train=False)
    )
    channels = encoder_out_channels("resnet18", width=8)
    assert channels == [8, 8, 16, 32, 64]
    assert encoder.strides == strides
    assert [f.shape for f in features] == [
        (1, 64 // s, 64 // s, c) for s, c in zip(strides, channels, strict=True)
    ]


def test_out_channels_bottleneck():
    assert encoder_out_channels("resnet50") == [64, 256, 512, 1024, 2048]
    assert encoder_out_channels("resnet101", width=16) == [16, 64, 128, 256, 512]


@pytest.mark.parametrize("out_channels, expected", [(7, 3_250_688), (1, 3_249_920)])
def test_unet_decoder_param_counts_xtasc(out_channels, expected):
    decoder = DECODERS["unet"](features=128, convs_per_block=3, out_channels=out_channels)
    channels = encoder_out_channels("resnet34")

    def init():
        features = [
            jnp.zeros((1, 64 // 2 ** (i + 1), 64 // 2 ** (i + 1), c))
            for i, c in enumerate(channels)
        ]
        return decoder.init(KEY, features, (64, 64), train=False)

    assert _num_params(jax.eval_shape(init)["params"]) == expected


def test_unet_with_dilated_encoder_and_odd_size():
    encoder = ENCODERS["resnet18"](width=8, replace_stride_with_dilation=(False, True, True))
    decoder = UNetDecoder(features=8, convs_per_block=1, out_channels=3)

    def run():
        features, _ = encoder.init_with_output(KEY, jnp.zeros((1, 37, 50, 3)), train=False)
        return decoder.init_with_output(KEY, features, (37, 50), train=False)[0]

    pred, aux = jax.eval_shape(run)
    assert pred.shape == (1, 37, 50, 3) and pred.dtype == jnp.float32
    assert aux == {}


def test_resize_helpers():
    x = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    up = resize_bilinear(x, (1, 4))
    # PyTorch F.interpolate(mode='bilinear', align_corners=False) gives these values.
    np.testing.assert_allclose(up[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0])
    assert resize_bilinear(x, (1, 2)) is x
    assert upsample_nearest(jnp.ones((2, 3, 5, 4)), 2).shape == (2, 6, 10, 4)


def test_resize_bilinear_align_corners_hand_computed():
    # align_corners=True: output i samples the input at i*(n_in-1)/(n_out-1).
    x = jnp.array([0.0, 3.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(resize_bilinear(x, (1, 4), align_corners=True)[0, 0, :, 0],
                               [0.0, 1.0, 2.0, 3.0], atol=1e-6)
    # Half-pixel centres on the same input: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    np.testing.assert_allclose(resize_bilinear(x, (1, 4))[0, 0, :, 0],
                               [0.0, 0.75, 2.25, 3.0], atol=1e-6)
    # 3 -> 5, both axes at once: sources 0, .5, 1, 1.5, 2 (PyTorch align_corners=True values).
    row = jnp.array([0.0, 2.0, 10.0])
    img = (row[:, None] + 100.0 * row[None, :]).reshape(1, 3, 3, 1)
    out = resize_bilinear(img, (5, 5), align_corners=True)[0, :, :, 0]
    expected_1d = np.array([0.0, 1.0, 2.0, 6.0, 10.0])
    np.testing.assert_allclose(out, expected_1d[:, None] + 100.0 * expected_1d[None, :],
                               rtol=1e-6)
    # Downsampling 5 -> 3 keeps the corners; one output pixel samples the first input pixel.
    line = jnp.arange(5.0).reshape(1, 1, 5, 1)
    np.testing.assert_allclose(resize_bilinear(line, (1, 3), align_corners=True)[0, 0, :, 0],
                               [0.0, 2.0, 4.0])
    np.testing.assert_allclose(resize_bilinear(line, (1, 1), align_corners=True)[0, 0, :, 0],
                               [0.0])


def test_bias_free_1x1_conv_commutes_with_bilinear_resize():
    # The UNet head relies on this to run its 1x1 conv before the last upsampling.
    head = conv(3, 1, use_bias=False)
    x = jax.random.normal(KEY, (1, 5, 7, 6))
    params = head.init(KEY, x)
    a = head.apply(params, resize_bilinear(x, (11, 13)))
    b = resize_bilinear(head.apply(params, x), (11, 13))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = build_model(TINY_CFG, TASKS)
    image = jax.random.uniform(KEY, (2, 32, 48, 3))
    variables = model.init(KEY, image, train=False)
    return model, variables, image


def test_multitask_output_shapes_and_tree(tiny):
    model, variables, image = tiny
    assert isinstance(model, MultiTaskModel) and model.tasks == ("semseg", "depth")
    preds, aux = model.apply(variables, image, train=False)
    assert list(preds) == ["semseg", "depth"]
    assert preds["semseg"].shape == (2, 32, 48, 7)
    assert preds["depth"].shape == (2, 32, 48, 1)
    assert all(p.dtype == jnp.float32 for p in preds.values())
    assert aux == {}
    params = variables["params"]
    assert set(params) == {"encoder", "decoders"}
    assert set(params["decoders"]) == {"semseg", "depth"}
    assert set(variables["batch_stats"]["decoders"]) == {"semseg", "depth"}
    assert "conv1" in params["encoder"] and "layer4_1" in params["encoder"]
    assert params["decoders"]["semseg"]["head"]["kernel"].shape == (1, 1, 8, 7)

    counts = count_params(params)
    assert list(counts) == ["encoder", "decoders/semseg", "decoders/depth", "total"]
    assert (
        counts["total"]
        == _num_params(params)
        == counts["encoder"] + counts["decoders/semseg"] + counts["decoders/depth"]
    )
    assert count_params(variables) == counts
    table = format_param_table(counts)
    assert "decoders/semseg" in table and f"{counts['total']:,}" in table


def test_train_mode_updates_batch_stats(tiny):
    model, variables, image = tiny
    (preds, _), updates = model.apply(variables, image, train=True, mutable=["batch_stats"])
    assert preds["depth"].shape == (2, 32, 48, 1)
    old = variables["batch_stats"]["encoder"]["bn1"]["mean"]
    new = updates["batch_stats"]["encoder"]["bn1"]["mean"]
    assert not np.allclose(old, new)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(variables, image, train=True)  # train mode must be allowed to write them


def test_encode_decode_equals_call(tiny):
    model, variables, image = tiny
    preds, _ = model.apply(variables, image, train=False)
    features = model.apply(variables, image, train=False, method=model.encode)
    assert len(features) == 5
    preds2, _ = model.apply(variables, features, image.shape[1:3], train=False, method=model.decode)
    for task in TASKS:
        np.testing.assert_allclose(preds[task], preds2[task], rtol=1e-6, atol=1e-6)


def test_bfloat16_model_has_float32_params_and_outputs():
    model = build_model({**TINY_CFG, "dtype": "bfloat16"}, TASKS)
    image = jnp.zeros((1, 32, 32, 3))
    (preds, _), variables = jax.eval_shape(lambda: model.init_with_output(KEY, image, train=False))
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert all(p.dtype == jnp.float32 for p in preds.values())
    features = jax.eval_shape(
        lambda: model.apply(
            model.init(KEY, image, train=False), image, train=False, method=model.encode
        )
    )
    assert all(f.dtype == jnp.bfloat16 for f in features)


def test_single_task_model_and_bad_names():
    model = build_model(TINY_CFG, {"depth": 1})
    params = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
    assert list(count_params(params)) == ["encoder", "decoders/depth", "total"]
    with pytest.raises(ValueError, match="resnet18"):
        build_model({**TINY_CFG, "encoder": "vgg"}, TASKS)
    with pytest.raises(ValueError, match="unet"):
        build_model({**TINY_CFG, "decoder": "fpn"}, TASKS)


class _ScaleFeatures(nn.Module):
    """Stand-in interaction module: per-task scaled copies of the shared features."""

    tasks: tuple[str, ...]

    @nn.compact
    def __call__(self, features, train):
        alpha = self.param("alpha", nn.initializers.ones, (len(self.tasks),))
        per_task = {t: [f * alpha[i] for f in features] for i, t in enumerate(self.tasks)}
        return per_task, {"alpha": alpha}


def test_interaction_module_keeps_its_name_and_namespaces_aux():
    base = build_model(TINY_CFG, TASKS)
    model = MultiTaskModel(
        encoder=base.encoder,
        decoders=base.decoders,
        interaction=_ScaleFeatures(tuple(TASKS), name="exchange"),
    )
    (preds, aux), variables = jax.eval_shape(
        lambda: model.init_with_output(KEY, jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert set(variables["params"]) == {"encoder", "decoders", "exchange"}
    assert list(aux) == ["exchange/alpha"]
    assert count_params(variables["params"])["exchange"] == 2
    assert preds["semseg"].shape == (1, 32, 32, 7)


def test_architecture_registry_default_and_unknown():
    from mtl_jax.models import ARCHITECTURES

    assert "multitask" in ARCHITECTURES
    assert isinstance(build_model(TINY_CFG, TASKS), MultiTaskModel)
    assert isinstance(build_model({**TINY_CFG, "architecture": "multitask"}, TASKS),
                      MultiTaskModel)
    with pytest.raises(ValueError, match="unknown model architecture 'nope'; valid: .*multitask"):
        build_model({**TINY_CFG, "architecture": "nope"}, TASKS)
