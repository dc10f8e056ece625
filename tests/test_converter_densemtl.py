"""``--from=densemtl``: a state_dict with the names and shapes of the authors' DenseMTL model
(ResNet backbone, 3-ways heads, the exchange block) onto our model, every array used once and
every leaf checked by strict loading."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from densemtl_reference import Head, StateDict, ours_att

from mtl_jax.errors import UserError
from mtl_jax.models import build_model, converters
from mtl_jax.models.converters.densemtl import convert_densemtl

TASKS = {"semseg": 3, "depth": 1, "normals": 3}
ENC = (4, 4, 8, 16, 32)  # resnet18 at width 4: stem, layer1..4
DEC = (4, 8, 8, 8, 8)  # num_ch_dec, index = stage
MODEL = dict(encoder="resnet18", encoder_kwargs=dict(
    width=4, replace_stride_with_dilation=(False, False, True)), decoder="three_ways",
    decoder_kwargs=dict(channels=DEC, side_scales=(1,)), exchange=dict(name="mteb", stages=(1,)))


def reference_state_dict(tasks=TASKS, dec=DEC, seed=0):
    """Names as the released code's OursAtt(backbone=ResnetEncoder(18), heads={t:
    DecoderHead(intermediate_aspp=True, active_scales=[0, 1])}, ablation=['SxTAM', 'SA',
    'add'], stages=[1]) state_dict, shapes for widths ENC / ``dec``; ``heads.*`` in the order
    of ``tasks`` ({name: output channels}, the reference config's order)."""
    f = StateDict(seed)
    ours_att(f, "", {t: Head(out, (0, 1)) for t, out in tasks.items()}, ENC, dec, fc=10)
    return f.sd


@pytest.fixture(scope="module")
def converted():
    sd = reference_state_dict()
    return sd, convert_densemtl(sd, tasks="semseg,depth,normals",
                                set_order="depth,normals,semseg")


def test_every_leaf_of_the_model_is_filled_with_its_shape(converted):
    _, flat = converted
    model = build_model(MODEL, TASKS)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                                "dropout": jax.random.key(0)},
                                               jnp.zeros((1, 32, 48, 3)), train=False))
    params, stats = converters.apply_variables(shapes["params"], shapes["batch_stats"], flat)
    assert set(params) == {"encoder", "decoders", "exchange_stage1"}
    assert set(stats) == {"encoder", "decoders", "exchange_stage1"}


