"""AdaMT-Net: dense-encoder wiring, attention decoders, ablation switches, parameter
counts, gradient-magnitude weights from the fast path vs per-decoder ``jax.grad``, pictures of
the attention masks, configs and smoke training of every variant."""

import functools
import importlib.util
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.evaluation.pictures import prediction_grid
from mtl_jax.experiment import build_tasks
from mtl_jax.models import build_model, count_params
from mtl_jax.models.architectures.adamt import VARIANTS
from mtl_jax.models.encoders.dense_unet import DenseUNetEncoder, _pool2
from mtl_jax.params_report import param_counts
from mtl_jax.steps import TrainState, forward_losses, predict_step, train_step
from mtl_jax.tasks import make_task
from mtl_jax.weighting import make_weighting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.key(0)
CHANNELS = {"semseg": 5, "depth": 1, "normals": 3, "reconstruction": 3}
SETS = {"sd": ("semseg", "depth"), "sdn": ("semseg", "depth", "normals"),
        "sdnr": ("semseg", "depth", "normals", "reconstruction")}


def adamt_config(arg):
    spec = importlib.util.spec_from_file_location("adamt", os.path.join(REPO, "configs",
                                                                          "adamt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def tiny(variant="adamt", tasks=("semseg", "depth"), **extra):
    dense, attention = VARIANTS[variant]
    cfg = dict(architecture="adamt", widths=(4, 4, 8, 8), bottleneck_features=8, dense=dense,
               attention=attention, **extra)
    return build_model(cfg, {t: CHANNELS[t] for t in tasks})


def shapes(model, h=32, w=48):
    return jax.eval_shape(lambda: model.init({"params": KEY, "dropout": KEY},
                                             jnp.zeros((1, h, w, 3)), train=False))["params"]


def flat_shapes(params):
    return {k: v.shape for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


# ------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("variant,letters", [
    ("adamt", "sdnr"), ("unet", "sd"), ("dense_noatt", "sdn"), ("st", "n")])
def test_output_and_mask_shapes(variant, letters):
    tasks = SETS.get(letters) or tuple({"s": "semseg", "n": "normals"}[c] for c in letters)
    model = tiny(variant, tasks)
    variables = jax.eval_shape(lambda: model.init({"params": KEY, "dropout": KEY},
                                                  jnp.zeros((2, 32, 48, 3)), train=False))
    preds, aux = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 48, 3)),
                                                      train=False), variables)
    assert {t: p.shape for t, p in preds.items()} == {t: (2, 32, 48, CHANNELS[t]) for t in tasks}
    expected_aux = {}
    if VARIANTS[variant][1]:  # attention: one mask per task and block, deepest first
        for t in tasks:
            for block, (s, c) in enumerate([(8, 8), (4, 8), (2, 4), (1, 4)]):
                expected_aux[f"{t}/attention/block{block + 1}"] = (2, 32 // s, 48 // s, c)
    assert {k: v.shape for k, v in aux.items()} == expected_aux


def test_dense_wiring_channel_counts():
    """A block's first conv reads the image plus every earlier block (dense) or the previous
    block alone (plain); the bottleneck reads the whole concatenation (docs/models/adamt.md)."""
    for dense, expected in [(True, [3, 67, 195, 451, 963]), (False, [3, 64, 128, 256, 512])]:
        enc = DenseUNetEncoder(dense=dense)
        assert enc.input_channels() == expected
        p = flat_shapes(jax.eval_shape(
            lambda enc=enc: enc.init({"params": KEY, "dropout": KEY}, jnp.zeros((1, 32, 32, 3)),
                                     train=False))["params"])
        got = [p[f"block{i}_conv1/conv/kernel"][2] for i in range(1, 5)]
        got.append(p["bottleneck/conv/kernel"][2])
        assert got == expected
        assert p["bottleneck/conv/kernel"] == (1, 1, expected[-1], 1024)
    # decoder of the full model at the paper's widths: upsampled input + bridge, and the
    # concat(M², A ⊙ M²) of the block below doubles its width
    p = flat_shapes(shapes(build_model(dict(architecture="adamt"), {"depth": 1}), 64, 64))
    m1_in = [p[f"decoders/depth/block{b}_m1/conv/kernel"][2] for b in range(1, 5)]
    assert m1_in == [1024 + 512, 2 * 512 + 256, 2 * 256 + 128, 2 * 128 + 64]
    assert p["decoders/depth/block1_att1/conv/kernel"] == (3, 3, 512, 512)
    assert p["decoders/depth/head/kernel"] == (1, 1, 128, 1)


def test_dense_connections_carry_the_pooled_image_and_outputs():
    """Numerically: the 4×4 max-pool of the image reaches block 3's first conv (its input
    channels 0..2), so changing only those kernel weights changes block 3's output."""
    enc = DenseUNetEncoder(widths=(2, 2, 2, 2), bottleneck_features=2, dropout_rate=0.0)
    x = jax.random.uniform(KEY, (1, 16, 16, 3))
    v = enc.init({"params": KEY}, x, train=False)
    apply = jax.jit(functools.partial(enc.apply, train=False))
    base = apply(v, x)
    k = v["params"]["block3_conv1"]["conv"]["kernel"]
    v2 = jax.tree.map(lambda a: a, v)
    v2["params"]["block3_conv1"]["conv"]["kernel"] = k.at[:, :, :3].set(0.0)
    out2 = apply(v2, x)
    assert np.allclose(base[1], out2[1]) and not np.allclose(base[2], out2[2])


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool2_matches_flax_pooling_with_odd_sizes(kind):
    x = jax.random.normal(KEY, (2, 7, 9, 3))
    ref = (flax.linen.max_pool if kind == "max" else flax.linen.avg_pool)(
        x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_allclose(_pool2(x, kind), ref, rtol=1e-6)
    assert _pool2(x, kind).shape == (2, 3, 4, 3)


def test_pool2_max_gradient_goes_to_the_first_maximum():
    """At ties the max-pool's gradient goes to the first maximum of the window (PyTorch's rule,
    the models' one ``layers.max_pool``), not split among the tied inputs."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(2, 7, 9, 3)), jnp.float32)
    g = jax.random.normal(KEY, (2, 3, 4, 3))
    (dx,) = jax.vjp(lambda a: _pool2(a, "max"), x)[1](g)
    (ref,) = jax.vjp(lambda a: flax.linen.max_pool(a, (2, 2), strides=(2, 2)), x)[1](g)
    np.testing.assert_array_equal(dx, ref)


def test_ablation_switches_change_exactly_the_intended_modules():
    full = flat_shapes(shapes(tiny("adamt", ("semseg", "depth"))))
    noatt = flat_shapes(shapes(tiny("dense_noatt", ("semseg", "depth"))))
    unet = flat_shapes(shapes(tiny("unet", ("semseg", "depth"))))
    # attention off: exactly the attention convs disappear ...
    removed = set(full) - set(noatt)
    assert removed and all("_att1/" in k or "_att2/" in k for k in removed)
    assert len(removed) == 2 * 4 * 2 * 3  # tasks × blocks × convs × (kernel, bn scale, bias)
    assert set(noatt) <= set(full)
    # ... and only the layers reading a block output (next m1, head) get narrower inputs
    changed = {k for k in noatt if noatt[k] != full[k]}
    assert changed == {f"decoders/{t}/{m}" for t in ("semseg", "depth")
                       for m in ("block2_m1/conv/kernel", "block3_m1/conv/kernel",
                                 "block4_m1/conv/kernel", "head/kernel")}
    # dense off: same modules; only the encoder convs reading the concatenation change
    assert set(unet) == set(noatt)
    changed = {k for k in unet if unet[k] != noatt[k]}
    assert changed == {"encoder/block2_conv1/conv/kernel", "encoder/block3_conv1/conv/kernel",
                       "encoder/block4_conv1/conv/kernel", "encoder/bottleneck/conv/kernel"}


def test_transpose_upsampling_adds_only_up_convs():
    bil = flat_shapes(shapes(tiny()))
    tr = flat_shapes(shapes(tiny(upsample="transpose")))
    added = set(tr) - set(bil)
    assert set(bil) <= set(tr) and added
    assert all("_up/" in k for k in added)


def test_bad_fields_are_value_errors():
    with pytest.raises(ValueError, match="dense_pool"):
        tiny(dense_pool="median")
    with pytest.raises(ValueError, match="upsample"):
        tiny(upsample="pixelshuffle")
    with pytest.raises(ValueError, match="dropout_rate"):
        tiny(dropout_rate=1.5)
    with pytest.raises(ValueError, match="smaller than 16"):
        tiny().init({"params": KEY, "dropout": KEY}, jnp.zeros((1, 8, 48, 3)), train=False)


# ------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("letters,expected", [
    ("sd", {"encoder": 6_731_840, "decoders/depth": 20_356_737,
            "decoders/semseg": 20_358_285, "total": 47_446_862}),
    ("sdn", {"encoder": 6_731_840, "decoders/depth": 20_356_737,
             "decoders/normals": 20_356_995, "decoders/semseg": 20_358_285,
             "total": 67_803_857}),
])
def test_nyuv2_param_counts_without_the_dataset(letters, expected):
    """``mtl-jax params`` numbers for the paper's widths (docs/models/adamt.md); shapes only,
    the NYUv2 dataset is not needed."""
    config = adamt_config(f"dataset=nyuv2,tasks={letters}")
    assert param_counts(config) == expected


def test_ablation_param_counts_at_paper_widths():
    counts = {}
    for variant in ("unet", "dense_noatt"):
        counts[variant] = param_counts(adamt_config(f"dataset=cityscapes_mtan,tasks=sd,"
                                                    f"variant={variant}"))
    assert counts["unet"]["encoder"] == 5_213_632
    assert counts["dense_noatt"]["encoder"] == 6_731_840
    assert counts["unet"]["decoders/depth"] == counts["dense_noatt"]["decoders/depth"] \
        == 12_537_665


# --------------------------------------------------------- gradient-magnitude equivalence
@pytest.fixture(autouse=True, scope="module")
def _default_xla_pipeline():
    """This file compiles with XLA's default optimisation (the suite runs compile-light:
    tests/conftest.py): at backend optimisation level 0 the AdaMT-Net smoke step's encoder
    gradient goes non-finite at step 2 on CPU, which the default pipeline does not do."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def sdn_setup():
    tasks = {"semseg": make_task("semseg", num_classes=5), "depth": make_task("depth"),
             "normals": make_task("normals")}
    model = tiny("adamt", tuple(tasks))
    rng = np.random.default_rng(0)
    n = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(rng.uniform(size=(2, 32, 48, 3)), jnp.float32),
             "semseg": jnp.asarray(rng.integers(-1, 5, (2, 32, 48)), jnp.int32),
             "depth": jnp.asarray(rng.uniform(0.0, 5.0, (2, 32, 48, 1)), jnp.float32),
             "normals": jnp.asarray(n / np.linalg.norm(n, axis=-1, keepdims=True))}
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": KEY, "dropout": KEY}, batch["image"])
    import optax

    tx = optax.adam(1e-3)
    weighting = make_weighting({"name": "grad_magnitude"})
    state = TrainState(step=jnp.asarray(3, jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]),
                       weighting_state=weighting.init(tuple(tasks)), rng=jax.random.key(7))
    return model, tasks, batch, state, tx, weighting


