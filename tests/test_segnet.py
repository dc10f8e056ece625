"""SegNet family: pooling with indices, exact parameter counts, every model's smoke
training step, ATI-Net's staged training (switch, reset, resume) and the MTAN converter."""

import importlib.util
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.errors import UserError
from mtl_jax.models import build_model
from mtl_jax.models.layers import max_pool
from mtl_jax.models.pooling import max_pool_with_mask, max_unpool, torch_indices


def _segnet_config(arg):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "segnet.py")
    spec = importlib.util.spec_from_file_location("_segnet_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ----------------------------------------------------------------------------- pooling


def _loop_pool(x):
    """PyTorch's MaxPool2d(2, 2, return_indices=True) written as a loop (first max wins)."""
    b, h, w, c = x.shape
    out = np.zeros((b, h // 2, w // 2, c), x.dtype)
    idx = np.zeros((b, h // 2, w // 2, c), np.int64)
    for n in range(b):
        for ch in range(c):
            for i in range(h // 2):
                for j in range(w // 2):
                    best, arg = -np.inf, -1
                    for di in range(2):
                        for dj in range(2):
                            v = x[n, 2 * i + di, 2 * j + dj, ch]
                            if v > best:
                                best, arg = v, (2 * i + di) * w + (2 * j + dj)
                    out[n, i, j, ch], idx[n, i, j, ch] = best, arg
    return out, idx


def _loop_unpool(values, idx, h, w):
    b, _, _, c = values.shape
    out = np.zeros((b, h, w, c), values.dtype)
    for n in range(b):
        for ch in range(c):
            for flat, v in zip(idx[n, ..., ch].ravel(), values[n, ..., ch].ravel(), strict=True):
                out[n, flat // w, flat % w, ch] = v
    return out


def test_pool_and_unpool_match_a_direct_loop_including_ties():
    rng = np.random.default_rng(0)
    # Integers in {0, 1, 2}: most windows have tied maxima.
    x = rng.integers(0, 3, size=(2, 6, 8, 3)).astype(np.float32)
    x[0, 0:2, 0:2, 0] = 1.0  # a window of four equal values: index of the top-left one
    pooled, mask = max_pool_with_mask(jnp.asarray(x))
    want, want_idx = _loop_pool(x)
    np.testing.assert_array_equal(np.asarray(pooled), want)
    np.testing.assert_array_equal(np.asarray(torch_indices(mask)), want_idx)
    assert int(torch_indices(mask)[0, 0, 0, 0]) == 0
    assert np.asarray(mask).sum() == pooled.size  # exactly one winner per window
    np.testing.assert_array_equal(np.asarray(max_pool(jnp.asarray(x), (2, 2), (2, 2))), want)
    values = rng.normal(size=want.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(max_unpool(jnp.asarray(values), mask)),
                                  _loop_unpool(values, want_idx, 6, 8))
    # continuous random input too
    y = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    p, m = max_pool_with_mask(jnp.asarray(y))
    wp, wi = _loop_pool(y)
    np.testing.assert_array_equal(np.asarray(p), wp)
    np.testing.assert_array_equal(np.asarray(torch_indices(m)), wi)


def test_pool_gradient_goes_to_the_first_maximum_only():
    x = jnp.asarray(np.array([[3.0, 3.0], [1.0, 3.0]], np.float32)[None, :, :, None])
    g = jax.grad(lambda v: max_pool_with_mask(v)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_odd_sizes_are_refused_with_a_clear_error():
    with pytest.raises(UserError, match="divisible by 32"):
        max_pool_with_mask(jnp.zeros((1, 5, 8, 1)))
    model = build_model(dict(architecture="segnet_split", width=4), {"semseg": 3})
    with pytest.raises(UserError, match="even height and width"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)),
                                          train=False))


# ----------------------------------------------------------------------------- counts

T3 = {"semseg": 13, "depth": 1, "normals": 3}
#: ``mtl-jax params --config=configs/segnet.py:ARG,dataset=nyuv2`` totals (docs/models/segnet.md),
#: the tasks in the config's own order; the reference files count MTAN's 3 ``logsigma`` scalars,
#: i.e. our count with ``weighting=uw``.
CONFIG_COUNTS = [
    ("model=mtan", 44_229_073),
    ("model=mtan,weighting=uw", 44_229_076),
    ("model=stl", 24_981_069),
    ("model=split", 25_055_188 - 3),
    ("model=split,weighting=uw", 25_055_188),
    ("model=split_deep", 50_807_764 - 3),
    ("model=split_wide", 43_934_164 - 3),
    ("model=dense", 123_743_995 - 3),
    ("model=dense,weighting=uw", 123_743_995),
    ("model=cross_stitch", 74_941_807 - 3),
    ("model=cross_stitch,weighting=uw", 74_941_807),
    ("model=padnet", 45_938_641),
    ("model=atinet", 45_716_497),
    ("model=mtan,dataset=cityscapes_mtan", 41_206_984),
]


def _count(model, size=(32, 32)):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3)),
                                               train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])), shapes


@pytest.mark.parametrize("arg,expected", CONFIG_COUNTS, ids=[a for a, _ in CONFIG_COUNTS])
def test_parameter_counts_of_the_configs_are_the_papers(arg, expected):
    """What ``mtl-jax params`` prints for the config users run (its own task order)."""
    from mtl_jax.params_report import param_counts

    config = _segnet_config(arg if "dataset=" in arg else f"{arg},dataset=nyuv2")
    assert param_counts(config)["total"] == expected


def test_dense_count_does_not_depend_on_the_task_order():
    """MTAN's Dense: the unused last block of the shared network has class_nb (13) outputs
    whatever task comes first; without semseg the config still gives the class count."""
    from mtl_jax.params_report import param_counts

    for order in (["semseg", "depth", "normals"], ["depth", "normals", "semseg"],
                  ["normals", "semseg", "depth"]):
        config = _segnet_config("model=dense,dataset=nyuv2")
        config.task_order = order
        assert param_counts(config)["total"] == 123_743_992, order
    config = _segnet_config("model=dense,dataset=nyuv2,tasks=dn")
    assert config.model.class_nb == 13
    _, shapes = _count(build_model(config.model, {"depth": 1, "normals": 3}))
    assert shapes["params"]["encoder"]["dec0"]["cba1"]["conv"]["kernel"].shape[-1] == 13
    with pytest.raises(ValueError, match="class_nb"):
        build_model(dict(architecture="segnet_dense"), {"depth": 1, "normals": 3})


def test_uw_adds_three_and_the_cityscapes_mtan_difference_is_explained():
    from mtl_jax.params_report import param_counts

    counts = param_counts(_segnet_config("model=mtan,dataset=nyuv2,weighting=uw"))
    assert counts["weighting/uw"] == 3 and counts["total"] == 44_229_076
    assert counts["model total"] == 44_229_073
    from mtl_jax.weighting import make_weighting

    log_var = make_weighting({"name": "uw"}).init(("semseg", "depth", "normals"))["log_var"]
    np.testing.assert_array_equal(np.asarray(log_var), [-0.5, -0.5, -0.5])  # as MTAN
    assert param_counts(_segnet_config("model=split,dataset=nyuv2,weighting=uw"))[
        "total"] == 25_055_188
    ours, shapes = _count(build_model(dict(architecture="segnet_mtan"),
                                      {"semseg": 7, "depth": 1}))
    assert ours == 41_206_984
    # MTAN's code (41,228,235) also builds a level-0 encoder and decoder attention block for a
    # third task it never uses, and 3 log-variances.
    row = shapes["params"]["mtan"]["semseg"]
    unused = sum(int(np.prod(x.shape)) for k in ("att_enc_0", "att_dec_0")
                 for x in jax.tree.leaves(row[k]))
    assert ours + unused + 3 == 41_228_235


def test_xavier_normal_kernels_and_zero_biases():
    model = build_model(dict(architecture="segnet_mtan", width=16), {"semseg": 3, "depth": 1})
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.key(0))["params"]
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
    biases = [v for k, v in flat.items() if "['conv']['bias']" in k or "['out']['bias']" in k]
    assert biases and all(not np.any(b) for b in biases)
    # PyTorch xavier_normal_: untruncated normal, std = sqrt(2 / (fan_in + fan_out))
    k = flat["['encoder']['enc_conv4_1']['cba0']['conv']['kernel']"]  # 3x3x128x128
    assert abs(k.std() / np.sqrt(2.0 / (9 * 128 + 9 * 128)) - 1) < 0.01
    assert np.abs(k).max() / k.std() > 4.0  # not truncated at 2 sigma


