r"""XTasC-Net: task-transfer networks with cross-task consistency, and its baselines.

Commands::

    # CPU smoke run on the procedural dataset (seconds; numbers meaningless)
    mtl-jax train --config=configs/xtasc.py:smoke --workdir=workdir/xtasc_smoke
    # XTasC-Net vs Base MT-Net on the procedural dataset (CPU, same seed and steps; the
    # recorded run below used steps=150)
    for m in xtasc mt; do
      mtl-jax train --config=configs/xtasc.py:model=$m,steps=150 \
          --workdir=workdir/xtasc_synthetic_$m
    done
    # the paper's Cityscapes table (7 classes; classes=19 for the 19-class one), every variant
    for m in xtasc align mt; do
      mtl-jax train --config=configs/xtasc.py:dataset=cityscapes_mtan,model=$m \
          --workdir=workdir/cs7_$m
    done
    for t in s d; do
      mtl-jax train --config=configs/xtasc.py:dataset=cityscapes_mtan,model=st,task=$t \
          --workdir=workdir/cs7_st_$t
    done
    # NYUv2 (13 classes, λ = 1e-4): the same with dataset=nyuv2

Arguments (comma-separated after the colon):
  model=NAME     xtasc (default; consistency with the stop-gradient of the other task's
                 prediction) | align (Align-Net: against the ground truth) | mt (Base MT-Net:
                 λ = 0, no TTNets) | st (Base ST-Net: one task, give task=s or task=d)
  task=s|d       the task of model=st
  dataset=NAME   synthetic (default, procedural) | cityscapes_mtan (MTAN's 128×256 files,
                 inverse depth, as the paper) | cityscapes (official files, depth in metres,
                 built at 128×256) | nyuv2 (MTAN's 288×384 files). Build a real one first:
                 ``mtl-jax data build NAME --manual_dir=FOLDER --config=CONFIG`` with CONFIG
                 from DATASETS below (docs/datasets.md).
  classes=7|19   Cityscapes label set (default 7)
  encoder=NAME   resnet34 (default, paper) | resnet18 | resnet50
  weighting=NAME uw_xtasc (default: Σ 0.5·exp(−s)·L + s with s trained by Adam at the model's
                 learning rate; s[0] is the depth group's because the tasks are in sorted
                 order, as the reference's log_vars) | ew | gradnorm (α = 0.16, on the last
                 shared conv)
  lam=X          λ₁ = λ₂ (default 0.01 on Cityscapes and synthetic, 1e-4 on NYUv2)
  smoothing=X    label smoothing ε of the transferred segmentation loss (default 0)
  epochs=N       training epochs (paper: 250 Cityscapes / 100 NYUv2); steps=N overrides
  steps=N        training steps
  smoke          tiny data and model (ResNet-18 at width 4, 32×48 inputs, 4 steps)

The paper's recipe (defaults on the real datasets): ResNet-34 (random init unless
``--config.model.encoder_init=r34.npz``, a converted torchvision checkpoint: the released code
starts from ImageNet weights), decoders 5 × 3 × (conv3×3 + BN + ReLU) at 128 channels, TTNets
64/128/256, aligned-corner bilinear ×2 everywhere, Adam 1e-4 β = (0.9, 0.99), lr halved every 80
(Cityscapes) / 60 (NYUv2) epochs, 250 / 100 epochs, batch 8 / 6, random scale-crop
{1, 1.2, 1.5} + horizontal flip, λ = 0.01 / 1e-4, depth L1 per image over valid pixels.
Epoch schedules become steps from the training split's size: steps per epoch =
⌈N_train / batch⌉ (Cityscapes 2975 → 372, i.e. 93,000 steps, halvings at 29,760 / 59,520 /
89,280; NYUv2 795 → 133, i.e. 13,300 steps, halving at 7,980).

Expected numbers (paper, Tables I and III, XTasC-Net with uncertainty weights): Cityscapes 7
classes mIoU 66.51 %, pixel accuracy 93.56 %, depth (inverse) abs err 0.0122, rel err 19.40 %;
NYUv2 13 classes mIoU 30.31 %, pixel accuracy 63.02 %, abs err 0.5954 m, rel err 0.2235 (the
released code averages per image, ours per pixel: add ``--config.eval.compat=per_image`` to
report its per-image numbers as well, docs/models/xtasc.md). They need a GPU/TPU.

Synthetic run (dataset=synthetic; ResNet-34 at width 8 with 32-channel decoders and TTNets
16/32/64, 64×96 inputs, batch 8, Adam 1e-3 halved at 80 %), steps=150, seed 0, val 500 images
(measured 2026-11-26 on 2 CPU cores, load average 2-2.5):
  Base MT-Net  mIoU 0.244, pixel acc 0.777, depth abs err 0.940 m, RMSE 1.233 m, δ1 0.443
  XTasC-Net    mIoU 0.240, pixel acc 0.777, depth abs err 1.276 m, RMSE 3.096 m, δ1 0.403
  (trivial     mIoU 0.046, pixel acc 0.460, depth abs err 1.084 m, RMSE 1.292 m, δ1 0.398)
  XTasC consistency with the direct predictions: argmax T_d→s(ŷ_d) = argmax ŷ_s on 70.7 % of
  the pixels; mean |T_s→d(ŷ_s) − ŷ_d| = 0.679 m (δ1 0.800). Base MT-Net wins this run: level
  on semseg, clearly better depth at evaluation (XTasC-Net's depth map has far-depth outlier
  blobs after 150 steps; its training depth loss was level) -- docs/models/xtasc.md.
Time: 161 s (MT) / 168 s (XTasC) wall for the whole run (compile + first step 35 / 40 s,
3.5-4.7 / 1.7-2.1 steps/s).
"""