def test_grad_magnitude_weights_equal_naive_per_decoder_grads(sdn_setup):
    """The weights the fast path logs (one forward, one VJP per decoder) equal eq. 5 computed
    from a separate ``jax.grad`` of each L_t w.r.t. decoder t over the whole network (same
    dropout key, batch statistics of the batch)."""
    model, tasks, batch, state, tx, weighting = sdn_setup
    step = jax.jit(functools.partial(train_step, model=model, tasks=tasks, weighting=weighting,
                                     tx=tx))
    _, metrics = step(state, batch)
    rng = jax.random.fold_in(state.rng, state.step)

    @jax.jit
    def naive_gbar(state):  # one program for the three separate gradients
        gbar = {}
        for t in tasks:
            def loss_t(dec_params, t=t):
                params = {**state.params,
                          "decoders": {**state.params["decoders"], t: dec_params}}
                losses, *_ = forward_losses(params, state.batch_stats, batch, rng,
                                            model=model, tasks=tasks, train=True)
                return losses[t]

            leaves = jax.tree.leaves(jax.grad(loss_t)(state.params["decoders"][t]))
            gbar[t] = (sum(jnp.sum(jnp.abs(x)) for x in leaves)
                       / sum(x.size for x in leaves))
        return gbar

    gbar = {t: float(v) for t, v in naive_gbar(state).items()}
    total = sum(gbar.values())
    for t in tasks:
        np.testing.assert_allclose(float(metrics[f"weighting/gbar/{t}"]), gbar[t], rtol=2e-4)
        np.testing.assert_allclose(float(metrics[f"weight/{t}"]), gbar[t] / total, rtol=2e-4)
    assert abs(sum(float(metrics[f"weight/{t}"]) for t in tasks) - 1.0) < 1e-5


