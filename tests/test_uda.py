"""MTL-UDA: patch discriminators, spectral norm, discriminator inputs, the two-player step.
(The kill -9 / SIGTERM resume of a UDA run, both players bit-identical, is one case of
test_training.test_kill_preempt_and_resume_are_bit_exact.)"""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, TINY_UDA_MODEL, BadLabels

from mtl_jax.data import pipeline
from mtl_jax.errors import UserError
from mtl_jax.run_support import check_label_counts, evaluate_split, label_counts
from mtl_jax.uda import inputs as uda_inputs
from mtl_jax.uda import steps as uda_steps
from mtl_jax.uda.discriminator import PatchDiscriminator, TaskDiscriminators, random_hflip
from mtl_jax.uda.run import build_uda_experiment, discriminator_parameter_count, open_uda_data


def uda_config(arg="smoke", tiny=True):
    path = os.path.join(REPO, "configs", "densemtl_uda.py")
    spec = importlib.util.spec_from_file_location("_densemtl_uda_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    if tiny:
        c.model = ml_collections.ConfigDict(TINY_UDA_MODEL)
        c.uda.scales = (0,)
    c.num_devices = 1
    return c


def _params(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ---------------------------------------------------------------- modules


def test_patch_discriminator_parameter_count():
    d = PatchDiscriminator()
    variables = {}
    for c, expected in ((1, 2_762_689), (3, 2_762_689 + 2 * 16 * 64),
                        (16, 2_762_689 + 15 * 16 * 64)):
        variables[c] = jax.eval_shape(lambda c=c: d.init(
            jax.random.key(0), jnp.zeros((1, 64, 64, c)), update_stats=False))
        assert _params(variables[c]["params"]) == expected, c
    v = variables[1]
    # power-iteration state per kernel: u [1, C_out] and sigma
    assert jax.tree.map(lambda x: x.shape, v["batch_stats"]["sn3"]) == {
        "conv3/kernel/sigma": (), "conv3/kernel/u": (1, 512)}
    out = jax.eval_shape(lambda: d.apply(jax.tree.map(jnp.zeros_like, v),
                                         jnp.zeros((2, 64, 96, 1)), update_stats=False))
    assert out.shape == (2, 2, 3, 1)  # five stride-2 convs: /32


def test_spectral_norm_sigma_converges_to_one():
    """Flax's SpectralNorm: after a few power iterations (update_stats=True) the stored sigma
    is the kernel's largest singular value, and the kernel the layer applies has σ_max ≈ 1."""
    layer = nn.SpectralNorm(nn.Conv(8, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1))))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = layer.init(jax.random.key(0), x, update_stats=False)
    kernel = 3.0 * jax.random.normal(jax.random.key(2), (4, 4, 3, 8))
    (conv_name,) = variables["params"]
    params = {"params": {conv_name: {"kernel": kernel, "bias": jnp.zeros((8,))}}}
    stats = variables["batch_stats"]
    true_sigma = np.linalg.svd(np.asarray(kernel).reshape(-1, 8), compute_uv=False)[0]
    update = jax.jit(lambda st: layer.apply({**params, "batch_stats": st}, x,
                                            update_stats=True, mutable=["batch_stats"]))
    for _ in range(25):  # one power iteration per call
        y, mut = update(stats)
        stats = mut["batch_stats"]
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(stats)[0]}
    sigma = float(next(v for k, v in flat.items() if k.endswith("sigma")))
    assert sigma == pytest.approx(true_sigma, rel=1e-3)
    normalised = np.asarray(kernel).reshape(-1, 8) / sigma
    assert np.linalg.svd(normalised, compute_uv=False)[0] == pytest.approx(1.0, abs=1e-3)
    # the layer's output is the convolution with that normalised kernel
    ref = jax.lax.conv_general_dilated(x, kernel / sigma, (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_random_hflip_flips_whole_examples():
    x = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3, 1)
    y = np.asarray(random_hflip(x, jax.random.key(3)))
    flipped = [np.array_equal(y[i], np.asarray(x[i])[:, ::-1]) for i in range(4)]
    kept = [np.array_equal(y[i], np.asarray(x[i])) for i in range(4)]
    assert all(f != k for f, k in zip(flipped, kept))
    many = random_hflip(jnp.broadcast_to(x[:1], (400, 2, 3, 1)), jax.random.key(4))
    frac = float(np.mean(np.asarray(many)[:, 0, 0, 0] != 0.0))
    assert 0.4 < frac < 0.6


def test_discriminator_inputs():
    logits = jnp.array([[[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]]])  # [1,1,2,4]
    si = np.asarray(uda_inputs.DISCRIMINATOR_INPUTS["semseg"](logits))
    np.testing.assert_allclose(si[0, 0, 0], np.full(4, -0.25 * np.log2(0.25) / 2), rtol=1e-6)
    np.testing.assert_allclose(si[0, 0, 0].sum(), 1.0, rtol=1e-6)  # uniform: entropy 1
    assert si[0, 0, 1].sum() < 1e-3  # confident: ~0
    depth = jnp.array([2.0, 4.0, 3.0, 6.0, 1.0, 1.0, 2.0, 3.0]).reshape(2, 2, 2, 1)
    mm = np.asarray(uda_inputs.DISCRIMINATOR_INPUTS["depth"](depth))
    np.testing.assert_allclose(mm.reshape(2, 4), [[0, 0.5, 0.25, 1], [0, 0, 0.5, 1]])
    n = np.asarray(uda_inputs.DISCRIMINATOR_INPUTS["normals"](jnp.array([[[[3.0, 0.0, 4.0]]]])))
    np.testing.assert_allclose(n[0, 0, 0], [0.6, 0.0, 0.8], rtol=1e-6)
    e = np.asarray(uda_inputs.DISCRIMINATOR_INPUTS["edges"](jnp.array([[[[0.0, np.log(3.0)]]]])))
    assert e.shape == (1, 1, 1, 1) and e[0, 0, 0, 0] == pytest.approx(0.75)
    assert uda_inputs.input_channels("edges", 2) == 1
    assert uda_inputs.input_channels("semseg", 13) == 13
    assert set(uda_inputs.DISCRIMINATOR_INPUTS) == {"semseg", "depth", "normals", "edges"}
    with pytest.raises(ValueError, match="no side output 1"):
        uda_inputs.discriminator_inputs({"depth": depth}, {}, ("depth",), (0, 1))


def test_task_discriminators_params_per_task_and_scale():
    keys = uda_inputs.discriminator_keys(("semseg", "depth"), (0, 1))
    assert keys == ("semseg_s0", "semseg_s1", "depth_s0", "depth_s1")
    disc = TaskDiscriminators(keys=keys)
    shapes = {"semseg_s0": (1, 32, 32, 10), "semseg_s1": (1, 32, 32, 10),
              "depth_s0": (1, 32, 32, 1), "depth_s1": (1, 32, 32, 1)}
    v = jax.eval_shape(lambda: disc.init(
        jax.random.key(0), {k: jnp.zeros(s) for k, s in shapes.items()}, update_stats=False))
    assert set(v["params"]) == set(keys)
    assert _params(v["params"]["depth_s1"]) == 2_762_689
    assert _params(v["params"]) == 2 * 2_762_689 + 2 * (2_762_689 + 9 * 16 * 64)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def uda_setup(uda_data_dir):
    config = uda_config()
    for ds in (config.dataset, config.uda.target_dataset, config.uda.source_eval_dataset):
        ds.data_dir = uda_data_dir
    uexp = build_uda_experiment(config)
    data = open_uda_data(config, splits=("train",))
    batch = {}
    for name, seed in (("source", 0), ("target", 1)):
        it = pipeline.train_iterator(data[name][0], global_batch_size=uexp.half_batch,
                                     mesh=uexp.exp.mesh, seed=seed, augment=None)
        batch[name] = next(it)
        it.close()
    return config, uexp, batch


def test_uda_state_and_discriminators_of_smoke_config(uda_setup):
    config, uexp, batch = uda_setup
    assert uexp.disc.keys == uda_inputs.discriminator_keys(tuple(uexp.exp.tasks), (0,))
    assert set(uexp.disc.keys) == {"semseg_s0", "depth_s0"}
    # smoke discriminators are 1/8 wide: 16·C·8+8 + 16·8·16+16 + 16·16·32+32 + 16·32·64+64
    # + 16·64+1 per discriminator, C = 10 for semseg and 1 for depth
    per = [16 * c * 8 + 8 + 2064 + 8224 + 32832 + 1025 for c in (10, 1)]
    assert discriminator_parameter_count(uexp) == sum(per)
    # `mtl-jax params` lists them (shapes only), after the model's total, in the total
    from mtl_jax.params_report import param_counts

    counts = param_counts(config)
    assert {k: v for k, v in counts.items() if k.startswith("discriminator/")} == {
        "discriminator/semseg_s0": per[0], "discriminator/depth_s0": per[1]}
    assert counts["total"] == counts["model total"] + sum(per)
    assert isinstance(uexp.abstract_state, uda_steps.UDATrainState)
    assert set(batch) == {"source", "target"}
    assert batch["source"]["image"].shape == (2, 32, 48, 3)
    # the two domains look different (same geometry generator, other palettes and lighting)
    assert not np.allclose(np.asarray(batch["source"]["image"]).mean(),
                           np.asarray(batch["target"]["image"]).mean(), atol=1e-3)


def test_generator_and_discriminator_updates_are_separate(uda_setup):
    """The generator update leaves every discriminator field bit-identical (and moves the
    model); the discriminator update, on the detached outputs, leaves every model field
    bit-identical (and moves the discriminators and their power-iteration state); the
    compiled step is exactly their composition."""
    config, uexp, batch = uda_setup
    exp = uexp.exp
    kwargs = dict(model=exp.model, tasks=exp.tasks, weighting=exp.weighting, tx=exp.tx,
                  disc=uexp.disc, lambda_adv=float(config.uda.lambda_adv),
                  scales=tuple(config.uda.scales), adversarial=True)
    gen = jax.jit(lambda s, b, r: uda_steps.generator_step(s, b, r, **kwargs))
    dis = jax.jit(lambda s, d, r: uda_steps.discriminator_step(s, d, r, disc=uexp.disc,
                                                               disc_tx=uexp.disc_tx))
    state = uexp.init_state()
    rng = jax.random.fold_in(state.rng, state.step)
    r_gen, r_disc = jax.random.split(rng)
    g_state, d_in, g_finite, g_metrics = gen(state, batch, r_gen)
    assert bool(g_finite)
    for f in ("disc_params", "disc_stats", "disc_opt_state"):
        assert _same(getattr(g_state, f), getattr(state, f)), f
    assert not _same(g_state.params, state.params)
    assert float(g_metrics["loss/adversarial"]) == pytest.approx(2 * np.log(2), rel=0.05)
    assert set(d_in) == {"source", "target"} and set(d_in["target"]) == set(uexp.disc.keys)
    assert d_in["source"]["semseg_s0"].shape == (2, 32, 48, 10)

    d_state, d_finite, d_metrics = dis(g_state, d_in, r_disc)
    assert bool(d_finite)
    for f in ("params", "batch_stats", "opt_state", "weighting_state"):
        assert _same(getattr(d_state, f), getattr(g_state, f)), f
    assert not _same(d_state.disc_params, g_state.disc_params)
    assert not _same(d_state.disc_stats, g_state.disc_stats)  # u and sigma advanced
    for k in uexp.disc.keys:
        assert 0.0 <= float(d_metrics[f"disc/accuracy/{k}"]) <= 1.0
        assert float(d_metrics[f"disc/loss/{k}"]) == pytest.approx(np.log(2), rel=0.1)

    # the compiled step of the loop == generator then discriminator, step counter + 1
    s1, m1 = uexp.train_step(uexp.init_state(), batch)
    assert int(s1.step) == 1 and not bool(m1["nonfinite"])
    # Same losses; same updates up to Adam's first step turning summation-order noise on
    # near-zero gradients into +-lr (two compilations fuse differently): |diff| <= 2 lr.
    for k in ("loss/total", "loss/adversarial", "loss/semseg", "loss/depth"):
        assert float(m1[k]) == pytest.approx(float(g_metrics[k]), rel=1e-5), k
    assert float(m1["disc/loss"]) == pytest.approx(float(d_metrics["disc/loss"]), rel=1e-5)
    for f in ("params", "batch_stats", "disc_params", "disc_stats"):
        for x, y in zip(_leaves(getattr(s1, f)), _leaves(getattr(d_state, f))):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2 * 3e-4, err_msg=f)
    for k in ("loss/total", "loss/adversarial", "disc/loss", "loss/semseg", "loss/depth"):
        assert k in m1 and np.isfinite(float(m1[k]))
    assert float(m1["loss/total"]) == pytest.approx(
        float(m1["loss/supervised"]) + 0.005 * float(m1["loss/adversarial"]), rel=1e-5)
    assert float(m1["loss/supervised"]) == pytest.approx(
        50 * float(m1["loss/semseg"]) + float(m1["loss/depth"]), rel=1e-5)


