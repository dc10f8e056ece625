"""DenseMTL: parameter counts, xTAM, mTEB, staged decoders, multi-scale loss,
baselines and a smoke training run where the xTAM alphas leave zero."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.experiment import build_tasks
from mtl_jax.models import build_model, side_outputs
from mtl_jax.models.interaction import MTEB, XTAM, PADNetDistillation
from mtl_jax.models.layers import BN_EPSILON
from mtl_jax.params_report import param_counts
from mtl_jax.steps import forward_losses, task_objective
from mtl_jax.tasks import make_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.key(0)


def densemtl_config(arg):
    spec = importlib.util.spec_from_file_location(
        "densemtl", os.path.join(REPO, "configs", "densemtl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _init(module, *args, **kwargs):
    return module.init({"params": KEY, "dropout": KEY}, *args, **kwargs)


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("tasks,stages,expected", [
    ("sd", "1", 773_120),
    ("sdn", "1", 2_318_592),
    ("sdne", "1", 4_636_672),
    ("sdn", "3", 9_257_472),
    ("sd", "3", 3_086_336),
])
def test_exchange_block_param_counts(tasks, stages, expected):
    counts = param_counts(densemtl_config(f"dataset=vkitti2,tasks={tasks},stages={stages}"))
    assert counts[f"exchange_stage{stages}"] == expected
    assert counts["encoder"] == 42_500_160
    assert counts["decoders/depth"] == 22_061_634


def test_full_sd_model_and_baseline_counts():
    counts = param_counts(densemtl_config("dataset=vkitti2,tasks=sd"))
    assert counts["total"] == 87_399_070
    # 3-ways PAD-Net: the same heads, a PAD-Net distillation of decoder stage 2's output, as
    # the reference's PadnetPlus (two 3x3 convs per ordered pair at 128 channels).
    pad3 = param_counts(densemtl_config("dataset=vkitti2,tasks=sd,model=3ways_padnet"))
    assert pad3["exchange_stage2"] == 2 * 2 * 128 * 128 * 9 and "exchange_stage1" not in pad3
    assert pad3["decoders/semseg"] == counts["decoders/semseg"]
    no_ex = param_counts(densemtl_config("dataset=vkitti2,tasks=sd,model=3ways"))
    assert no_ex["total"] == counts["total"] - 773_120
    # STL: ResNet-101 + DeepLabv3 head (ASPP 15,535,104 + conv3x3 589,824 + BN 512 + 1x1 257).
    stl = param_counts(densemtl_config("dataset=vkitti2,model=stl,tasks=d"))
    assert stl["decoders/depth"] == 15_535_104 + 589_824 + 512 + 257
    mtl = param_counts(densemtl_config("dataset=vkitti2,model=mtl,tasks=sd"))
    assert mtl["decoders/depth"] == stl["decoders/depth"]
    assert mtl["decoders/semseg"] == stl["decoders/depth"] - 257 + 256 * 14 + 14
    pad = param_counts(densemtl_config("dataset=vkitti2,model=padnet,tasks=sd"))
    # Initial heads: bottleneck 2048->256 with projection, bottleneck 256->256, 1x1 with bias.
    b1 = 2048 * 64 + 128 + 64 * 64 * 9 + 128 + 64 * 256 + 512 + 2048 * 256 + 512
    b2 = 256 * 64 + 128 + 64 * 64 * 9 + 128 + 64 * 256 + 512
    distill = 2 * 2 * 256 * 256 * 9
    assert pad["padnet"] == 2 * (b1 + b2) + (256 * 14 + 14) + (256 + 1) + distill
    assert pad["decoders/depth"] == 2 * b2 + 257


def test_cli_params_prints_the_exchange_block():
    r = subprocess.run([sys.executable, "-m", "mtl_jax.main", "params",
                        "--config=configs/densemtl.py:dataset=vkitti2,tasks=sdn"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2,318,592" in r.stdout and "42,500,160" in r.stdout and "22,061,634" in r.stdout


@pytest.mark.parametrize("config_file", ["densemtl.py", "densemtl_uda.py"])
def test_images_are_standardised_as_the_reference_encoder(config_file):
    """The reference's ResnetEncoder (monodepth2's) feeds the ResNet (x - 0.45) / 0.225, for
    every DenseMTL model; the configs' models do the same (not ImageNet's mean/std)."""
    spec = importlib.util.spec_from_file_location(
        f"_std_{config_file[:-3]}", os.path.join(REPO, "configs", config_file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("smoke")
    tasks = build_tasks(config)
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    h, w = config.input_size
    image = np.random.default_rng(0).uniform(size=(1, h, w, 3)).astype(np.float32)
    variables = model.init(KEY, jnp.zeros((1, h, w, 3)), False, method=model.encode)
    features = model.apply(variables, jnp.asarray(image), False, method=model.encode)
    encoder_vars = {k: v["encoder"] for k, v in variables.items() if "encoder" in v}
    want = model.encoder.apply(encoder_vars, jnp.asarray((image - 0.45) / 0.225), train=False)
    for got, ref in zip(features, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- xTAM
def _conv(x, kernel, bias=None, pad=1):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias


def test_xtam_with_zero_alpha_is_its_self_attention_path():
    b, h, w, c = 2, 8, 12, 8
    kt, ks = jax.random.split(jax.random.key(1))
    target = jax.random.normal(kt, (b, h, w, c))
    source = jax.random.normal(ks, (b, h, w, c))
    xtam = XTAM(downscale=4)
    variables = _init(xtam, target, source)
    p, stats = variables["params"], variables["batch_stats"]
    assert not np.any(p["alpha"])  # alpha starts at 0
    out = xtam.apply(variables, target, source)
    # The self-attention path alone, by hand (BN in inference mode with fresh statistics).
    e = jax.nn.relu(_conv(source, p["extract"]["kernel"], p["extract"]["bias"]))
    self_branch = _conv(e, p["self_feat"]["kernel"]) * jax.nn.sigmoid(
        _conv(e, p["self_mask"]["kernel"]))
    x = jnp.concatenate([self_branch, jnp.zeros((b, h, w, c))], axis=-1)
    y = _conv(x, p["project"]["conv"]["kernel"], pad=0)
    bn, bs = p["project"]["bn"], stats["project"]["bn"]
    y = (y - bs["mean"]) / jnp.sqrt(bs["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(out, jax.nn.relu(y), rtol=1e-5, atol=1e-5)
    # The target reaches the output only through alpha: no effect at 0, an effect otherwise.
    out2 = xtam.apply(variables, target * 3.0 + 1.0, source)
    np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-6)
    p1 = flax.core.copy(p, {"alpha": jnp.full((c,), 0.5)})
    v1 = {"params": p1, "batch_stats": stats}
    assert not np.allclose(xtam.apply(v1, target, source), xtam.apply(v1, target * 3 + 1, source))


@pytest.mark.parametrize("attention", ["spatial", "channel", "both"])
def test_xtam_attention_types_and_blocked_equals_naive(attention):
    b, h, w, c = 2, 16, 20, 8
    kt, ks, ka = jax.random.split(jax.random.key(2), 3)
    target = jax.random.normal(kt, (b, h, w, c))
    source = jax.random.normal(ks, (b, h, w, c))
    naive = XTAM(downscale=2, attention=attention, attention_impl="naive")
    blocked = XTAM(downscale=2, attention=attention, attention_impl="blocked", block_size=7)
    variables = _init(naive, target, source)
    alphas = [k for k in variables["params"] if k.startswith("alpha")]
    assert alphas == (["alpha", "alpha_channel"] if attention == "both" else ["alpha"])
    params = dict(variables["params"])
    for k in alphas:
        params[k] = jax.random.normal(ka, (c,))
    v = {"params": params, "batch_stats": variables["batch_stats"]}

    def loss(impl, p):
        out = impl.apply({"params": p, "batch_stats": v["batch_stats"]}, target, source)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ref, g_ref = jax.value_and_grad(lambda p: loss(naive, p))(params)
    got, g_got = jax.value_and_grad(lambda p: loss(blocked, p))(params)
    assert out_shape(naive, v, target, source) == (b, h, w, c)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    for a, r in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-4)


def out_shape(module, variables, *args):
    return module.apply(variables, *args).shape


def test_xtam_errors():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="attention must be one of"):
        _init(XTAM(attention="cross"), x, x)
    with pytest.raises(ValueError, match="same shape"):
        _init(XTAM(), x, jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="too large"):
        _init(XTAM(downscale=8), x, x)


# --------------------------------------------------------------------------------------- mTEB
STAGE_TABLE = {4: (256, 1), 3: (256, 1), 2: (128, 2), 1: (128, 4), 0: (64, 8)}


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
@pytest.mark.parametrize("fusion", ["add", "prod", "concat"])
def test_mteb_shapes_every_stage_task_count_and_fusion(num_tasks, fusion):
    tasks = ("semseg", "depth", "normals", "edges")[:num_tasks]
    for stage, (c, s) in STAGE_TABLE.items():
        c = c // 16  # same structure, small channels
        feats = {t: jax.random.normal(jax.random.key(i), (2, 16, 24, c))
                 for i, t in enumerate(tasks)}
        block = MTEB(tasks=tasks, downscale=s, fusion=fusion)
        (out, aux), variables = jax.eval_shape(
            lambda block=block, feats=feats: block.init_with_output(KEY, feats))
        assert set(out) == set(tasks) and aux == {}
        assert all(out[t].shape == (2, 16, 24, c) for t in tasks), stage
        xtams = [k for k in variables["params"] if "_to_" in k]
        assert len(xtams) == num_tasks * (num_tasks - 1)
        fuse_in = variables["params"]["fuse_semseg"]["conv"]["kernel"].shape[2]
        assert fuse_in == (num_tasks if fusion == "concat" else num_tasks - 1) * c


def test_mteb_fusions_numerically():
    tasks = ("semseg", "depth")
    feats = {t: jax.random.normal(jax.random.key(i), (1, 8, 8, 4)) for i, t in enumerate(tasks)}
    add = MTEB(tasks=tasks, downscale=2, fusion="add")
    variables = _init(add, feats)
    out_add, _ = add.apply(variables, feats)
    out_prod, _ = MTEB(tasks=tasks, downscale=2, fusion="prod").apply(variables, feats)
    # Same parameters: add = f + F(messages), prod = f * F(messages).
    residual = out_add["semseg"] - feats["semseg"]
    np.testing.assert_allclose(out_prod["semseg"], feats["semseg"] * residual, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        _init(MTEB(tasks=("semseg",)), {"semseg": feats["semseg"]})
    with pytest.raises(ValueError, match="fusion"):
        _init(MTEB(tasks=tasks, fusion="max"), feats)


def test_padnet_distillation_by_hand():
    tasks = ("semseg", "depth")
    feats = {t: jax.random.normal(jax.random.key(i), (1, 6, 6, 4)) for i, t in enumerate(tasks)}
    block = PADNetDistillation(tasks=tasks)
    variables = _init(block, feats)
    out, _ = block.apply(variables, feats)
    p = variables["params"]
    msg = _conv(feats["depth"], p["depth_to_semseg_feat"]["kernel"])
    gate = jax.nn.sigmoid(_conv(feats["depth"], p["depth_to_semseg_mask"]["kernel"]))
    np.testing.assert_allclose(out["semseg"], feats["semseg"] + msg * gate, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- staged model, multi-scale loss
TINY_MODEL = dict(encoder="resnet18", encoder_kwargs=dict(
    width=4, replace_stride_with_dilation=(False, False, True)), decoder="three_ways",
    decoder_kwargs=dict(channels=(4, 8, 8, 8, 8), side_scales=(1,)))


@pytest.mark.parametrize("exchange", [None, dict(name="mteb", stages=(2, 1)),
                                      dict(name="padnet", stages=(1,))])
def test_staged_model_outputs_and_side_outputs(exchange):
    tasks = {"semseg": 5, "depth": 1, "normals": 3}
    model = build_model(dict(TINY_MODEL, exchange=exchange), tasks)
    image = jnp.zeros((2, 32, 48, 3))
    (preds, aux), variables = jax.eval_shape(
        lambda: model.init_with_output({"params": KEY, "dropout": KEY}, image, train=False))
    for t, ch in tasks.items():
        assert preds[t].shape == (2, 32, 48, ch)
        assert side_outputs(aux, t)["1"].shape == (2, 32, 48, ch)
    parts = set(variables["params"])
    stages = (exchange or {}).get("stages", ())
    assert parts == {"encoder", "decoders"} | {f"exchange_stage{s}" for s in stages}


def test_multiscale_loss_is_the_mean_over_scales():
    depth = make_task("depth", loss="l1")
    target = jnp.full((1, 4, 4, 1), 2.0)
    batch = {"depth": target}
    pred = jnp.full((1, 4, 4, 1), 1.0)
    aux = {"depth/side/1": jnp.full((1, 4, 4, 1), 4.0), "semseg/side/1": jnp.zeros((1, 4, 4, 3))}
    # |1 - 2| = 1 at scale 0, |4 - 2| = 2 at scale 1: mean 1.5.
    assert float(task_objective(depth, "depth", pred, aux, batch)) == pytest.approx(1.5)
    assert float(task_objective(depth, "depth", pred, {}, batch)) == pytest.approx(1.0)


def test_forward_losses_average_the_side_output_of_a_real_model():
    config = densemtl_config("dataset=synthetic,tasks=sdn,smoke,attention_impl=naive")
    tasks = build_tasks(config)
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(size=(2, 32, 48, 3)), jnp.float32),
             "semseg": jnp.asarray(rng.integers(-1, 10, (2, 32, 48))),
             "depth": jnp.asarray(rng.uniform(0, 8, (2, 32, 48, 1)), jnp.float32),
             "normals": jnp.asarray(rng.normal(size=(2, 32, 48, 3)), jnp.float32)}
    variables = jax.jit(lambda image: _init(model, image, train=False))(batch["image"])
    fwd = jax.jit(functools.partial(forward_losses, model=model, tasks=tasks, train=False))
    losses, preds, aux, _ = fwd(variables["params"], variables["batch_stats"], batch, KEY)
    for name, task in tasks.items():
        by_hand = (task.loss(preds[name], batch) + task.loss(aux[f"{name}/side/1"], batch)) / 2
        assert float(losses[name]) == pytest.approx(float(by_hand), rel=1e-6)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("arg", [
    "dataset=synthetic,tasks=sd", "dataset=synthetic,tasks=sdne,smoke",
    "dataset=vkitti2,tasks=sdn,model=mtl", "dataset=synthia,tasks=sdn,model=padnet",
    "dataset=cityscapes,tasks=sd,model=3ways_padnet", "dataset=nyud_mt,tasks=sdne",
    "dataset=vkitti2,model=stl,tasks=n", "dataset=vkitti2,tasks=sdn,fusion=prod,stages=3-1",
    "dataset=vkitti2,tasks=sdn,attention=both"])
def test_densemtl_configs_build(arg):
    config = densemtl_config(arg)
    tasks = build_tasks(config)
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    h, w = config.input_size
    jax.eval_shape(lambda: _init(model, jnp.zeros((1, h, w, 3)), train=False))
    if "model=" not in arg:  # ours: the paper's fixed weights
        assert config.weighting.name == "fixed" and config.weighting.weights["depth"] == 1.0
    assert config.optimizer.grad_clip_norm == 10.0


def test_densemtl_config_errors():
    with pytest.raises(UserError, match="one letter"):
        densemtl_config("model=stl,tasks=sd")
    with pytest.raises(UserError, match="unknown model"):
        densemtl_config("model=mtan")
    with pytest.raises(UserError, match="unknown dataset"):
        densemtl_config("dataset=kitti")


def test_smoke_training_moves_the_alphas(data_dir, tmp_path):
    from mtl_jax.train import train_and_evaluate

    config = densemtl_config("dataset=synthetic,tasks=sdn,smoke")
    config.dataset.data_dir = data_dir
    config.num_devices = 1
    wd = str(tmp_path / "run")
    results = train_and_evaluate(config, wd)
    assert all(np.isfinite(v) for v in results.values())
    assert {"semseg/miou", "depth/rmse", "semseg/side/1/miou", "depth/side/1/rmse"} <= set(results)
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train = [x for x in lines if "train/loss/total" in x]
    alphas = [k for k in train[-1] if k.startswith("train/alpha/exchange_stage1/")]
    assert len(alphas) == 6  # one xTAM per ordered pair of 3 tasks
    assert all(train[-1][k] > 0 for k in alphas)
    assert train[-1]["train/weight/semseg"] == 100.0 and train[-1]["train/weight/depth"] == 1.0