def test_attention_masks_in_unit_interval_and_drawn(sdn_setup):
    model, tasks, batch, state, _, _ = sdn_setup
    _, aux = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    masks = {k: v for k, v in aux.items() if "/attention/" in k}
    assert len(masks) == 3 * 4
    for v in masks.values():
        assert v.dtype == jnp.float32 and float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    out = jax.jit(functools.partial(predict_step, model=model, tasks=tasks))(state,
                                                                              batch["image"])
    drawn = sorted(k for k in out if k.startswith("attention/"))
    assert drawn == sorted(f"attention/{t}/block{b}" for t in tasks for b in range(1, 5))
    for k in drawn:
        assert out[k].shape == (2, 32, 48)
        assert 0.0 <= float(out[k].min()) and float(out[k].max()) <= 1.0
    # block 4 is at full resolution: its picture is channel 0 of the mask itself
    np.testing.assert_allclose(out["attention/depth/block4"],
                               aux["depth/attention/block4"][..., 0], rtol=1e-5, atol=1e-6)
    host_batch = {k: np.asarray(v) for k, v in batch.items()}
    grid = prediction_grid(host_batch, {k: np.asarray(v) for k, v in out.items()},
                           max_examples=2)
    # image + (gt, pred) per task + one column per mask, 2 rows of 32×48 pictures
    pad, title = 2, 12
    assert grid.shape == (title + 2 * (32 + pad) + pad, (1 + 6 + 12) * (48 + pad) + pad, 3)


