"""``--from=densemtl`` on a self-supervised depth checkpoint (the reference's MultiSetup:
``main.*`` = OursAtt with a regression disparity head, ``monodepth.pose_net.*`` = the pose
network): every array lands once, in the model or in the file's ``pose_net/`` subtree."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from densemtl_reference import Head, StateDict, ours_att, resnet18

from mtl_jax.errors import UserError
from mtl_jax.models import build_model, converters
from mtl_jax.models.architectures.posenet import build_pose_network, init_pose_network
from mtl_jax.models.converters.densemtl import convert_densemtl

TASKS = {"semseg": 5, "disp": 1}
ENC = (4, 4, 8, 16, 32)  # ResNet-18 at width 4: stem, layer1..4 (num_ch_enc)
DEC = (4, 8, 8, 8, 8)  # num_ch_dec, index = stage
SCALES = {"semseg": (0, 2), "disp": (0, 1, 2, 3)}  # the released config's active_scales
MODEL = dict(encoder="resnet18", encoder_kwargs=dict(
    width=4, replace_stride_with_dilation=(False, False, True)), decoder="three_ways",
    decoder_kwargs=dict(channels=DEC), decoder_kwargs_by_task=dict(
        semseg=dict(side_scales=(2,)),
        disp=dict(side_scales=(1, 2, 3), regression=True, resize_sides=False)),
    exchange=dict(name="mteb", stages=(1,)))
POSE = ml_collections.ConfigDict(dict(sde=dict(pose=dict(encoder="resnet18", width=4))))


def reference_sde_state_dict(seed=0, pose_net=True):
    """The state_dict names of the released setup 'ours-cxatt_monodepth' (training/__init__.py
    get_setup -> MultiSetup(main=OursAtt(ResnetEncoder, {t: DecoderHead}, ablation=[SA, SxTAM,
    add], stages=[1]), monodepth=Monodepth(PoseNetwork, imnet_encoder=None))), written from
    the reference's modules; shapes at widths ENC / DEC and a 256-channel pose decoder."""
    f = StateDict(seed, variances="uniform", batches_tracked=7)
    # disp is_regression: its sides are Conv3x3(num_ch_dec[i], 1) = ReflectionPad + conv.
    heads = {t: Head(out, SCALES[t], regression=t == "disp") for t, out in TASKS.items()}
    ours_att(f, "main.", heads, ENC, DEC)
    if pose_net:
        p = "monodepth.pose_net."
        resnet18(f, p + "encoder.encoder.", ENC, 6)  # ResNetMultiImageInput(num_input_images=2)
        # PoseDecoder(num_ch_enc, 1, 2).net = [squeeze, pose 0, pose 1, pose 2].
        f.conv(p + "decoder.net.0", 256, ENC[4], 1, bias=True)
        f.conv(p + "decoder.net.1", 256, 256, 3, bias=True)
        f.conv(p + "decoder.net.2", 256, 256, 3, bias=True)
        f.conv(p + "decoder.net.3", 12, 256, 1, bias=True)
    return f.sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from mtl_jax.main import main

    sd = reference_sde_state_dict()
    d = tmp_path_factory.mktemp("sde")
    src, dst = d / "ref.npz", d / "ours.npz"
    np.savez(src, **sd)
    assert main(["convert-weights", "--from=densemtl", str(src), str(dst)]) == 0
    return sd, dst


def _abstract(module, *args, **kwargs):
    return jax.eval_shape(lambda: module.init({"params": jax.random.key(0),
                                               "dropout": jax.random.key(0)}, *args, **kwargs))


