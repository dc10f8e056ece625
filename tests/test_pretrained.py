"""Converted torchvision ResNet weights from a local .npz (models/pretrained.py); no torch."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.experiment import build_experiment
from mtl_jax.models.encoders import resnet18, resnet50
from mtl_jax.models.layers import BN_EPSILON
from mtl_jax.models.pretrained import (
    apply_encoder_weights,
    load_encoder_weights,
    resnet_from_torchvision,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BN_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _init(model, size=32):
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    return variables["params"], variables["batch_stats"]


def _torch_name(path):
    """Flax path of an encoder leaf → torchvision state_dict name (written out independently
    of the library's own inverse)."""
    names = []
    for part in path[:-1]:
        if part.startswith("layer"):
            stage, block = part.split("_")
            names += [stage, block]
        elif part == "downsample_conv":
            names += ["downsample", "0"]
        elif part == "downsample_bn":
            names += ["downsample", "1"]
        else:
            names.append(part)
    leaf = path[-1]
    return ".".join(names + ["weight" if leaf == "kernel" else BN_TORCH[leaf]])


def fake_state_dict(params, batch_stats, seed=0):
    """A torchvision-style state_dict (torch layouts) of random arrays with the shapes of a
    flax ResNet's variables, plus the entries the converter must ignore."""
    rng = np.random.default_rng(seed)
    sd = {}
    for tree in (params, batch_stats):
        for path, leaf in traverse_util.flatten_dict(tree).items():
            shape = tuple(leaf.shape)
            if path[-1] == "kernel":  # HWIO -> OIHW
                shape = (shape[3], shape[2], shape[0], shape[1])
            value = rng.standard_normal(shape).astype(np.float32)
            if path[-1] == "var":
                value = np.abs(value) + 0.5
            sd[_torch_name(path)] = value
            if path[-1] == "mean":
                module = _torch_name(path).rsplit(".", 1)[0]
                sd[f"{module}.num_batches_tracked"] = np.array(7, np.int64)
    sd["fc.weight"] = rng.standard_normal((10, 4)).astype(np.float32)
    sd["fc.bias"] = rng.standard_normal((10,)).astype(np.float32)
    return sd


def _save(tmp_path, name, sd):
    path = str(tmp_path / name)
    np.savez(path, **sd)
    return path


@pytest.fixture(scope="module")
def r18():
    model = resnet18(width=8)
    params, batch_stats = _init(model)
    return model, params, batch_stats


@pytest.fixture(scope="module")
def r50():
    model = resnet50(width=8)
    params, batch_stats = _init(model)
    return model, params, batch_stats


@pytest.mark.parametrize("which", ["r18", "r50"])
def test_converted_leaves_match_source(which, request, tmp_path):
    """Every leaf: conv weight OIHW → kernel HWIO, BN weight/bias/running stats → scale/bias/
    mean/var; fc and num_batches_tracked dropped; the trees have exactly the model's keys."""
    _, params, batch_stats = request.getfixturevalue(which)
    sd = fake_state_dict(params, batch_stats)
    assert any(k.endswith("downsample.0.weight") for k in sd)
    assert any(k.endswith("num_batches_tracked") for k in sd)
    got_params, got_stats = load_encoder_weights(_save(tmp_path, "w.npz", sd))
    flat_p = traverse_util.flatten_dict(got_params)
    flat_s = traverse_util.flatten_dict(got_stats)
    assert set(flat_p) == set(traverse_util.flatten_dict(params))
    assert set(flat_s) == set(traverse_util.flatten_dict(batch_stats))
    for path, value in flat_p.items():
        src = sd[_torch_name(path)]
        want = np.transpose(src, (2, 3, 1, 0)) if path[-1] == "kernel" else src
        np.testing.assert_array_equal(value, want, err_msg=str(path))
    for path, value in flat_s.items():
        np.testing.assert_array_equal(value, sd[_torch_name(path)], err_msg=str(path))
    # Spot checks of the mapping, written out.
    np.testing.assert_array_equal(flat_p[("conv1", "kernel")],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat_p[("layer2_0", "downsample_bn", "scale")],
                                  sd["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(flat_s[("bn1", "var")], sd["bn1.running_var"])


def test_forward_stem_matches_hand_reference(r18, tmp_path):
    """The encoder with loaded variables: stem = ReLU(BN_inference(conv 7×7/2, pad 3))."""
    model, params, batch_stats = r18
    sd = fake_state_dict(params, batch_stats, seed=1)
    loaded = load_encoder_weights(_save(tmp_path, "w.npz", sd))
    new_params, new_stats = apply_encoder_weights({"encoder": params},
                                                  {"encoder": batch_stats}, loaded)
    x = np.random.default_rng(2).standard_normal((2, 17, 19, 3)).astype(np.float32)
    features = model.apply({"params": new_params["encoder"],
                            "batch_stats": new_stats["encoder"]}, x, train=False)
    w_oihw = sd["conv1.weight"]
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x).transpose(0, 3, 1, 2), jnp.asarray(w_oihw), window_strides=(2, 2),
        padding=((3, 3), (3, 3)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST)
    y = np.asarray(y).transpose(0, 2, 3, 1)
    y = ((y - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + BN_EPSILON)
         * sd["bn1.weight"] + sd["bn1.bias"])
    want = np.maximum(y, 0.0)
    assert features[0].shape == (2, 9, 10, 8)
    np.testing.assert_allclose(np.asarray(features[0]), want, rtol=1e-4, atol=1e-4)
    # And the rest of the network differs from the random init's output.
    base = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    assert not np.allclose(np.asarray(base[-1]), np.asarray(features[-1]))


def test_apply_keeps_target_dtype_and_other_parts(r18, tmp_path):
    model, params, batch_stats = r18
    sd = fake_state_dict(params, batch_stats)
    loaded = resnet_from_torchvision(sd)
    target = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    decoder = {"kernel": jnp.ones((3, 3))}
    new_params, _ = apply_encoder_weights({"encoder": target, "decoders": decoder},
                                          {"encoder": batch_stats}, loaded)
    assert new_params["decoders"] is decoder
    kernel = new_params["encoder"]["conv1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32),
        sd["conv1.weight"].transpose(2, 3, 1, 0).astype(jnp.bfloat16).astype(np.float32))


def test_resnet18_file_into_resnet50_names_the_key(r18, r50):
    _, p18, s18 = r18
    _, p50, s50 = r50
    loaded = resnet_from_torchvision(fake_state_dict(p18, s18))
    with pytest.raises(UserError, match=r"params/encoder/layer1_0/(conv\d|bn\d)"):
        apply_encoder_weights({"encoder": p50}, {"encoder": s50}, loaded)
    with pytest.raises(UserError, match=r"in the file but"):
        apply_encoder_weights({"encoder": p18},
                              {"encoder": s18},
                              resnet_from_torchvision(fake_state_dict(p50, s50)))


def test_width_mismatch_names_key_and_both_shapes(r18):
    _, params, batch_stats = r18
    p16, s16 = _init(resnet18(width=16))
    loaded = resnet_from_torchvision(fake_state_dict(p16, s16))
    with pytest.raises(UserError) as e:
        apply_encoder_weights({"encoder": params}, {"encoder": batch_stats}, loaded)
    msg = str(e.value)
    assert "params/encoder/conv1/kernel" in msg and "'conv1.weight'" in msg
    assert "(7, 7, 3, 16) in the file but (7, 7, 3, 8) in the model" in msg


def test_missing_and_extra_keys(r18):
    _, params, batch_stats = r18
    sd = fake_state_dict(params, batch_stats)
    del sd["layer3.1.bn2.running_var"]
    loaded = resnet_from_torchvision(sd)
    with pytest.raises(UserError, match=r"batch_stats/encoder/layer3_1/bn2/var \(torchvision "
                                        r"'layer3\.1\.bn2\.running_var'\).*missing"):
        apply_encoder_weights({"encoder": params}, {"encoder": batch_stats}, loaded)
    # Not strict: the missing leaf keeps its initial value.
    _, new_stats = apply_encoder_weights({"encoder": params}, {"encoder": batch_stats}, loaded,
                                         strict=False)
    np.testing.assert_array_equal(new_stats["encoder"]["layer3_1"]["bn2"]["var"],
                                  batch_stats["layer3_1"]["bn2"]["var"])

    sd = fake_state_dict(params, batch_stats)
    sd["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(UserError, match=r"layer5_0/conv1/kernel.*in the file but not in"):
        apply_encoder_weights({"encoder": params}, {"encoder": batch_stats},
                              resnet_from_torchvision(sd))
    with pytest.raises(UserError, match="not a ResNet parameter"):
        resnet_from_torchvision({"avgpool.foo.weight": np.zeros(3)})


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_encoder_weights(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_encoder_weights(bad)
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(UserError, match="single .npy"):
        load_encoder_weights(npy)


def _smoke_config(data_dir):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    c = quickstart.get_config("smoke")
    c.dataset.data_dir = data_dir
    c.num_devices = 1
    return c


def test_build_experiment_encoder_init(tmp_path):
    config = _smoke_config(str(tmp_path / "unused_data"))
    assert config.model.encoder == "resnet18" and config.model.encoder_kwargs.width == 4
    base = build_experiment(config).init_state()
    sd = fake_state_dict(jax.device_get(base.params["encoder"]),
                         jax.device_get(base.batch_stats["encoder"]), seed=3)
    config.model.encoder_init = _save(tmp_path, "r18w4.npz", sd)
    exp = build_experiment(config)
    state = exp.init_state()
    for tree in (state.params, state.batch_stats):
        for path, value in traverse_util.flatten_dict(tree["encoder"]).items():
            src = sd[_torch_name(path)]
            want = np.transpose(src, (2, 3, 1, 0)) if path[-1] == "kernel" else src
            np.testing.assert_array_equal(np.asarray(value), want, err_msg=str(path))
            assert isinstance(value, jax.Array)
    # Everything except the encoder is as without encoder_init.
    for part in base.params:
        if part != "encoder":
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(base.params[part]),
                         jax.device_get(state.params[part]))
    assert jax.tree.structure(state) == jax.tree.structure(base)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(base.opt_state)
    for a, b in zip(jax.tree.leaves(exp.abstract_state), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert b.sharding.is_equivalent_to(a.sharding, len(a.shape))

    # A width mismatch is reported when the experiment is built, not at init.
    config.model.encoder_kwargs.width = 8
    with pytest.raises(UserError, match="in the file but"):
        build_experiment(config)
    config.model.encoder = "simple"
    config.model.encoder_kwargs = {}
    with pytest.raises(UserError, match="not a ResNet"):
        build_experiment(config)