def test_layouts_and_fusion_order(converted):
    sd, flat = converted
    np.testing.assert_array_equal(
        flat["params/decoders/depth/upconv_1_1/conv/kernel"],
        np.transpose(sd["heads.depth.decoder.11.block.0.conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(flat["params/decoders/semseg/out_1/bias"],
                                  sd["heads.semseg.decoder.15.bias"])
    np.testing.assert_array_equal(flat["params/decoders/normals/aspp/pool/bn/scale"],
                                  sd["heads.normals.decoder.0.convs.4.2.weight"])
    x = "params/exchange_stage1/depth_to_semseg"
    np.testing.assert_array_equal(flat[f"{x}/alpha"],
                                  sd["m.semseg.1.SxTAM_depth.alpha"][0, :, 0, 0])
    np.testing.assert_array_equal(flat[f"{x}/self_mask/kernel"],
                                  np.transpose(sd["m.semseg.1.SA_depth.attention.0.weight"],
                                               (2, 3, 1, 0)))
    np.testing.assert_array_equal(flat["batch_stats/exchange_stage1/depth_to_semseg/key/bn/var"],
                                  sd["m.semseg.1.SxTAM_depth.conv_c.1.running_var"])
    # semseg's sources: ours (depth, normals); the reference's set order (depth, normals,
    # semseg) gives the same -> unchanged. depth's: ours (semseg, normals), reference
    # (normals, semseg) -> the two channel blocks swap.
    post = sd["m.semseg.1.post.0.weight"]
    np.testing.assert_array_equal(flat["params/exchange_stage1/fuse_semseg/conv/kernel"],
                                  np.transpose(post, (2, 3, 1, 0)))
    post = sd["m.depth.1.post.0.weight"]
    swapped = np.concatenate([post[:, 8:], post[:, :8]], axis=1)
    np.testing.assert_array_equal(flat["params/exchange_stage1/fuse_depth/conv/kernel"],
                                  np.transpose(swapped, (2, 3, 1, 0)))


def test_options_and_errors():
    sd = reference_state_dict()
    with pytest.raises(UserError, match="set order"):
        convert_densemtl(sd)
    with pytest.raises(UserError, match="must list"):
        convert_densemtl(sd, tasks="semseg,depth", set_order="semseg,depth,normals")
    bad = dict(sd)
    bad["params.depth.0.decoder.14.bias"] = bad["params.depth.0.decoder.14.bias"] + 1
    with pytest.raises(UserError, match="should repeat"):
        convert_densemtl(bad, set_order="semseg,depth,normals")
    extra = dict(sd, **{"heads.depth.decoder.16.weight": np.zeros((1, 4, 1, 1), np.float32)})
    with pytest.raises(UserError, match=r"heads.depth has 3 side conv\(s\).*\[0, 1\]"):
        convert_densemtl(extra, set_order="semseg,depth,normals")
    extra = dict(sd, **{"heads.depth.decoder.1.weight": np.zeros((1, 4, 1, 1), np.float32)})
    with pytest.raises(UserError, match="not mapped"):
        convert_densemtl(extra, set_order="semseg,depth,normals")
    assert converters.CONVERTERS["densemtl"] is convert_densemtl


def test_cli_converts_a_file(tmp_path):
    from mtl_jax.main import main

    sd = reference_state_dict()
    src, dst = tmp_path / "ref.npz", tmp_path / "ours.npz"
    np.savez(src, **sd)
    assert main(["convert-weights", "--from=densemtl", str(src), str(dst),
                 "--option", "set_order=normals,depth,semseg"]) == 0
    flat = converters.load_variables(dst)
    assert "params/exchange_stage1/fuse_normals/conv/kernel" in flat


# ------------------------------------------------------- the fused block, in the config's order

def _densemtl_config(arg):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "densemtl.py")
    spec = importlib.util.spec_from_file_location("_densemtl_cfg_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


SMOKE = "dataset=synthetic,tasks=sdn,smoke"
SET_ORDER = ("normals", "semseg", "depth")  # the reference's set order (hash-seed dependent)


def _smoke_state_dict(file_order):
    """A state_dict for configs/densemtl.py:SMOKE's model, heads.* in ``file_order``; every
    array random, so each input-channel block of a fusion conv is distinguishable."""
    config = _densemtl_config(SMOKE)
    channels = {"semseg": config.tasks.semseg.num_classes, "depth": 1, "normals": 3}
    return reference_state_dict(tasks={t: channels[t] for t in file_order},
                                dec=tuple(config.model.decoder_kwargs.channels), seed=1)


def _reference_fused(sd, features, directional, target, stage=1):
    """The reference's mTEB output for ``target`` with ablation 'add' (models/ours_xatt.py,
    OursAtt.distillation_block): code[t] + post(cat([out[t, s] for s in {s != t}], dim=1)),
    post = Project = Conv2d 1x1 (no bias) -> BatchNorm2d (eval: running statistics,
    eps 1e-5) -> ReLU, the sources in the order the reference's set iterates. NHWC here."""
    sources = [s for s in SET_ORDER if s != target]
    x = np.concatenate([directional[(s, target)] for s in sources], axis=-1).astype(np.float64)
    m = f"m.{target}.{stage}.post"
    y = x @ sd[f"{m}.0.weight"][:, :, 0, 0].T.astype(np.float64)
    y = ((y - sd[f"{m}.1.running_mean"]) / np.sqrt(sd[f"{m}.1.running_var"] + 1e-5)
         * sd[f"{m}.1.weight"] + sd[f"{m}.1.bias"])
    return features[target] + np.maximum(y, 0.0)


def _check_fusion_against_the_reference(config, flat, sd):
    """Load ``flat`` into the model ``config`` builds (its task order), run its exchange block
    on random features and compare each target's output with the reference's definition."""
    from mtl_jax.experiment import build_tasks

    tasks = build_tasks(config)
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    h, w = config.input_size
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                                "dropout": jax.random.key(0)},
                                               jnp.zeros((1, h, w, 3)), train=False))
    params, stats = converters.apply_variables(shapes["params"], shapes["batch_stats"], flat)
    ((stage, block),) = model.exchanges
    assert tuple(block.tasks) == tuple(tasks)
    c = sd[f"m.semseg.{stage}.post.0.weight"].shape[0]
    rng = np.random.default_rng(2)
    features = {t: rng.standard_normal((2, 8, 12, c)).astype(np.float32) for t in tasks}
    (out, _), inter = block.apply(
        {"params": params[f"exchange_stage{stage}"],
         "batch_stats": stats[f"exchange_stage{stage}"]},
        {t: jnp.asarray(v) for t, v in features.items()}, train=False,
        capture_intermediates=True, mutable=["intermediates"])
    directional = {(s, t): np.asarray(inter["intermediates"][f"{s}_to_{t}"]["__call__"][0])
                   for t in tasks for s in tasks if s != t}
    for t in tasks:
        want = _reference_fused(sd, features, directional, t, stage)
        assert np.abs(want - features[t]).max() > 0.1  # the fusion contributes
        np.testing.assert_allclose(np.asarray(out[t]), want, rtol=1e-4, atol=1e-4,
                                   err_msg=f"fused output of {t}")