def test_prediction_grid_draws_masks_grey():
    batch = {"image": np.zeros((1, 4, 6, 3), np.float32),
             "depth": np.ones((1, 4, 6, 1), np.float32)}
    mask = np.linspace(0, 1, 24, dtype=np.float32).reshape(1, 4, 6)
    grid = prediction_grid(batch, {"depth": np.ones((1, 4, 6, 1), np.float32),
                                   "attention/depth/block4": mask})
    cell = grid[12 + 2:12 + 2 + 4, 3 * (6 + 2) + 2:3 * (6 + 2) + 2 + 6]
    np.testing.assert_array_equal(cell[..., 0], np.round(mask[0] * 255).astype(np.uint8))
    assert (cell[..., 0] == cell[..., 2]).all()


# -------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("arg", [
    "dataset=nyuv2,tasks=sdnr", "dataset=cityscapes_mtan,tasks=sd,variant=unet",
    "dataset=isprs_potsdam,tasks=sd,variant=dense_noatt,weighting=uw",
    "dataset=cityscapes_mtan,variant=st,tasks=d", "tasks=sdn,weighting=dwa"])
def test_configs_build(arg):
    config = adamt_config(arg)
    tasks = build_tasks(config)
    assert config.model.architecture == "adamt"
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    assert set(count_params(shapes(model, *config.input_size))) >= {"encoder", "total"}
    if "dataset=" in arg:
        assert config.optimizer.learning_rate == 1e-4 and config.optimizer.name == "adam"
    assert config.batch_size == {"nyuv2": 2, "cityscapes_mtan": 8, "isprs_potsdam": 4,
                                 "synthetic": 8}[config.dataset.name]