def test_out_of_range_labels_are_counted_and_checked(uda_setup, caplog, monkeypatch):
    """The UDA step counts the labelled half's out-of-range labels (the target half's labels
    are never read: not counted), and the UDA evaluation stops on them (or warns) like the
    train loop's, without reporting the counts as metrics."""
    config, uexp, batch = uda_setup
    bad = {}
    for half, n in (("source", 5), ("target", 7)):
        semseg = np.array(batch[half]["semseg"])
        semseg[1].reshape(-1)[:n] = 77
        bad[half] = {**batch[half], "semseg": jnp.asarray(semseg)}
    _, metrics = uexp.train_step(uexp.init_state(), bad)
    assert int(metrics["bad_labels/semseg"]) == 5 and "bad_labels/depth" not in metrics
    with pytest.raises(UserError, match=r"^the training batch of step 1 has 5 semseg label "
                                        r"pixel\(s\) outside the task's range"):
        check_label_counts("the training batch of step 1", label_counts(metrics), "error")
    _, clean = uexp.train_step(uexp.init_state(), {**bad, "source": batch["source"]})
    assert int(clean["bad_labels/semseg"]) == 0

    exp = uexp.exp
    (val,) = open_uda_data(config, splits=("val",))["target"]
    state = uexp.init_state()
    with pytest.raises(UserError, match=r"^the target's validation split has 3 semseg label "
                                        r"pixel\(s\) outside the task's range"):
        evaluate_split(exp, state, BadLabels(val, 7, 3), False,
                    where="the target's validation split")
    monkeypatch.setattr(exp, "config", config.copy_and_resolve_references())
    exp.config.label_check = "warn"
    with caplog.at_level("WARNING"):
        results = evaluate_split(exp, state, BadLabels(val, 7, 3), False)
    assert "the validation split has 3 semseg label pixel(s)" in caplog.text
    assert "semseg/miou" in results and not any(k.startswith("bad_labels") for k in results)
    assert evaluate_split(exp, state, val, False).keys() == results.keys()