def test_the_model_part_fills_the_sde_model(converted):
    sd, dst = converted
    flat = converters.load_variables(dst)
    assert not any(k.startswith("pose_net/") for k in flat)
    shapes = _abstract(build_model(MODEL, TASKS), jnp.zeros((1, 32, 48, 3)), train=False)
    params, _ = converters.apply_variables(shapes["params"], shapes["batch_stats"], flat)
    heads = params["decoders"]
    # disp: the is_regression 3x3 side convs at scales 0..3, in active_scales order.
    np.testing.assert_array_equal(
        heads["disp"]["out_2"]["kernel"],
        np.transpose(sd["main.heads.disp.decoder.16.conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(heads["disp"]["out_3"]["bias"],
                                  sd["main.heads.disp.decoder.17.conv.bias"])
    # semseg: the 1x1 sides at scales 0 and 2 (decoder.15 is scale 2, not 1).
    assert heads["semseg"]["out_2"]["kernel"].shape == (1, 1, DEC[2], 5)
    np.testing.assert_array_equal(
        heads["semseg"]["out_2"]["kernel"][0, 0],
        sd["main.heads.semseg.decoder.15.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(
        params["exchange_stage1"]["semseg_to_disp"]["alpha"],
        sd["main.m.disp.1.SxTAM_semseg.alpha"].reshape(-1))


def _converted_pose_network(dst):
    """``(network, params, batch_stats)``: the pose network of ``POSE`` loaded from the
    converted file's ``pose_net/`` part, strictly (every leaf, every shape)."""
    flat = converters.load_variables(dst, part="pose_net")
    network = build_pose_network(POSE)
    shapes = jax.eval_shape(lambda: init_pose_network(network, jax.random.key(0), (32, 48)))
    params, stats = converters.apply_variables(shapes["params"], shapes["batch_stats"], flat)
    return network, params, stats


def test_the_pose_part_fills_the_pose_network(converted):
    sd, dst = converted
    _, params, stats = _converted_pose_network(dst)
    p = "monodepth.pose_net."
    np.testing.assert_array_equal(params["encoder"]["conv1"]["kernel"],
                                  np.transpose(sd[p + "encoder.encoder.conv1.weight"],
                                               (2, 3, 1, 0)))
    assert params["encoder"]["conv1"]["kernel"].shape == (7, 7, 6, 4)
    np.testing.assert_array_equal(stats["encoder"]["layer2_0"]["downsample_bn"]["var"],
                                  sd[p + "encoder.encoder.layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(params["decoder"]["pose_0"]["kernel"],
                                  np.transpose(sd[p + "decoder.net.1.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(params["decoder"]["pose_2"]["bias"],
                                  sd[p + "decoder.net.3.bias"])


def _reference_pose_decoder(sd, feature_BxCxhxw):
    """Monodepth2's PoseDecoder.forward in NCHW on the reference's OIHW arrays."""
    def conv(x, i, pad):
        w, b = sd[f"monodepth.pose_net.decoder.net.{i}.weight"], \
            sd[f"monodepth.pose_net.decoder.net.{i}.bias"]
        y = jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                         precision="highest")
        return y + b[None, :, None, None]

    x = jax.nn.relu(conv(feature_BxCxhxw, 0, 0))
    x = jax.nn.relu(conv(x, 1, 1))
    x = jax.nn.relu(conv(x, 2, 1))
    out = 0.01 * conv(x, 3, 0).mean(3).mean(2).reshape(-1, 2, 1, 6)
    return out[..., :3], out[..., 3:]


def test_the_converted_pose_decoder_computes_the_reference(converted):
    sd, dst = converted
    network, params, _ = _converted_pose_network(dst)
    feature = np.random.default_rng(1).standard_normal((2, 3, 4, ENC[4])).astype(np.float32)
    aa, tr = network.decoder.apply({"params": params["decoder"]}, jnp.asarray(feature))
    ref_aa, ref_tr = _reference_pose_decoder(sd, jnp.asarray(feature.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(aa, ref_aa[:, :, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tr, ref_tr[:, :, 0], rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(ref_tr)).max() > 1e-3  # not trivially zero


def test_active_scales_option_and_errors(tmp_path):
    sd = reference_sde_state_dict(seed=2)
    default = convert_densemtl(sd)
    explicit = convert_densemtl(sd, active_scales="semseg:0,2;disp:0,1,2,3")
    assert default.keys() == explicit.keys()
    with pytest.raises(UserError, match=r"heads.semseg has 2 side conv\(s\).*\[0, 1, 2\]"):
        convert_densemtl(sd, active_scales="semseg:0,1,2;disp:0,1,2,3")
    with pytest.raises(UserError, match="every head"):
        convert_densemtl(sd, active_scales="semseg:0,2")
    with pytest.raises(UserError, match="side conv"):
        convert_densemtl(sd, active_scales="0,1")
    extra = dict(sd, **{"monodepth.other.weight": np.zeros((1,), np.float32)})
    with pytest.raises(UserError, match="not mapped"):
        convert_densemtl(extra)
    # The frozen ImageNet encoder of the reference's feature_dist option is dropped.
    frozen = dict(sd, **{"monodepth.imnet_encoder.encoder.conv1.weight":
                         np.zeros((4, 3, 7, 7), np.float32)})
    assert convert_densemtl(frozen).keys() == default.keys()
    # Without the pose network: no pose_net subtree, and asking for it is one clear line.
    plain = tmp_path / "plain.npz"
    np.savez(plain, **convert_densemtl(reference_sde_state_dict(seed=3, pose_net=False)))
    assert converters.load_variables(plain).keys() == {
        k for k in default if not k.startswith("pose_net/")}
    with pytest.raises(UserError, match="holds no pose_net weights"):
        converters.load_variables(plain, part="pose_net")
