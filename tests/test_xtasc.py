"""XTasC-Net: parameter counts, TTNet, the decoder options, the two loss groups by
hand, the train-step hook, the xtask_mt converter and smoke training of the four variants."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.evaluation.pictures import prediction_grid
from mtl_jax.main import main
from mtl_jax.models import build_model, format_param_table
from mtl_jax.models.converters import CONVERTERS, apply_variables
from mtl_jax.models.decoders.unet import UNetDecoder
from mtl_jax.models.interaction.ttnet import TTNet
from mtl_jax.models.layers import resize_bilinear
from mtl_jax.params_report import param_counts
from mtl_jax.steps import forward_losses, task_losses
from mtl_jax.tasks import make_task
from mtl_jax.tasks.compat import COMPAT, parse_compat
from mtl_jax.tasks.cross_task import XTasCLossGroups, label_smoothing_ce, masked_l1_per_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xtasc_config(arg=""):
    spec = importlib.util.spec_from_file_location("xtasc_cfg",
                                                  os.path.join(REPO, "configs", "xtasc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------------- parameter counts
def test_param_counts_cityscapes_7_classes_per_part():
    counts = param_counts(xtasc_config("dataset=cityscapes_mtan"))
    # The model's parts and their total (the paper's count), then the two learnable log-variances
    # of uw_xtasc (a weighting row, as MTAN's "+3 with uw") and the total with them.
    assert counts == {
        "encoder": 21_284_672,
        "decoders/depth": 3_249_920,
        "decoders/semseg": 3_250_688,
        "transfer/depth_to_semseg": 1_882_496,
        "transfer/semseg_to_depth": 1_885_568,
        "model total": 31_553_344,
        "weighting/uw_xtasc": 2,
        "total": 31_553_344 + 2,
    }
    # What `mtl-jax params --config=configs/xtasc.py:dataset=cityscapes_mtan` prints.
    lines = format_param_table(counts).splitlines()
    assert lines[-3:] == ["model total               31,553,344",
                          "weighting/uw_xtasc                 2",
                          "total                     31,553,346"]


@pytest.mark.parametrize("arg, total", [("dataset=cityscapes_mtan,classes=19", 31_562_560),
                                        ("dataset=nyuv2", 31_557_952)])
def test_param_counts_19_classes_and_nyuv2(arg, total):
    counts = param_counts(xtasc_config(arg))
    assert counts["model total"] == counts["total"] - counts["weighting/uw_xtasc"] == total


def test_unet_decoder_hidden_width_and_default_unchanged():
    feats = [jnp.zeros((1, 16 // 2 ** i, 24 // 2 ** i, c)) for i, c in
             enumerate((64, 64, 128, 256, 512))]

    def shapes(**kw):
        dec = UNetDecoder(out_channels=7, **kw)
        v = jax.eval_shape(lambda: dec.init(jax.random.key(0), feats, (32, 48), train=False))
        return {k: v.shape for k, v in traverse_util.flatten_dict(v["params"], sep="/").items()}

    default = shapes(features=128)
    assert sum(np.prod(s) for s in default.values()) == 3_250_688
    hidden = shapes(features=128, hidden_features=32)
    assert hidden["block1_conv1/conv/kernel"] == (3, 3, 512, 32)
    assert hidden["block1_conv2/conv/kernel"] == (3, 3, 32, 32)
    assert hidden["block1_conv3/conv/kernel"] == (3, 3, 32, 128)
    assert hidden["block2_conv1/conv/kernel"] == (3, 3, 128 + 256, 32)


def test_unet_decoder_aligned_corners_upsampling():
    """The final ×2 is PyTorch's align_corners=True: the full-size output is the aligned-corner
    bilinear resize of the output at the stem's size (where the last resize is the
    identity), and differs from the half-pixel one."""
    feats = [jax.random.normal(jax.random.key(i), (1, 16 // 2 ** i, 24 // 2 ** i, 4))
             for i in range(5)]
    out = {}
    for align in (True, False):
        dec = UNetDecoder(features=4, convs_per_block=1, out_channels=2, align_corners=align)
        v = dec.init(jax.random.key(0), feats, (32, 48), train=False)
        full, _ = dec.apply(v, feats, (32, 48), train=False)
        low, _ = dec.apply(v, feats, (16, 24), train=False)
        np.testing.assert_allclose(full, resize_bilinear(low, (32, 48), align_corners=align),
                                   rtol=1e-5, atol=1e-6)
        out[align] = full
    assert not np.allclose(out[True], out[False], atol=1e-4)


# --------------------------------------------------------------------------------- TTNet
def test_ttnet_shapes_log_softmax_input_and_odd_sizes():
    x = jax.random.normal(jax.random.key(1), (2, 20, 36, 5))
    net = TTNet(out_channels=1, features=(4, 8, 8), log_softmax_input=True)
    v = net.init(jax.random.key(0), x, train=False)
    y = net.apply(v, x, train=False)
    assert y.shape == (2, 20, 36, 1) and y.dtype == jnp.float32
    # log-softmax of the input: a per-pixel constant shift of the logits changes nothing
    shift = jax.random.normal(jax.random.key(2), (2, 20, 36, 1))
    np.testing.assert_allclose(net.apply(v, x + shift, train=False), y, atol=1e-5)
    raw = TTNet(out_channels=3, features=(4, 8, 8))
    xr = jax.random.normal(jax.random.key(3), (1, 21, 30, 1))
    vr = raw.init(jax.random.key(0), xr, train=False)
    assert raw.apply(vr, xr, train=False).shape == (1, 21, 30, 3)
    assert raw.apply(vr, xr + 1.0, train=False).shape == (1, 21, 30, 3)
    names = set(traverse_util.flatten_dict(vr["params"], sep="/"))
    assert {"enc1_conv1/bias", "dec2_conv1/kernel", "dec3_conv2/bias", "head/kernel"} <= names
    assert "head/bias" not in names
    # skips are concatenated after the upsampled map: dec2 sees 8 + 8, dec3 4 + 4 channels
    assert vr["params"]["dec2_conv1"]["kernel"].shape == (3, 3, 16, 4)
    assert vr["params"]["dec3_conv1"]["kernel"].shape == (3, 3, 8, 4)
    bn = TTNet(out_channels=3, features=(4, 8, 8), use_bn=True)
    vb = bn.init(jax.random.key(0), xr, train=False)
    assert "bn" in vb["params"]["enc1_conv1"] and "batch_stats" in vb


# ------------------------------------------------------------------------ loss groups
@pytest.fixture(scope="module")
def example():
    """2×4×6 example, 3 classes, with ignore pixels and invalid depth."""
    rng = np.random.default_rng(0)
    b, h, w, c = 2, 4, 6, 3
    labels = rng.integers(0, c, (b, h, w)).astype(np.int32)
    labels[0, 0, :3] = -1
    labels[1, 2, 4] = -1
    depth = rng.uniform(1.0, 5.0, (b, h, w, 1)).astype(np.float32)
    depth[0, 1, :] = 0.0
    depth[1, 3, 5] = 0.0
    preds = {"semseg": rng.standard_normal((b, h, w, c)).astype(np.float32),
             "depth": rng.uniform(0.5, 5.0, (b, h, w, 1)).astype(np.float32)}
    aux = {"depth/from/semseg": rng.uniform(0.5, 5.0, (b, h, w, 1)).astype(np.float32),
           "semseg/from/depth": rng.standard_normal((b, h, w, c)).astype(np.float32)}
    batch = {"semseg": labels, "depth": depth}
    tasks = {"semseg": make_task("semseg", num_classes=c),
             "depth": make_task("depth", loss="l1_per_image")}
    return preds, aux, batch, tasks


def _np_logsoftmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _hand_l1m(p, g, m):
    per = [np.sum(np.abs(p[i] - g[i]) * m[i]) / np.sum(m[i]) for i in range(len(p))]
    return float(np.mean(per))


def _hand_ce(logits, labels, mask, eps, count=None):
    """Σ over the mask's pixels of the smoothed CE, / the mask's pixel count (or ``count``)."""
    logp = _np_logsoftmax(logits.astype(np.float64))
    c = logits.shape[-1]
    total, n = 0.0, 0
    for idx in zip(*np.nonzero(mask)):
        q = np.full(c, eps / (c - 1))
        q[labels[idx]] = 1.0 - eps
        total += -np.sum(q * logp[idx])
        n += 1
    return total / (n if count is None else count)


@pytest.mark.parametrize("target", ["prediction", "ground_truth"])
def test_loss_groups_by_hand(example, target):
    preds, aux, batch, tasks = example
    lam_s, lam_d, eps = 0.3, 0.2, 0.1
    groups = XTasCLossGroups(lambda_seg=lam_s, lambda_depth=lam_d, target=target,
                             label_smoothing=eps)
    base = {t: tasks[t].loss(preds[t], batch) for t in tasks}
    out = groups(base, preds, aux, batch, tasks)

    labels, gt = batch["semseg"], batch["depth"][..., 0]
    valid_s, valid_d = labels >= 0, gt > 0
    ce = _hand_ce(preds["semseg"], labels, valid_s, 0.0)
    l1 = _hand_l1m(preds["depth"][..., 0], gt, valid_d)
    np.testing.assert_allclose(base["semseg"], ce, rtol=1e-5)
    np.testing.assert_allclose(base["depth"], l1, rtol=1e-5)
    if target == "prediction":
        xtc_d = _hand_l1m(aux["depth/from/semseg"][..., 0], preds["depth"][..., 0], valid_d)
        # the reference's LabelSmoothingLoss with the segmentation mask: the ignored pixels
        # count 0, the sum is divided by all 2·4·6 pixels
        xtc_s = _hand_ce(aux["semseg/from/depth"], preds["semseg"].argmax(-1), valid_s, eps,
                         count=valid_s.size)
    else:
        xtc_d = _hand_l1m(aux["depth/from/semseg"][..., 0], gt, valid_d)
        xtc_s = _hand_ce(aux["semseg/from/depth"], labels, valid_s, eps)
    np.testing.assert_allclose(out["semseg"], (1 - lam_s) * ce + lam_s * xtc_d, rtol=1e-5)
    np.testing.assert_allclose(out["depth"], (1 - lam_d) * l1 + lam_d * xtc_s, rtol=1e-5)


def test_consistency_ce_zeroes_ignored_pixels_and_divides_by_all_pixels():
    """The reference's normalisation of the consistency CE (``LabelSmoothingLoss`` with the
    mask of its Cityscapes script), on a batch small enough to write out: image 0 is 1×4 with
    2 classes, image 1 is padding (example_mask 0) and must not count anywhere."""
    tasks = {"semseg": make_task("semseg", num_classes=2),
             "depth": make_task("depth", loss="l1_per_image")}
    # T_d→s logits: p = (3/4, 1/4) at every pixel; the direct prediction's argmax is
    # (0, 1, 0, 1) on image 0, so the per-pixel CE is log(4/3), log 4, log(4/3), log 4.
    t_logits = np.zeros((2, 1, 4, 2), np.float32)
    t_logits[..., 0] = np.log(3.0)
    seg_pred = np.zeros((2, 1, 4, 2), np.float32)
    seg_pred[0, 0, [0, 2], 0] = 1.0
    seg_pred[0, 0, [1, 3], 1] = 1.0
    seg_pred[1, ..., 1] = 5.0  # padding: argmax 1 everywhere, CE log 4 each if counted
    # ground truth: pixel 1 of image 0 is ignored (its CE, log 4, must count 0)
    labels = np.array([[[0, -1, 0, 1]], [[1, 1, 1, 1]]], np.int32)
    depth = np.ones((2, 1, 4, 1), np.float32)
    batch = {"semseg": labels, "depth": depth, "example_mask": np.array([1.0, 0.0])}
    preds = {"semseg": seg_pred, "depth": np.ones((2, 1, 4, 1), np.float32)}
    aux = {"semseg/from/depth": t_logits, "depth/from/semseg": np.ones((2, 1, 4, 1),
                                                                       np.float32)}
    l43, l4 = np.log(4.0 / 3.0), np.log(4.0)
    zero = (l43 + l43 + l4) / 4  # Σ over the 3 labelled pixels / all 4 pixels
    keep = (l43 + l4 + l43 + l4) / 4  # every pixel
    valid_mean = (l43 + l43 + l4) / 3  # (not the reference: / the labelled pixels)
    assert len({round(zero, 6), round(keep, 6), round(valid_mean, 6)}) == 3
    key = "semseg/from/depth"
    default = XTasCLossGroups().cross_terms(preds, aux, batch, tasks)[key]
    np.testing.assert_allclose(float(default), zero, rtol=1e-6)
    kept = XTasCLossGroups(consistency_ignore="keep").cross_terms(preds, aux, batch, tasks)
    np.testing.assert_allclose(float(kept[key]), keep, rtol=1e-6)
    # with label smoothing ε = 0.2 (2 classes: 0.8 on the label, 0.2 on the other one)
    eps = 0.2
    lp0, lp1 = np.log(0.75), np.log(0.25)
    ce0, ce1 = -(0.8 * lp0 + 0.2 * lp1), -(0.8 * lp1 + 0.2 * lp0)
    smoothed = XTasCLossGroups(label_smoothing=eps).cross_terms(preds, aux, batch, tasks)
    np.testing.assert_allclose(float(smoothed[key]), (ce0 + ce0 + ce1) / 4, rtol=1e-6)
    # the group: (1 − λ₂)·L1ₘ + λ₂·CE (L1ₘ = 0 here: prediction = ground truth)
    out = XTasCLossGroups(lambda_depth=0.25)({"semseg": 0.0, "depth": 0.0}, preds, aux, batch,
                                             tasks)
    np.testing.assert_allclose(float(out["depth"]), 0.25 * zero, rtol=1e-6)
    # Align-Net keeps the mean over the labelled pixels (CrossEntropyLoss(ignore_index)):
    # labels (0, ·, 0, 1) → log(4/3), log(4/3), log 4 over 3 pixels
    align = XTasCLossGroups(target="ground_truth").cross_terms(preds, aux, batch, tasks)
    np.testing.assert_allclose(float(align[key]), valid_mean, rtol=1e-6)
    with pytest.raises(UserError, match="consistency_ignore"):
        XTasCLossGroups(consistency_ignore="mean")


def test_consistency_ignore_in_the_configs():
    """Cityscapes and synthetic zero the ignored pixels (the reference's Cityscapes script
    passes its mask); NYUv2 keeps every pixel (its NYUv2 script passes none)."""
    expected = {"cityscapes_mtan": "zero", "cityscapes": "zero", "synthetic": "zero",
                "nyuv2": "keep"}
    for dataset, mode in expected.items():
        config = xtasc_config(f"dataset={dataset}")
        assert config.model.consistency_ignore == mode
        model = build_model(config.model, {"depth": 1, "semseg": 7})
        assert model.loss_groups.consistency_ignore == mode
    assert build_model({"architecture": "xtasc"}, {"semseg": 3, "depth": 1}
                       ).loss_groups.consistency_ignore == "zero"


def test_consistency_targets_are_stop_gradients(example):
    preds, aux, batch, tasks = example
    groups = XTasCLossGroups(lambda_seg=0.5, lambda_depth=0.5)

    def group(name, p):
        base = {t: tasks[t].loss(p[t], batch) for t in tasks}
        return groups(base, p, aux, batch, tasks)[name]

    g_seg = jax.grad(lambda p: group("semseg", p))(preds)
    g_dep = jax.grad(lambda p: group("depth", p))(preds)
    assert not np.any(g_seg["depth"]) and np.any(g_seg["semseg"])
    assert not np.any(g_dep["semseg"]) and np.any(g_dep["depth"])
    # Align-Net: the targets are labels, same independence
    align = XTasCLossGroups(lambda_seg=0.5, lambda_depth=0.5, target="ground_truth")
    ga = jax.grad(lambda a: align({t: 0.0 for t in tasks}, preds, a, batch, tasks)["semseg"])(
        aux)
    assert np.any(ga["depth/from/semseg"]) and not np.any(ga["semseg/from/depth"])


def test_loss_helpers_edge_cases():
    m = np.zeros((2, 2, 2), bool)
    m[0, 0, 0] = True  # image 1 has no valid pixel: it does not count in the mean
    p = np.full((2, 2, 2), 3.0)
    g = np.ones((2, 2, 2))
    assert float(masked_l1_per_image(p, g, m)) == 2.0
    assert float(masked_l1_per_image(p, g, np.zeros_like(m))) == 0.0
    logits = np.log(np.array([[[[0.5, 0.25, 0.25]]]]))
    assert np.isclose(float(label_smoothing_ce(logits, np.zeros((1, 1, 1)), np.ones((1, 1, 1)))),
                      np.log(2))
    with pytest.raises(UserError, match="target"):
        XTasCLossGroups(target="labels")
    with pytest.raises(UserError, match="lambda_seg"):
        XTasCLossGroups(lambda_seg=2.0)
    with pytest.raises(UserError, match="missing"):
        XTasCLossGroups()({}, {"semseg": p}, {}, {}, {"semseg": None})


# -------------------------------------------------------------- model + train-step hook
@pytest.fixture(scope="module")
def tiny_model():
    cfg = dict(architecture="xtasc", encoder="resnet18", encoder_kwargs=dict(width=4),
               decoder_kwargs=dict(features=8, hidden_features=4),
               ttnet_kwargs=dict(features=(4, 8, 8)), lambda_seg=0.2, lambda_depth=0.1)
    model = build_model(cfg, {"depth": 1, "semseg": 3})
    image = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), image)
    return model, variables, image


def test_model_returns_transferred_predictions(tiny_model):
    model, variables, image = tiny_model
    assert set(variables["params"]) == {"encoder", "decoders", "transfer"}
    assert set(variables["params"]["transfer"]) == {"semseg_to_depth", "depth_to_semseg"}
    preds, aux = jax.jit(functools.partial(model.apply, train=False))(variables, image)
    assert aux["depth/from/semseg"].shape == (2, 32, 48, 1)
    assert aux["semseg/from/depth"].shape == (2, 32, 48, 3)
    # the transferred depth is the TTNet of the segmentation logits
    tt = model.transfers[0][2]
    direct = tt.apply({"params": variables["params"]["transfer"]["semseg_to_depth"]},
                      preds["semseg"], train=False)
    np.testing.assert_allclose(aux["depth/from/semseg"], direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="separable"):
        model.apply(variables, [], (32, 48), "depth", False, method=model.decode_task)


def test_forward_losses_use_the_loss_groups(tiny_model, example):
    model, variables, image = tiny_model
    rng = np.random.default_rng(1)
    batch = {"image": image,
             "semseg": rng.integers(-1, 3, (2, 32, 48)).astype(np.int32),
             "depth": rng.uniform(0.0, 4.0, (2, 32, 48, 1)).astype(np.float32)}
    tasks = {"depth": make_task("depth", loss="l1_per_image"),
             "semseg": make_task("semseg", num_classes=3)}
    fwd = jax.jit(functools.partial(forward_losses, model=model, tasks=tasks, train=False))
    losses, preds, aux, _ = fwd(variables["params"], variables["batch_stats"], batch,
                                jax.random.key(0))
    plain = {t: tasks[t].loss(preds[t], batch) for t in tasks}
    expected = model.loss_groups(plain, preds, aux, batch, tasks)
    for t in tasks:
        np.testing.assert_allclose(losses[t], expected[t], rtol=1e-6)
        assert not np.isclose(losses[t], plain[t])
    # a model without the hook: the plain task losses
    assert task_losses(object(), tasks, preds, aux, batch) == plain


def test_builder_errors():
    with pytest.raises(ValueError, match="needs the tasks"):
        build_model({"architecture": "xtasc"}, {"semseg": 3, "normals": 3})
    with pytest.raises(ValueError, match="one task"):
        build_model({"architecture": "xtasc", "variant": "st"}, {"semseg": 3, "depth": 1})
    with pytest.raises(ValueError, match="unknown xtasc variant"):
        build_model({"architecture": "xtasc", "variant": "pad"}, {"semseg": 3})
    model = build_model({"architecture": "xtasc", "variant": "mt"}, {"semseg": 3, "depth": 1})
    assert model.transfers == () and model.loss_groups is None


def test_prediction_grid_shows_transferred_predictions():
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(2, 8, 12, 3)).astype(np.float32),
             "semseg": rng.integers(0, 3, (2, 8, 12)), "depth": rng.uniform(1, 2, (2, 8, 12, 1))}
    preds = {"depth": batch["depth"], "semseg": batch["semseg"],
             "depth/from/semseg": batch["depth"] * 1.1, "semseg/from/depth": batch["semseg"]}
    grid = prediction_grid(batch, preds, max_examples=2)
    plain = prediction_grid(batch, {k: preds[k] for k in ("depth", "semseg")}, max_examples=2)
    assert grid.shape[0] == plain.shape[0] and grid.shape[1] > plain.shape[1]


# -------------------------------------------------------------------------- configs
def test_config_schedules_in_steps_and_recipe():
    cs = xtasc_config("dataset=cityscapes_mtan")
    assert cs.num_train_steps == 250 * 372 and cs.batch_size == 8
    assert tuple(cs.optimizer.decay_steps) == (80 * 372, 160 * 372, 240 * 372)
    assert cs.optimizer.decay_factor == 0.5 and cs.optimizer.b2 == 0.99
    assert cs.optimizer.learning_rate == 1e-4 and cs.model.lambda_seg == 0.01
    assert cs.augment.scales == (1.0, 1.2, 1.5) and cs.augment.flip
    nyu = xtasc_config("dataset=nyuv2")
    assert nyu.num_train_steps == 100 * 133 and tuple(nyu.optimizer.decay_steps) == (60 * 133,)
    assert nyu.model.lambda_depth == 1e-4 and nyu.batch_size == 6
    assert nyu.tasks.semseg.num_classes == 13
    # uw_xtasc's s: the depth group first, then semseg (the reference's log_vars order)
    assert list(cs.tasks) == ["depth", "semseg"]
    g = xtasc_config("weighting=gradnorm")
    assert g.weighting.alpha == 0.16 and g.weighting.grad_param_prefix == "layer4_2/conv2"
    # The released code's per-image metrics: --config.eval.compat=per_image on the locked
    # config (the CLI's), covering both tasks.
    assert cs.eval.compat == ""
    cs.lock()
    cs.eval.compat = "per_image"
    assert parse_compat(cs.eval.compat) == ("per_image",)
    assert {"semseg", "depth"} <= set(COMPAT["per_image"])
    with pytest.raises(UserError, match="task=s or task=d"):
        xtasc_config("model=st")
    with pytest.raises(UserError, match="unknown model"):
        xtasc_config("model=padnet")


# ------------------------------------------------------------------------ converter
RESNET34_BLOCKS = (3, 4, 6, 3)


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def xtask_ts_shapes(num_classes=7, batch_norm=False):
    """Names and shapes of ``XTaskTSNet(enc_layers=34, out_features_segmt=num_classes,
    batch_norm=batch_norm).state_dict()`` as akarimoon/xtask_mt's current head defines them,
    written out from its module tree (not from our mapping):

    * ``pretrained_encoder``: ``layer0 = Sequential(conv1, bn1, relu)``, ``layer1 =
      Sequential(maxpool, layer1)``, ``layer2..4`` (torchvision ResNet-34);
    * ``decoder_segmt`` / ``decoder_depth`` (``DecoderSequential``): ``conv1..conv5`` are
      ``ConvBlock``s whose ``conv1..conv3`` are ``Sequential(Conv2d 3×3 with bias,
      BatchNorm2d, ReLU)`` at 128 channels; ``conv6 = Sequential(Conv2d 1×1, no bias)``;
    * ``trans_s2d`` / ``trans_d2s`` (``transfer_net.TaskTransferNetWithSkipCN``, features
      64/128/256): ``enc1 = TTDown(C_in, 64)``, ``enc2 = TTDown(64, 128)``, ``enc3 =
      TTDown(128, 256)``, ``dec1 = TTUp(256, 128)``, ``dec2 = TTUp(128 + 128, 64)``, ``dec3 =
      TTUp(64 + 64, 64)``; each ``double_conv = Sequential(SingleConvBlock(in, out),
      SingleConvBlock(out, out))`` and a ``SingleConvBlock`` is ``conv = Sequential(Conv2d
      3×3 with bias, [BatchNorm2d if batch_norm], ReLU)``; ``final_conv`` = Conv2d 1×1 without
      bias."""
    s = {"pretrained_encoder.layer0.0.weight": (64, 3, 7, 7),
         **_bn("pretrained_encoder.layer0.1", 64)}
    cin = 64
    for stage, (n, width) in enumerate(zip(RESNET34_BLOCKS, (64, 128, 256, 512)), start=1):
        pre = "pretrained_encoder.layer1.1" if stage == 1 else f"pretrained_encoder.layer{stage}"
        for b in range(n):
            s[f"{pre}.{b}.conv1.weight"] = (width, cin if b == 0 else width, 3, 3)
            s.update(_bn(f"{pre}.{b}.bn1", width))
            s[f"{pre}.{b}.conv2.weight"] = (width, width, 3, 3)
            s.update(_bn(f"{pre}.{b}.bn2", width))
            if b == 0 and stage > 1:
                s[f"{pre}.0.downsample.0.weight"] = (width, cin, 1, 1)
                s.update(_bn(f"{pre}.0.downsample.1", width))
        cin = width
    for dec, out in (("decoder_segmt", num_classes), ("decoder_depth", 1)):
        for b, cin in enumerate((512, 128 + 256, 128 + 128, 128 + 64, 128 + 64), start=1):
            for k in (1, 2, 3):
                s[f"{dec}.conv{b}.conv{k}.0.weight"] = (128, cin if k == 1 else 128, 3, 3)
                s[f"{dec}.conv{b}.conv{k}.0.bias"] = (128,)
                s.update(_bn(f"{dec}.conv{b}.conv{k}.1", 128))
        s[f"{dec}.conv6.0.weight"] = (out, 128, 1, 1)
    for tt, cin, out in (("trans_s2d", num_classes, 1), ("trans_d2s", 1, num_classes)):
        for part, i, o in (("enc1", cin, 64), ("enc2", 64, 128), ("enc3", 128, 256),
                           ("dec1", 256, 128), ("dec2", 128 + 128, 64), ("dec3", 64 + 64, 64)):
            for j, c_in in ((0, i), (1, o)):  # the two SingleConvBlocks of double_conv
                block = f"{tt}.{part}.double_conv.{j}.conv"
                s[f"{block}.0.weight"] = (o, c_in, 3, 3)
                s[f"{block}.0.bias"] = (o,)
                if batch_norm:  # conv.1 is the BatchNorm2d (else the ReLU: no arrays)
                    s.update(_bn(f"{block}.1", o))
        s[f"{tt}.final_conv.weight"] = (out, 64, 1, 1)
    return s


def _random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (np.array(3, np.int64) if not v else
                (rng.uniform(0.5, 2.0, v) if k.endswith("running_var")
                 else rng.standard_normal(v)).astype(np.float32))
            for k, v in shapes.items()}


def _n_params(shapes):
    return sum(int(np.prod(v)) for k, v in shapes.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_convert_xtask_mt_fixture_loads_into_the_model(tmp_path, capsys, batch_norm):
    shapes = xtask_ts_shapes(7, batch_norm=batch_norm)
    # two BatchNorms (weight + bias) per TTNet double conv: 2 nets × 6 parts × 2 × 2C
    bn_params = 2 * 2 * 2 * (64 + 128 + 256 + 128 + 64 + 64) if batch_norm else 0
    assert _n_params(shapes) == 31_553_344 + bn_params
    sd = _random_state_dict(shapes)
    src, dst = tmp_path / "xtask.npz", tmp_path / "ours.npz"
    np.savez(src, **sd)
    # Through the command line (`mtl-jax convert-weights --from=xtask_mt SRC DST`), which calls
    # converters.convert_file.
    assert main(["convert-weights", "--from=xtask_mt", str(src), str(dst)]) == 0
    flat = dict(np.load(dst))
    assert capsys.readouterr().out.strip() == (
        f"wrote {dst}: {len(flat)} arrays (load with --config.model.init_from={dst})")
    # one array of ours per array of the state_dict, BN counters (num_batches_tracked) aside
    n_bn = sum(k.endswith("num_batches_tracked") for k in sd)
    assert len(flat) == len(sd) - n_bn
    config = xtasc_config("dataset=cityscapes_mtan")
    config.model.ttnet_kwargs.use_bn = batch_norm

    def abstract_variables(model_cfg):
        model = build_model(model_cfg, {"depth": 1, "semseg": 7})
        return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                 jnp.zeros((1, 128, 256, 3)), train=False))

    abstract = abstract_variables(config.model)
    params, stats = apply_variables(abstract["params"], abstract["batch_stats"], flat)
    np.testing.assert_array_equal(
        params["decoders"]["semseg"]["block2_conv1"]["conv"]["kernel"],
        sd["decoder_segmt.conv2.conv1.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["decoders"]["depth"]["block5_conv3"]["bn"]["var"],
                                  sd["decoder_depth.conv5.conv3.1.running_var"])
    s2d, d2s = params["transfer"]["semseg_to_depth"], params["transfer"]["depth_to_semseg"]
    if batch_norm:
        np.testing.assert_array_equal(s2d["dec2_conv2"]["conv"]["bias"],
                                      sd["trans_s2d.dec2.double_conv.1.conv.0.bias"])
        np.testing.assert_array_equal(
            d2s["enc1_conv1"]["conv"]["kernel"],
            sd["trans_d2s.enc1.double_conv.0.conv.0.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(s2d["enc3_conv2"]["bn"]["scale"],
                                      sd["trans_s2d.enc3.double_conv.1.conv.1.weight"])
        np.testing.assert_array_equal(d2s["dec1_conv1"]["bn"]["bias"],
                                      sd["trans_d2s.dec1.double_conv.0.conv.1.bias"])
        tstats = stats["transfer"]
        np.testing.assert_array_equal(tstats["semseg_to_depth"]["dec3_conv1"]["bn"]["mean"],
                                      sd["trans_s2d.dec3.double_conv.0.conv.1.running_mean"])
        np.testing.assert_array_equal(tstats["depth_to_semseg"]["enc2_conv2"]["bn"]["var"],
                                      sd["trans_d2s.enc2.double_conv.1.conv.1.running_var"])
        # without use_bn the model has no place for the TTNets' BatchNorm: the load says so
        config.model.ttnet_kwargs.use_bn = False
        plain = abstract_variables(config.model)
        with pytest.raises(UserError, match="do not fit the model"):
            apply_variables(plain["params"], plain["batch_stats"], flat)
    else:
        np.testing.assert_array_equal(s2d["dec2_conv2"]["bias"],
                                      sd["trans_s2d.dec2.double_conv.1.conv.0.bias"])
        np.testing.assert_array_equal(
            d2s["enc1_conv1"]["kernel"],
            sd["trans_d2s.enc1.double_conv.0.conv.0.weight"].transpose(2, 3, 1, 0))
        assert "transfer" not in stats
    np.testing.assert_array_equal(d2s["head"]["kernel"],
                                  sd["trans_d2s.final_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["encoder"]["conv1"]["kernel"],
                                  sd["pretrained_encoder.layer0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["encoder"]["layer1_2"]["bn2"]["mean"],
                                  sd["pretrained_encoder.layer1.1.2.bn2.running_mean"])
    np.testing.assert_array_equal(params["encoder"]["layer3_0"]["downsample_conv"]["kernel"],
                                  sd["pretrained_encoder.layer3.0.downsample.0.weight"]
                                  .transpose(2, 3, 1, 0))


def test_convert_xtask_mt_errors():
    shapes = xtask_ts_shapes(7, batch_norm=True)
    sd = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    # a missing array and an extra one are named
    bad = dict(sd)
    bad.pop("trans_d2s.dec3.double_conv.1.conv.0.weight")
    with pytest.raises(UserError, match=r"trans_d2s\.dec3\.double_conv\.1\.conv\.0\.weight"):
        CONVERTERS["xtask_mt"](bad)
    with pytest.raises(UserError, match="extra.weight"):
        CONVERTERS["xtask_mt"]({**sd, "extra.weight": np.zeros(1)})
    # a BatchNorm in some TTNet convs only
    partial = {k: v for k, v in sd.items() if not k.startswith("trans_s2d.enc1.double_conv.0"
                                                                ".conv.1.")}
    with pytest.raises(UserError, match="all or none"):
        CONVERTERS["xtask_mt"](partial)
    # the TTNet layout of an earlier commit (plain Sequential: conv at indices 0 and 2)
    old = {k: v for k, v in sd.items() if ".double_conv." not in k}
    for tt in ("trans_s2d", "trans_d2s"):
        for part in ("enc1", "enc2", "enc3", "dec1", "dec2", "dec3"):
            for j, index in ((0, 0), (1, 2)):
                for leaf in ("weight", "bias"):
                    old[f"{tt}.{part}.double_conv.{index}.{leaf}"] = \
                        sd[f"{tt}.{part}.double_conv.{j}.conv.0.{leaf}"]
    with pytest.raises(UserError, match="earlier"):
        CONVERTERS["xtask_mt"](old)


# ------------------------------------------------------------------- smoke training
@pytest.mark.parametrize("arg", ["model=xtasc", "model=align,weighting=gradnorm",
                                 "model=mt,weighting=ew", "model=st,task=d"])
def test_smoke_training_of_the_four_variants(data_dir, tmp_path, arg):
    from mtl_jax.train import train_and_evaluate

    config = xtasc_config(arg + ",smoke,steps=2")  # the config's schedule fits 2 steps
    config.dataset.data_dir = data_dir
    config.num_devices = 1
    assert (config.num_train_steps, config.eval_every_steps,
            config.checkpoint_every_steps) == (2, 2, 2)
    wd = str(tmp_path / "run")
    results = train_and_evaluate(config, wd)
    assert all(np.isfinite(v) for v in results.values())
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train = [x for x in lines if "train/loss/total" in x]
    assert len(train) == 2
    if "xtasc" in arg or "align" in arg:
        assert {"semseg/from/depth/miou", "depth/from/semseg/abs_err",
                "semseg/from/depth/vs_pred/miou", "depth/from/semseg/vs_pred/abs_err"} \
            <= set(results)
        assert train[-1]["train/grad_norm/transfer"] > 0
    else:
        assert not any("/from/" in k for k in results)
    if "xtasc" in arg:
        assert "train/weighting/log_var/depth" in train[-1]
    assert os.path.exists(os.path.join(wd, "predictions.png"))
