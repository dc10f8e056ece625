"""DenseMTL's self-supervised depth setting (Cityscapes SDE): the pose network, the 3-ways
heads with Monodepth2's regression side outputs at their own resolution, per-task decoder
options, and parameter counts equal to the reference's module trees."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from mtl_jax.config_utils import load_config
from mtl_jax.errors import UserError
from mtl_jax.models import build_model, count_params
from mtl_jax.models.architectures.posenet import (
    build_pose_network,
    init_pose_network,
    pose_pair,
)
from mtl_jax.models.decoders.pose import PoseDecoder
from mtl_jax.models.decoders.three_ways import ThreeWaysDecoder
from mtl_jax.params_report import param_counts

KEY = jax.random.key(0)
SDE_TASKS = {"semseg": 16, "disp": 1}  # the released config: 16 classes, 1 disparity channel
DECODER_CHANNELS = (64, 128, 128, 256, 256)  # num_ch_dec, index = stage


def sde_model_config(model: str, width: int = 64) -> dict:
    """``config.model`` of the released SDE config's network (resnet101_ours_SD.yml) for
    ``model`` = 3ways | 3ways_padnet | 3ways_mteb: ResNet-101 (last stage dilated), 'padnet+'
    heads (ASPP 6/12/18, num_ch_dec scaled by width / 64), semseg active scales [0, 2] (1x1
    sides), disp [0, 1, 2, 3] (is_regression: 3x3 sides + sigmoid, at their own resolution);
    3ways_mteb: the mTEB at stage 1 (ablation [SA, SxTAM, add]); 3ways_padnet: PAD-Net's
    distillation after stage 2 (the reference's PadnetPlus, enc_1st_layers=[4, 3, 2])."""
    channels = tuple(max(4, c * width // 64) for c in DECODER_CHANNELS)
    config = dict(
        encoder="resnet101",
        encoder_kwargs=dict(width=width, replace_stride_with_dilation=(False, False, True)),
        decoder="three_ways", decoder_kwargs=dict(channels=channels, aspp_rates=(6, 12, 18)),
        decoder_kwargs_by_task=dict(
            semseg=dict(side_scales=(2,)),
            disp=dict(side_scales=(1, 2, 3), regression=True, resize_sides=False)),
        pixel_mean=(0.45, 0.45, 0.45), pixel_std=(0.225, 0.225, 0.225))
    if model == "3ways_mteb":
        config["exchange"] = dict(name="mteb", stages=(1,), fusion="add", attention="spatial")
    elif model == "3ways_padnet":
        config["exchange"] = dict(name="padnet", stages=(2,))
    elif model != "3ways":
        raise ValueError(model)
    return config


def _shapes(module, *args, **kwargs):
    return jax.eval_shape(lambda: module.init({"params": KEY, "dropout": KEY}, *args, **kwargs))


# ------------------------------------------------------------------ reference module arithmetic
def conv_params(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn_params(c):
    return 2 * c  # weight, bias (running statistics are buffers)


def basic_block(cin, c, stride):
    """torchvision BasicBlock: conv3x3-BN-conv3x3-BN, downsample 1x1+BN when the shape changes."""
    n = conv_params(cin, c, 3) + bn_params(c) + conv_params(c, c, 3) + bn_params(c)
    if stride != 1 or cin != c:
        n += conv_params(cin, c, 1) + bn_params(c)
    return n


def reference_pose_network_params():
    """models/posenet.py: ResnetEncoder(18, num_input_images=2) with remove_resnet_tail_ (no
    avgpool/fc) + PoseDecoder(num_ch_enc, num_input_features=1, num_frames_to_predict_for=2)."""
    encoder = conv_params(2 * 3, 64, 7) + bn_params(64)
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512)):
        encoder += basic_block(cin, c, 1 if stage == 0 else 2) + basic_block(c, c, 1)
        cin = c
    decoder = (conv_params(512, 256, 1, bias=True)  # squeeze
               + conv_params(256, 256, 3, bias=True)  # pose 0
               + conv_params(256, 256, 3, bias=True)  # pose 1
               + conv_params(256, 6 * 2, 1, bias=True))  # pose 2: 6 x num_frames_to_predict_for
    return encoder, decoder


def reference_head_trunk(enc=(64, 256, 512, 1024, 2048), dec=DECODER_CHANNELS):
    """vendor/monodepth2/decoder.py DecoderHead(intermediate_aspp=True) without its side convs:
    ASPP (three_ways/model_parts.py: 1x1, three atrous 3x3 and the pooling branch, each conv
    without bias + BN; project 1x1 + BN) and the ConvBlocks (Conv3x3 with bias)."""
    aspp = (2 * (conv_params(enc[4], dec[4], 1) + bn_params(dec[4]))
            + 3 * (conv_params(enc[4], dec[4], 3) + bn_params(dec[4]))
            + conv_params(5 * dec[4], dec[4], 1) + bn_params(dec[4]))
    blocks = conv_params(dec[4] + enc[3], dec[4], 3, bias=True)  # ('upconv', 4, 1)
    for i in (3, 2, 1):
        blocks += conv_params(dec[i + 1], dec[i], 3, bias=True)
        blocks += conv_params(dec[i] + enc[i - 1], dec[i], 3, bias=True)
    blocks += conv_params(dec[1], dec[0], 3, bias=True) + conv_params(dec[0], dec[0], 3, bias=True)
    return aspp + blocks


def reference_sides(out, scales, regression, dec=DECODER_CHANNELS):
    """The side convs at ``active_scales``: 1x1 Conv2d, or Conv3x3 with bias (is_regression)."""
    return sum(conv_params(dec[s], out, 3 if regression else 1, bias=True) for s in scales)


def reference_mteb_two_tasks(ch=128):
    """models/ours_xatt.py at one stage, 2 tasks, ablation [SA, SxTAM, add]: per ordered pair
    Extractor (3x3 + bias), SABlock(ch, ch/2) (two 3x3 without bias), SxTAM (three 1x1 + BN,
    alpha [ch]), proj Project(1.5 ch, ch); per target post Project(ch, ch)."""
    pair = (conv_params(ch, ch, 3, bias=True) + 2 * conv_params(ch, ch // 2, 3)
            + 3 * (conv_params(ch, ch, 1) + bn_params(ch)) + ch
            + conv_params(ch + ch // 2, ch, 1) + bn_params(ch))
    post = conv_params(ch, ch, 1) + bn_params(ch)
    return 2 * (pair + post)


# ----------------------------------------------------------------------------- parameter counts
def test_pose_network_count_equals_the_reference():
    enc, dec = reference_pose_network_params()
    # torchvision's resnet18 has 11,689,512 parameters: minus fc (512 x 1000 + 1000), plus
    # 3 more input channels in conv1 (64 x 3 x 7 x 7).
    assert enc == 11_689_512 - 513_000 + 9_408
    config = ml_collections.ConfigDict(dict(sde=dict(pose=dict(encoder="resnet18", width=64))))
    network = build_pose_network(config)
    counts = count_params(jax.eval_shape(
        lambda: init_pose_network(network, KEY, (64, 64)))["params"])
    assert counts == {"encoder": enc, "decoder": dec, "total": enc + dec}
    assert counts["total"] == 12_500_492


def test_the_head_arithmetic_agrees_with_the_densemtl_head_count():
    # tests/test_densemtl.py: the depth head (1 channel, sides 0 and 1) has 22,061,634.
    assert reference_head_trunk() + reference_sides(1, (0, 1), False) == 22_061_634
    assert reference_mteb_two_tasks() == 773_120  # test_densemtl: S-D, stage 1


@pytest.mark.parametrize("model", ["3ways", "3ways_padnet", "3ways_mteb"])
def test_sde_model_counts_equal_the_reference(model):
    """Through the config users run (what ``mtl-jax params`` prints), the released setting."""
    config = load_config(os.path.join(REPO, "configs", "densemtl_sde.py"),
                         f"dataset=cityscapes_seq,model={model}")
    counts = param_counts(config)
    # the helper above builds the same network
    assert counts["model total"] == count_params(_shapes(
        build_model(sde_model_config(model), SDE_TASKS), jnp.zeros((1, 64, 64, 3)),
        train=False)["params"])["total"]
    trunk = reference_head_trunk()
    semseg = trunk + reference_sides(16, (0, 2), regression=False)
    disp = trunk + reference_sides(1, (0, 1, 2, 3), regression=True)
    assert counts["encoder"] == 42_500_160  # ResNet-101 without fc (test_densemtl)
    assert counts["decoders/semseg"] == semseg
    assert counts["decoders/disp"] == disp
    exchange = {"3ways": {},
                # PadnetPlus: MultiTaskDistillationModule(tasks, tasks, 128): one SABlock(128,
                # 128) (two 3x3 convs without bias) per ordered pair.
                "3ways_padnet": {"exchange_stage2": 2 * 2 * conv_params(128, 128, 3)},
                "3ways_mteb": {"exchange_stage1": reference_mteb_two_tasks()}}[model]
    for part, n in exchange.items():
        assert counts[part] == n
    model_total = 42_500_160 + semseg + disp + sum(exchange.values())
    assert counts["model total"] == model_total
    enc, dec = reference_pose_network_params()
    assert counts["pose_net/encoder"] == enc and counts["pose_net/decoder"] == dec
    assert counts["total"] == model_total + enc + dec


def test_params_report_lists_the_pose_network():
    config = ml_collections.ConfigDict(dict(
        input_size=(32, 48), tasks=dict(semseg=dict(num_classes=5), depth=dict()),
        task_order=["semseg", "depth"], weighting=dict(name="ew"),
        model=dict(encoder="resnet18", encoder_kwargs=dict(width=4), decoder="three_ways",
                   decoder_kwargs=dict(channels=(4, 8, 8, 8, 8)))))
    plain = param_counts(config)
    assert not any(k.startswith("pose_net") for k in plain)
    config.sde = dict(pose=dict(encoder="resnet18", width=64))
    counts = param_counts(config)
    enc, dec = reference_pose_network_params()
    assert counts["pose_net/encoder"] == enc and counts["pose_net/decoder"] == dec
    assert counts["model total"] == plain["total"]
    assert counts["total"] == plain["total"] + enc + dec


# --------------------------------------------------------------------------------- pose network
def _conv(x, kernel, bias, pad):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def test_pose_decoder_by_hand():
    decoder = PoseDecoder(features=8)
    feature = jax.random.normal(jax.random.key(1), (2, 3, 5, 16))
    variables = decoder.init(KEY, feature)
    p = variables["params"]
    axisangle, translation = decoder.apply(variables, feature)
    x = jax.nn.relu(_conv(feature, p["squeeze"]["kernel"], p["squeeze"]["bias"], 0))
    x = jax.nn.relu(_conv(x, p["pose_0"]["kernel"], p["pose_0"]["bias"], 1))
    x = jax.nn.relu(_conv(x, p["pose_1"]["kernel"], p["pose_1"]["bias"], 1))
    out = 0.01 * _conv(x, p["pose_2"]["kernel"], p["pose_2"]["bias"], 0).mean(axis=(1, 2))
    assert p["pose_2"]["kernel"].shape == (1, 1, 8, 12)
    assert axisangle.shape == translation.shape == (2, 2, 3)
    # view(-1, 2, 1, 6): frame j's motion is channels 6j .. 6j + 5, axis-angle first.
    np.testing.assert_allclose(axisangle, out.reshape(2, 2, 6)[..., :3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(translation[:, 1], out[:, 9:12], rtol=1e-5, atol=1e-7)


def test_pose_network_standardises_and_returns_the_first_motion():
    config = ml_collections.ConfigDict(dict(sde=dict(pose=dict(width=4, decoder_features=8))))
    network = build_pose_network(config)
    variables = init_pose_network(network, KEY, (32, 48))
    assert variables["params"]["encoder"]["conv1"]["kernel"].shape == (7, 7, 6, 4)
    pair = jax.random.uniform(jax.random.key(2), (2, 32, 48, 6))
    axisangle, translation = network.apply(variables, pair, train=False)
    assert axisangle.shape == translation.shape == (2, 3)
    enc = {k: v["encoder"] for k, v in variables.items()}
    features = network.encoder.apply(enc, (pair - 0.45) / 0.225, train=False)
    aa, tr = network.decoder.apply({"params": variables["params"]["decoder"]}, features[-1])
    np.testing.assert_allclose(axisangle, aa[:, 0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(translation, tr[:, 0], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"\[B, H, W, 6\]"):
        network.apply(variables, pair[..., :3], train=False)


def test_pose_pair_keeps_the_temporal_order():
    centre, prev = jnp.zeros((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))
    np.testing.assert_array_equal(pose_pair(centre, prev, -1)[..., :3], prev)
    np.testing.assert_array_equal(pose_pair(centre, prev, 1)[..., :3], centre)
    with pytest.raises(ValueError, match="neighbour"):
        pose_pair(centre, prev, 0)


def test_pose_config_errors():
    for pose, match in ((dict(encoder="vgg"), "sde.pose.encoder"), (dict(width=0), "width"),
                        (dict(depth=18), "unknown keys")):
        config = ml_collections.ConfigDict(dict(sde=dict(pose=pose)))
        with pytest.raises(UserError, match=match):
            build_pose_network(config)


# ---------------------------------------------------------------- 3-ways heads for the SDE loss
def _features(width=4, h=32, w=48):
    """ResNet-18-like features of a 32x48 image with the last stage dilated (s2..s16)."""
    keys = jax.random.split(jax.random.key(3), 5)
    sizes = [(h // 2, w // 2), (h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16),
             (h // 16, w // 16)]
    chans = [width, width, 2 * width, 4 * width, 8 * width]
    return [jax.random.normal(k, (1, *s, c)) for k, s, c in zip(keys, sizes, chans, strict=True)]


def test_regression_sides_at_their_own_resolution():
    features = _features()
    decoder = ThreeWaysDecoder(out_channels=1, channels=(4, 8, 8, 8, 8), side_scales=(1, 2, 3),
                               regression=True, resize_sides=False)
    variables = decoder.init({"params": KEY, "dropout": KEY}, features, (32, 48), train=False)
    assert variables["params"]["out_3"]["kernel"].shape == (3, 3, 8, 1)
    (pred, aux), state = decoder.apply(variables, features, (32, 48), train=False,
                                       capture_intermediates=True, mutable=["intermediates"])
    assert pred.shape == (1, 32, 48, 1)
    for k in (1, 2, 3):
        assert aux[f"side/{k}"].shape == (1, 32 // 2**k, 48 // 2**k, 1)
    # Side 2 by hand: sigmoid(3x3 conv with bias of the reflection-padded stage-2 output).
    stage2 = state["intermediates"]["upconv_2_1"]["__call__"][0]
    p = variables["params"]["out_2"]
    padded = jnp.pad(stage2, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = jax.nn.sigmoid(_conv(padded, p["kernel"], p["bias"], 0))
    np.testing.assert_allclose(aux["side/2"], want, rtol=1e-5, atol=1e-6)
    assert float(pred.min()) > 0.0 and float(pred.max()) < 1.0
    # The classification default is unchanged: 1x1 sides resized to the output size.
    plain = ThreeWaysDecoder(out_channels=3, channels=(4, 8, 8, 8, 8), side_scales=(2,))
    v = plain.init({"params": KEY, "dropout": KEY}, features, (32, 48), train=False)
    assert v["params"]["out_2"]["kernel"].shape == (1, 1, 8, 3)
    _, aux = plain.apply(v, features, (32, 48), train=False)
    assert aux["side/2"].shape == (1, 32, 48, 3)


@pytest.mark.parametrize("model", ["3ways", "3ways_padnet", "3ways_mteb"])
def test_per_task_heads_in_the_sde_model(model):
    config = sde_model_config(model, width=4)
    config.update(encoder="resnet18")
    net = build_model(config, SDE_TASKS)
    (preds, aux), variables = jax.eval_shape(lambda: net.init_with_output(
        {"params": KEY, "dropout": KEY}, jnp.zeros((2, 32, 48, 3)), train=False))
    assert preds["semseg"].shape == (2, 32, 48, 16) and preds["disp"].shape == (2, 32, 48, 1)
    assert aux["semseg/side/2"].shape == (2, 32, 48, 16)  # resized (CE on the label size)
    assert "semseg/side/1" not in aux
    for k in (1, 2, 3):  # native resolution for the self-supervised depth loss
        assert aux[f"disp/side/{k}"].shape == (2, 32 // 2**k, 48 // 2**k, 1)
    heads = variables["params"]["decoders"]
    assert set(heads["semseg"]) >= {"out_0", "out_2"} and "out_1" not in heads["semseg"]
    assert heads["disp"]["out_1"]["kernel"].shape[:2] == (3, 3)


def test_decoder_kwargs_by_task_names_model_tasks():
    config = dict(sde_model_config("3ways", width=4), encoder="resnet18")
    config["decoder_kwargs_by_task"] = dict(depth=dict(regression=True))
    with pytest.raises(ValueError, match=r"decoder_kwargs_by_task names \['depth'\]"):
        build_model(config, SDE_TASKS)