import math

import ml_collections

from mtl_jax.config_utils import parse_arg
from mtl_jax.errors import UserError
from mtl_jax.models.architectures.xtasc import VARIANTS as MODELS
from mtl_jax.models.encoders import LAST_SHARED_LAYER

#: name -> (builder config (None: classes-dependent), train split size, (H, W), epochs,
#: halve-lr period in epochs, batch, λ).
DATASETS = {
    "synthetic": ("source", 2000, (64, 96), 2, 1, 8, 0.01),
    "cityscapes_mtan": (None, 2975, (128, 256), 250, 80, 8, 0.01),
    "cityscapes": (None, 2975, (128, 256), 250, 80, 8, 0.01),
    "nyuv2": (None, 795, (288, 384), 100, 60, 6, 1e-4),
}
WEIGHTINGS = ("uw_xtasc", "ew", "gradnorm")
SYNTHETIC_CLASSES = 10


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``num_train`` examples (the last batch partial, as a
    PyTorch DataLoader without ``drop_last``)."""
    return math.ceil(num_train / batch_size)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, model="xtasc", task="", dataset="synthetic", classes=7,
                     encoder="resnet34", weighting="uw_xtasc", lam=-1.0, smoothing=0.0,
                     epochs=0, steps=0, smoke=False)
    if args.model not in MODELS:
        raise UserError(f"xtasc: unknown model={args.model!r}; choose from {MODELS}")
    if args.dataset not in DATASETS:
        raise UserError(f"xtasc: unknown dataset={args.dataset!r}; choose from "
                        f"{sorted(DATASETS)}")
    if args.weighting not in WEIGHTINGS:
        raise UserError(f"xtasc: weighting={args.weighting!r}; choose from {WEIGHTINGS}")
    if args.encoder not in ("resnet18", "resnet34", "resnet50"):
        raise UserError(f"xtasc: encoder={args.encoder!r}; choose resnet34, resnet18 or "
                        "resnet50")
    if args.model == "st":
        if args.task not in ("s", "d"):
            raise UserError("xtasc: model=st (Base ST-Net) needs task=s or task=d")
        tasks = ("semseg",) if args.task == "s" else ("depth",)
    else:
        if args.task:
            raise UserError("xtasc: task= only applies to model=st")
        tasks = ("semseg", "depth")
    if args.classes not in (7, 19):
        raise UserError(f"xtasc: classes must be 7 or 19, got {args.classes}")
    smoke = args.smoke
    synthetic = args.dataset == "synthetic"
    if smoke and not synthetic:
        raise UserError("smoke runs on dataset=synthetic only")
    builder_config, num_train, size, epochs, halve_every, batch, lam = DATASETS[args.dataset]

    c = ml_collections.ConfigDict()
    c.seed = 0
    if synthetic:
        h, w = (32, 48) if smoke else size
        num_train, n_val = (24, 10) if smoke else (num_train, 500)
        c.dataset = dict(name="synthetic", config=builder_config,
                         options=dict(height=h, width=w, num_train=num_train, num_val=n_val),
                         normals_from_depth=False)
        num_classes = SYNTHETIC_CLASSES
    else:
        h, w = size
        num_classes = 13 if args.dataset == "nyuv2" else args.classes
        config = None if args.dataset == "nyuv2" else f"{h}x{w}_{num_classes}cls"
        c.dataset = dict(name=args.dataset, config=config, normals_from_depth=False)
    c.input_size = (h, w)
    task_options = {"semseg": dict(num_classes=num_classes),
                    "depth": dict(loss="l1_per_image")}
    c.tasks = {t: dict(task_options[t]) for t in tasks}

    lam = args.lam if args.lam >= 0 else lam
    model = dict(
        architecture="xtasc",
        variant=args.model,
        lambda_seg=lam,
        lambda_depth=lam,
        label_smoothing=args.smoothing,
        # The consistency CE's pixels with an ignored ground-truth label: the reference's
        # Cityscapes script passes its segmentation mask (they count 0, the sum is divided by
        # all pixels); its NYUv2 script passes none (every pixel counts).
        consistency_ignore="keep" if args.dataset == "nyuv2" else "zero",
        encoder="resnet18" if smoke else args.encoder,
        encoder_kwargs=dict(width=4 if smoke else 8 if synthetic else 64),
        decoder_kwargs=dict(features=8 if smoke else 32 if synthetic else 128,
                            hidden_features=8 if smoke else 32 if synthetic else 128),
        # use_bn: conv + BN + ReLU in the TTNets (the reference's --batch_norm; a converted
        # checkpoint trained with it needs --config.model.ttnet_kwargs.use_bn=True).
        ttnet_kwargs=dict(features=(4, 8, 8) if smoke else (16, 32, 64) if synthetic
                          else (64, 128, 256), use_bn=False),
        init="xavier_normal",
        # A converted torchvision ImageNet checkpoint (.npz) for the encoder ("" = random).
        encoder_init="",
        # A whole XTaskTSNet converted with `mtl-jax convert-weights --from=xtask_mt`.
        init_from="",
        dtype="float32",
    )
    c.model = model

    batch = 4 if smoke else batch
    per_epoch = steps_per_epoch(num_train, batch)
    if args.steps:
        steps = args.steps
    elif smoke:
        steps = 4
    elif synthetic and not args.epochs:
        steps = 500
    else:
        steps = (args.epochs or epochs) * per_epoch
    lr = 1e-3 if synthetic else 1e-4  # random init at 1/8 width: a larger step helps
    boundaries = tuple(k * halve_every * per_epoch for k in range(1, 10_000)
                       if k * halve_every * per_epoch < steps)
    if synthetic:  # halve once at 80 % of a short run
        boundaries = (int(steps * 0.8),)
    c.optimizer = dict(name="adam", learning_rate=lr, b1=0.9, b2=0.99, schedule="step",
                       decay_steps=boundaries, decay_factor=0.5, warmup_steps=0,
                       grad_clip_norm=None)

    c.weighting = dict(name=args.weighting)
    if args.weighting == "uw_xtasc":
        # The reference trains s with the model's Adam (lr 1e-4, β = (0.9, 0.99)).
        c.weighting.learning_rate = lr
    elif args.weighting == "gradnorm":
        c.weighting.alpha = 0.16
        c.weighting.grad_param_prefix = LAST_SHARED_LAYER[model["encoder"]]
    c.augment = dict(enabled=True, scales=(1.0, 1.2, 1.5), flip=True)

    c.batch_size = batch
    c.eval_batch_size = 4 if smoke else (50 if synthetic else batch)
    c.num_train_steps = steps
    c.log_every_steps = 1 if smoke else (25 if synthetic else 100)
    c.eval_every_steps = steps if smoke else (250 if synthetic else 10 * per_epoch)
    c.checkpoint_every_steps = 2 if smoke else (250 if synthetic else 10 * per_epoch)
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.num_vis_examples = 4
    c.num_devices = -1
    c.prefetch = 2
    c.skip_nonfinite = False
    c.trivial_baseline = not smoke
    c.baseline_results = ""
    # Reference codes' metric averaging reported next to ours (docs/metrics.md "compat"):
    # 'per_image' gives the released code's per-image mIoU, pixel accuracy and depth errors.
    c.eval = dict(compat="")
    return c