def test_a_converted_checkpoint_reproduces_the_reference_fusion_in_the_configs_order(tmp_path):
    """The file's task order (the reference config's: semseg, depth, normals) converted with
    the defaults, loaded into configs/densemtl.py's model: every fused output is the
    reference's (before, the config built depth, normals, semseg and two fusion convs came out
    with their input blocks swapped)."""
    from mtl_jax.main import main

    sd = _smoke_state_dict(("semseg", "depth", "normals"))
    src, dst = tmp_path / "ref.npz", tmp_path / "ours.npz"
    np.savez(src, **sd)
    assert main(["convert-weights", "--from=densemtl", str(src), str(dst),
                 "--option", f"set_order={','.join(SET_ORDER)}"]) == 0
    config = _densemtl_config(SMOKE)
    _check_fusion_against_the_reference(config, converters.load_variables(dst), sd)
    assert list(config.task_order) == ["semseg", "depth", "normals"]


def test_a_file_of_another_task_order_is_refused_or_converted_for_the_config(tmp_path, capsys):
    """heads.* in another order than the model's: converted with the file's order, loading
    refuses (one line naming both orders and the fix); converted with --config, the fusion
    convs are permuted to the config's order and reproduce the reference."""
    from mtl_jax.experiment import build_experiment
    from mtl_jax.main import main

    sd = _smoke_state_dict(("depth", "normals", "semseg"))
    src = tmp_path / "ref.npz"
    np.savez(src, **sd)
    plain, adapted = tmp_path / "plain.npz", tmp_path / "adapted.npz"
    set_order = ["--option", f"set_order={','.join(SET_ORDER)}"]
    assert main(["convert-weights", "--from=densemtl", str(src), str(plain), *set_order]) == 0
    config = _densemtl_config(SMOKE)
    config.num_devices = 1
    config.model.init_from = str(plain)
    with pytest.raises(UserError) as err:
        build_experiment(config)
    msg = str(err.value)
    assert "\n" not in msg
    assert "depth,normals,semseg" in msg and "semseg,depth,normals" in msg
    assert "--config" in msg
    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "densemtl.py")
    assert main(["convert-weights", "--from=densemtl", str(src), str(adapted), *set_order,
                 f"--config={configs}:{SMOKE}"]) == 0
    flat = converters.load_variables(adapted)
    assert converters.file_task_order(flat) == ("semseg", "depth", "normals")
    config.model.init_from = str(adapted)
    build_experiment(config)  # accepted: same order, leaves and shapes
    _check_fusion_against_the_reference(config, flat, sd)
    capsys.readouterr()
    assert main(["convert-weights", "--from=densemtl", str(src), str(adapted), *set_order,
                 f"--config={configs}:{SMOKE}", "--option", "tasks=depth,normals,semseg"]) == 1
    assert "differs from the config's task order" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not depend on the task order"):
        converters.convert_file("mtan", src, adapted, task_order=("semseg", "depth"))