def test_densemtl_smoke_config_step_shapes(uda_data_dir):
    """The DenseMTL smoke config (mTEB, side outputs): four discriminators (each task at the
    output and at side output 1); the whole step traces with the right shapes."""
    config = uda_config(tiny=False)
    uexp = build_uda_experiment(config)
    assert set(uexp.disc.keys) == {"semseg_s0", "semseg_s1", "depth_s0", "depth_s1"}
    half = {"image": jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32),
            "semseg": jax.ShapeDtypeStruct((2, 32, 48), jnp.int32),
            "depth": jax.ShapeDtypeStruct((2, 32, 48, 1), jnp.float32)}
    state, metrics = jax.eval_shape(uexp.train_step, uexp.abstract_state,
                                    {"source": half, "target": {"image": half["image"]}})
    assert jax.tree.map(lambda a: a.shape, state.disc_params) == jax.tree.map(
        lambda a: a.shape, uexp.abstract_state.disc_params)
    for k in uexp.disc.keys:
        assert metrics[f"disc/accuracy/{k}"].shape == () and f"adv/{k}" in metrics


def test_uda_config_errors():
    with pytest.raises(UserError, match="common label set"):
        uda_config("source=vkitti2,target=cityscapes")
    c = uda_config("source=synthia,target=cityscapes,model=mtl,tasks=sd")
    assert c.uda.scales == (0,) and c.num_train_steps == 90000
    assert c.optimizer.schedule == "constant" and not c.optimizer.grad_clip_norm
    assert c.uda.optimizer.to_dict() == dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.99,
                                             schedule="poly", power=0.9)
    assert c.batch_size == 4 and c.uda.lambda_adv == 0.005
    oracle = uda_config("smoke,oracle")
    assert oracle.dataset.config == "target" and not oracle.uda.adversarial
    assert oracle.uda.source_eval_dataset.config == "source"
    assert not uda_config("smoke,uda=false").uda.adversarial
