"""``--from=densemtl``: a state_dict with the names and shapes of the authors' DenseMTL model
(ResNet backbone, 3-ways heads, the exchange block) onto our model, every array used once and
every leaf checked by strict loading."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.models import build_model, converters
from mtl_jax.models.converters.densemtl import convert_densemtl

TASKS = {"semseg": 3, "depth": 1, "normals": 3}
ENC = (4, 4, 8, 16, 32)  # resnet18 at width 4: stem, layer1..4
DEC = (4, 8, 8, 8, 8)  # num_ch_dec, index = stage
MODEL = dict(encoder="resnet18", encoder_kwargs=dict(
    width=4, replace_stride_with_dilation=(False, False, True)), decoder="three_ways",
    decoder_kwargs=dict(channels=DEC, side_scales=(1,)), exchange=dict(name="mteb", stages=(1,)))


class _Fixture:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.sd = {}

    def arr(self, name, *shape):
        self.sd[name] = self.rng.standard_normal(shape).astype(np.float32)

    def conv(self, name, o, i, k, bias=False):
        self.arr(f"{name}.weight", o, i, k, k)
        if bias:
            self.arr(f"{name}.bias", o)

    def bn(self, name, c):
        for leaf in ("weight", "bias", "running_mean"):
            self.arr(f"{name}.{leaf}", c)
        self.sd[f"{name}.running_var"] = np.abs(self.rng.standard_normal(c)).astype(
            np.float32) + 0.5
        self.sd[f"{name}.num_batches_tracked"] = np.array(5, np.int64)


def reference_state_dict(tasks=TASKS, dec=DEC, seed=0):
    """Names as the released code's OursAtt(backbone=ResnetEncoder(18), heads={t:
    DecoderHead(intermediate_aspp=True, active_scales=[0, 1])}, ablation=['SxTAM', 'SA',
    'add'], stages=[1]) state_dict, shapes for widths ENC / ``dec``; ``heads.*`` in the order
    of ``tasks`` ({name: output channels}, the reference config's order)."""
    TASKS, DEC = tasks, dec  # noqa: N806 -- the module-level defaults, overridable
    f = _Fixture(seed)
    p = "backbone.encoder."
    f.conv(p + "conv1", 4, 3, 7)
    f.bn(p + "bn1", 4)
    cin = 4
    for stage, c in enumerate((4, 8, 16, 32), start=1):
        for b in range(2):
            q = f"{p}layer{stage}.{b}."
            f.conv(q + "conv1", c, cin if b == 0 else c, 3)
            f.bn(q + "bn1", c)
            f.conv(q + "conv2", c, c, 3)
            f.bn(q + "bn2", c)
            if b == 0 and cin != c:
                f.conv(q + "downsample.0", c, cin, 1)
                f.bn(q + "downsample.1", c)
        cin = c
    f.conv(p + "fc", 10, 32, 1)
    f.sd[p + "fc.weight"] = f.sd[p + "fc.weight"][:, :, 0, 0]
    f.arr(p + "fc.bias", 10)
    for t, out in TASKS.items():
        h = f"heads.{t}.decoder."
        f.conv(h + "0.convs.0.0", DEC[4], ENC[4], 1)
        f.bn(h + "0.convs.0.1", DEC[4])
        for n in (1, 2, 3):
            f.conv(h + f"0.convs.{n}.0", DEC[4], ENC[4], 3)
            f.bn(h + f"0.convs.{n}.1", DEC[4])
        f.conv(h + "0.convs.4.1", DEC[4], ENC[4], 1)
        f.bn(h + "0.convs.4.2", DEC[4])
        f.conv(h + "0.project.0", DEC[4], 5 * DEC[4], 1)
        f.bn(h + "0.project.1", DEC[4])
        f.conv(h + "2.block.0.conv", DEC[4], DEC[4] + ENC[3], 3, bias=True)
        for stage, (i0, i1) in {3: (3, 5), 2: (6, 8), 1: (9, 11)}.items():
            f.conv(h + f"{i0}.block.0.conv", DEC[stage], DEC[stage + 1], 3, bias=True)
            f.conv(h + f"{i1}.block.0.conv", DEC[stage], DEC[stage] + ENC[stage - 1], 3,
                   bias=True)
        f.conv(h + "12.block.0.conv", DEC[0], DEC[1], 3, bias=True)
        f.conv(h + "13.block.0.conv", DEC[0], DEC[0], 3, bias=True)
        f.conv(h + "14", out, DEC[0], 1, bias=True)  # active_scales [0, 1]
        f.conv(h + "15", out, DEC[1], 1, bias=True)
    c = DEC[1]
    for t in TASKS:
        m = f"m.{t}.1."
        for s in TASKS:
            if s == t:
                continue
            f.conv(m + f"extract_{s}.0", c, c, 3, bias=True)
            f.conv(m + f"SA_{s}.attention.0", c // 2, c, 3)
            f.conv(m + f"SA_{s}.conv", c // 2, c, 3)
            for x in ("conv_b", "conv_c", "conv_d"):
                f.conv(m + f"SxTAM_{s}.{x}.0", c, c, 1)
                f.bn(m + f"SxTAM_{s}.{x}.1", c)
            f.arr(m + f"SxTAM_{s}.alpha", 1, c, 1, 1)
            f.conv(m + f"proj_{s}.0", c, c + c // 2, 1)
            f.bn(m + f"proj_{s}.1", c)
        f.conv(m + "post.0", c, 2 * c, 1)
        f.bn(m + "post.1", c)
    # The reference's per-task parameter groups repeat heads.<t> / m.<t> in the state_dict.
    for name in list(f.sd):
        parts = name.split(".")
        if parts[0] in ("heads", "m"):
            alias = f"params.{parts[1]}.{0 if parts[0] == 'heads' else 1}.{'.'.join(parts[2:])}"
            f.sd[alias] = f.sd[name]
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