def test_config_errors():
    with pytest.raises(UserError, match="one letter"):
        adamt_config("variant=st,tasks=sd")
    with pytest.raises(UserError, match="at least two"):
        adamt_config("tasks=s")
    with pytest.raises(UserError, match="no surface normals"):
        adamt_config("dataset=cityscapes_mtan,tasks=sdn")
    with pytest.raises(UserError, match="unknown variant"):
        adamt_config("variant=mtan")
    with pytest.raises(UserError, match="not in the paper"):
        adamt_config("tasks=sde")


# ------------------------------------------------------------------------- smoke training
# Two variants through the whole loop (the others' modules are covered above by shapes,
# counts and the ablation switches; their loop is the same code).
@pytest.mark.parametrize("arg", ["smoke", "smoke,variant=dense_noatt,tasks=sdr,weighting=uw"])
def test_smoke_training_every_variant(arg, data_dir, tmp_path):
    from mtl_jax.train import train_and_evaluate

    config = adamt_config(arg)
    config.dataset.data_dir = data_dir
    config.num_devices = 1
    config.num_train_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    wd = str(tmp_path / "run")
    results = train_and_evaluate(config, wd)
    assert all(np.isfinite(v) for v in results.values())
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train = [x for x in lines if "train/loss/total" in x]
    weights = {k: v for k, v in train[-1].items() if k.startswith("train/weight/")}
    assert len(weights) == len(config.tasks)
    if config.weighting.name == "grad_magnitude":  # convex weights, unequal for 2+ tasks
        assert abs(sum(weights.values()) - 1.0) < 1e-5
        if len(weights) > 1:
            assert len(set(weights.values())) > 1
    assert os.path.exists(os.path.join(wd, "predictions.png"))


@pytest.mark.parametrize("arg", ["smoke,variant=unet,tasks=sd,weighting=ew",
                                 "smoke,variant=st,tasks=d"])
def test_other_variants_train_two_steps(arg):
    """The remaining variants take two real train steps of their smoke config (the jitted
    step of ``build_experiment``; the loop around it is the one tested above)."""
    from mtl_jax.experiment import build_experiment

    config = adamt_config(arg)
    config.num_devices = 1
    exp = build_experiment(config, steps_per_epoch=2)
    h, w = config.input_size
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.uniform(size=(2, h, w, 3)), jnp.float32),
             "semseg": jnp.asarray(rng.integers(-1, 10, (2, h, w)), jnp.int32),
             "depth": jnp.asarray(rng.uniform(0.5, 5.0, (2, h, w, 1)), jnp.float32)}
    state = exp.init_state()
    before = jax.device_get(state.params)
    for _ in range(2):
        state, metrics = exp.train_step(state, {k: batch[k] for k in ("image", *config.tasks)})
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss/total"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state.params))
    assert all(jax.tree.leaves(moved["decoders"])) and any(jax.tree.leaves(moved["encoder"]))