# ----------------------------------------------------------------------------- training

# Two train steps + prediction per model (compilation dominates). ATI-Net trains in the
# staging test below (both stages, the switch and a resume).
MODELS = ["mtan", "stan", "stl", "split", "split_deep", "split_wide", "dense", "cross_stitch",
          "padnet"]


def _batch(config, b=2, seed=0):
    h, w = config.input_size
    rng = np.random.default_rng(seed)
    nrm = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    batch = {"image": rng.uniform(size=(b, h, w, 3)).astype(np.float32),
             "semseg": rng.integers(-1, 10, size=(b, h, w)).astype(np.int32),
             "depth": rng.uniform(0.5, 5.0, size=(b, h, w, 1)).astype(np.float32),
             "normals": nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)}
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_synthetic_default_is_cpu_sized_and_size_is_checked():
    c = _segnet_config("")
    assert tuple(c.input_size) == (64, 96) and c.model.width == 8
    assert (c.dataset.options.height, c.dataset.options.width) == (64, 96)
    c = _segnet_config("size=96x128,width=16")  # the GPU runs of the docstring
    assert tuple(c.input_size) == (96, 128) and c.model.width == 16
    assert (c.dataset.options.height, c.dataset.options.width) == (96, 128)
    for bad in ("size=100x128", "size=96", "size=axb"):
        with pytest.raises(UserError, match="multiples of 32"):
            _segnet_config(bad)
    with pytest.raises(UserError, match="dataset=synthetic"):
        _segnet_config("dataset=nyuv2,size=96x128")


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_with_the_smoke_config(name):
    from mtl_jax.experiment import build_experiment

    config = _segnet_config(f"model={name},smoke")
    config.num_devices = 1
    config.num_train_steps = 2
    config.model.stage_switch = 0.5 if name == "atinet" else config.model.get("stage_switch", 0)
    exp = build_experiment(config, steps_per_epoch=2)
    state = exp.init_state()
    before = jax.device_get(state.params)
    batch = _batch(config)
    for _ in range(2):
        state, metrics = exp.train_step(state, batch)
    assert int(state.step) == 2
    assert np.isfinite(float(metrics["loss/total"]))
    after = jax.device_get(state.params)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
    encoder = dict(moved["encoder"])
    if name == "dense":  # the reference's last shared decoder block feeds nothing
        assert not any(jax.tree.leaves(encoder.pop("dec0")))
    assert all(jax.tree.leaves(encoder))  # every shared parameter trained
    assert all(jax.tree.leaves(moved["decoders"]))
    preds = exp.predict_step(state, batch["image"])
    assert preds["semseg"].shape == (2, 32, 64)  # predict_step returns class ids


# ----------------------------------------------------------------------------- staging


@pytest.fixture(scope="module")
def ati():
    from mtl_jax.experiment import build_experiment

    # Two tasks: the staging logic does not depend on the task count, and a third task's
    # attention and distillation paths would only add compile time.
    config = _segnet_config("model=atinet,smoke,tasks=sd")
    config.num_devices = 1
    config.num_train_steps = 4  # switch after 2 steps
    return config, build_experiment(config, steps_per_epoch=2)


def _fresh_process(exp):
    """The experiment as a restarted process sees it: the same compiled steps (compilation is
    deterministic), a new host-side dispatcher that has not seen any step yet."""
    from mtl_jax import staging

    old = exp.train_step
    return SimpleNamespace(train_step=staging.StagedTrainStep(old.stage_one, old.stage_two,
                                                              old.switch, old.reset))


def _copy(state):
    return jax.tree.map(jnp.copy, state)


def _run(exp, state, n, batches):
    for i in range(n):
        del i
        state, _ = exp.train_step(state, batches[int(state.step)])
    return state


def _leaves(tree):
    def arr(v):  # typed PRNG keys (the state's rng) compare by their key data
        if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
            v = jax.random.key_data(v)
        return np.asarray(jax.device_get(v))
    return {jax.tree_util.keystr(p): arr(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_atinet_staged_training_switch_reset_and_resume(ati):
    config, exp = ati
    batches = [_batch(config, seed=s) for s in range(4)]
    assert exp.train_step.switch == 2
    s0 = exp.init_state()
    s2 = _run(exp, _copy(s0), 2, batches)
    # stage 1 never touches the latent distillation (bypassed): its values are the init's
    np.testing.assert_array_equal(
        jax.device_get(s2.params["encoder"]["latent"]["semseg_deconv0"]["conv"]["kernel"]),
        jax.device_get(s0.params["encoder"]["latent"]["semseg_deconv0"]["conv"]["kernel"]))
    s2_keep = _copy(s2)
    final = _leaves(_run(exp, _copy(s2), 2, batches))

    # The reset changes exactly the task attention rows and the heads (values, batch
    # statistics and optimiser moments), nothing else.
    reset = exp.train_step.reset(_copy(s2_keep))
    old, new = _leaves(s2_keep), _leaves(reset)
    prefixes = ("['mtan']['semseg']", "['mtan']['depth']", "['mtan']['normals']",
                "['decoders']")
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed, "the reset changed nothing"
    for k in old:
        under = any(p in k for p in prefixes)
        if k.startswith((".params", ".batch_stats")):
            assert (k in changed) == under, k  # exactly the intended parameters changed
        elif k.startswith(".opt_state") and under:
            assert not np.any(new[k]), k  # fresh moments
        else:
            assert k not in changed, k
    assert any("['mtan']['shared_enc0']" in k for k in old)  # shared convs exist, untouched
    assert not any("shared_enc" in k for k in changed)

    # Killed before the switch (state after 1 step, a fresh process): resets at step 2.
    s1 = _run(_fresh_process(exp), _copy(s0), 1, batches)
    exp_b2 = _fresh_process(exp)
    before = _leaves(_run(exp_b2, s1, 3, batches))
    for k in final:
        np.testing.assert_array_equal(before[k], final[k], err_msg=k)

    # Killed after the switch (state after 3 steps): resumes in stage 2, no second reset.
    s3 = _run(_fresh_process(exp), _copy(s0), 3, batches)
    exp_c2 = _fresh_process(exp)
    calls = []
    real_reset = exp_c2.train_step.reset
    exp_c2.train_step.reset = lambda st: calls.append(1) or real_reset(st)
    after = _leaves(_run(exp_c2, s3, 1, batches))
    assert not calls
    for k in final:
        np.testing.assert_array_equal(after[k], final[k], err_msg=k)
    # the stage-2 steps trained the latent distillation
    assert not np.array_equal(
        final[".params['encoder']['latent']['semseg_deconv0']['conv']['kernel']"],
        _leaves(s0)[".params['encoder']['latent']['semseg_deconv0']['conv']['kernel']"])


# ----------------------------------------------------------------------------- converter


def _mtan_reference_state_dict(f, class_nb, rng):
    """Names and shapes of lorenmt/mtan's ``SegNet`` (model_segnet_mtan.py) with widths ``f``,
    written from its constructor; random values."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    def layer(name, cin, cout):
        conv(f"{name}.0", cin, cout, 3)
        bn(f"{name}.1", cout)

    def att(name, c0, c1, c2):
        conv(f"{name}.0", c0, c1, 1)
        bn(f"{name}.1", c1)
        conv(f"{name}.3", c1, c2, 1)
        bn(f"{name}.4", c2)

    layer("encoder_block.0", 3, f[0])
    layer("decoder_block.0", f[0], f[0])
    for i in range(4):
        layer(f"encoder_block.{i + 1}", f[i], f[i + 1])
        layer(f"decoder_block.{i + 1}", f[i + 1], f[i])
    layer("conv_block_enc.0", f[0], f[0])
    layer("conv_block_dec.0", f[0], f[0])
    for i in range(4):
        if i == 0:
            layer("conv_block_enc.1", f[1], f[1])
            layer("conv_block_dec.1", f[0], f[0])
        else:
            for k in range(2):
                layer(f"conv_block_enc.{i + 1}.{k}", f[i + 1], f[i + 1])
                layer(f"conv_block_dec.{i + 1}.{k}", f[i], f[i])
    for j in range(3):
        att(f"encoder_att.{j}.0", f[0], f[0], f[0])
        att(f"decoder_att.{j}.0", 2 * f[0], f[0], f[0])
        for i in range(4):
            att(f"encoder_att.{j}.{i + 1}", 2 * f[i + 1], f[i + 1], f[i + 1])
            att(f"decoder_att.{j}.{i + 1}", f[i + 1] + f[i], f[i], f[i])
    layer("encoder_block_att.0", f[0], f[1])
    layer("decoder_block_att.0", f[0], f[0])
    for i in range(4):
        if i < 3:
            layer(f"encoder_block_att.{i + 1}", f[i + 1], f[i + 2])
            layer(f"decoder_block_att.{i + 1}", f[i + 1], f[i])
        else:
            layer(f"encoder_block_att.{i + 1}", f[i + 1], f[i + 1])
            layer(f"decoder_block_att.{i + 1}", f[i + 1], f[i + 1])
    for t, c in enumerate((class_nb, 1, 3)):
        conv(f"pred_task{t + 1}.0", f[0], f[0], 3)
        conv(f"pred_task{t + 1}.1", f[0], c, 1)
    shapes["logsigma"] = (3,)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_convert_weights_from_mtan_round_trip(tmp_path):
    from mtl_jax.main import main
    from mtl_jax.models import converters

    rng = np.random.default_rng(0)
    sd = _mtan_reference_state_dict((4, 8, 16, 32, 32), 13, rng)
    src, dst = tmp_path / "mtan.npz", tmp_path / "ours.npz"
    np.savez(src, **sd)
    assert main(["convert-weights", "--from=mtan", str(src), str(dst)]) == 0
    flat = converters.load_variables(dst)
    model = build_model(dict(architecture="segnet_mtan", width=4), T3)
    _, shapes = _count(model)
    params, stats = converters.apply_variables(shapes["params"], shapes["batch_stats"], flat)
    # every model leaf filled (strict), every source array used once: parameters + running
    # statistics + the two dropped kinds (num_batches_tracked, logsigma)
    n_src = sum(1 for k in sd if not k.endswith("num_batches_tracked") and k != "logsigma")
    assert len(flat) == n_src == len(jax.tree.leaves(params)) + len(jax.tree.leaves(stats))
    np.testing.assert_array_equal(params["encoder"]["enc_conv3_1"]["cba0"]["conv"]["kernel"],
                                  sd["conv_block_enc.3.1.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["mtan"]["depth"]["att_dec_4"]["conv1"]["bias"],
                                  sd["decoder_att.1.4.3.bias"])
    np.testing.assert_array_equal(stats["mtan"]["shared_dec2"]["cba0"]["bn"]["var"],
                                  sd["decoder_block_att.2.1.running_var"])
    np.testing.assert_array_equal(params["decoders"]["normals"]["out"]["kernel"][0, 0],
                                  sd["pred_task3.1.weight"][:, :, 0, 0].T)
    # a foreign array is refused, naming it
    np.savez(src, **sd, extra_head=np.zeros(3, np.float32))
    with pytest.raises(UserError, match="extra_head"):
        converters.convert_file("mtan", src, dst)
