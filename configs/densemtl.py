r"""DenseMTL: xTAM cross-task attention in an mTEB exchange block, and its baselines.

Commands::

    # CPU smoke run on the procedural dataset (seconds; numbers meaningless)
    mtl-jax train --config=configs/densemtl.py:dataset=synthetic,tasks=sdn,smoke \
        --workdir=workdir/densemtl_smoke
    # short CPU run on the procedural dataset: the xTAM alphas move away from 0 (logged as
    # alpha/exchange_stage1/<source>_to_<target>/alpha in metrics.jsonl and TensorBoard)
    mtl-jax train --config=configs/densemtl.py:dataset=synthetic,tasks=sdn \
        --workdir=workdir/densemtl_synthetic
    # the paper's S-D-N table on VKITTI2, ours and every baseline (GPU/TPU)
    for m in ours mtl padnet 3ways_padnet; do
      mtl-jax train --config=configs/densemtl.py:dataset=vkitti2,tasks=sdn,model=$m \
          --workdir=workdir/vkitti2_sdn_$m
    done
    for t in s d n; do
      mtl-jax train --config=configs/densemtl.py:dataset=vkitti2,model=stl,tasks=$t \
          --workdir=workdir/vkitti2_stl_$t
    done

Arguments (comma-separated after the colon):
  dataset=NAME   synthetic (default) | vkitti2 | synthia | cityscapes | nyud_mt. Build a real
                 one first: ``mtl-jax data build NAME --manual_dir=FOLDER --config=CONFIG``
                 with CONFIG from the DATASETS table below (docs/datasets.md).
  tasks=sd|sdn|sdne  task set (Table 1/2: S-D, S-D-N, S-D-N-E); with model=stl one letter.
  model=NAME     ours (mTEB at stage 1) | mtl (shared encoder + DeepLabv3 heads) | padnet
                 (PAD-Net, survey layout) | 3ways_padnet (3-ways heads + PAD-Net distillation of
                 decoder stage 2's output, the reference's PadnetPlus) | 3ways (3-ways heads, no
                 exchange: ours without mTEB) | stl (one task, DeepLabv3 head)
  stages=N       exchange placement, stages joined by '-', e.g. stages=3-1 (Table 3); default
                 1 for ours (mTEB), 2 for 3ways_padnet
  fusion=add     add | prod | concat (Table 4a); attention=spatial | channel | both (Table 4b)
  weighting=fixed  task weights: the paper's grid S-D {50, 1}, S-D-N {100, 1, 100},
                 S-D-N-E {100, 1, 100, 50} (any strategy name works, gradient-based ones too:
                 docs/weighting.md, "Coupled heads")
  steps=N        iterations (paper: 40,000, lr ×0.1 at 75 %)
  width=N        ResNet base width (paper 64); decoder and exchange channels scale with it
  encoder=NAME   resnet101 (paper, last stage dilated: output stride 16) | resnet50 | ...
  attention_impl=blocked|naive, block_size=N   correlation-guided attention implementation
  depth_scale=X  the depth head's output is multiplied by X before the inverse-depth encoding
                 (default 1 as the paper; 100 on dataset=synthetic so that a short run from
                 random weights reaches targets of 65536 / (depth_cm + 1) ~ 65..650)
  smoke          tiny data and model (ResNet-18 at width 4, 32×48 inputs, 4 steps)

Task order (``config.task_order``): the letters' order, e.g. semseg, depth, normals (the paper's
S-D-N and the reference configs'). Images are standardised as the reference's encoder does,
(x − 0.45) / 0.225 (``model.pixel_mean`` / ``pixel_std``), not with ImageNet's statistics.

Paper hyper-parameters (defaults): ResNet-101 OS16 (ImageNet initialisation in the paper: convert
torchvision's resnet101 checkpoint once with ``mtl-jax convert-weights resnet101.pth r101.npz``
(needs torch) and pass ``--config.model.encoder_init=r101.npz``; by default encoders start from
random weights), batch 2, 40k iterations, flip-only
augmentation, gradient-norm clipping 10; ours and 3ways_padnet: Adam β = (0.9, 0.98), lr 2e-4
encoder / 3e-4 decoders and exchange (Cityscapes 1e-5 / 1e-4); the survey baselines (stl, mtl,
padnet): SGD momentum 0.9, weight decay 5e-4, lr 1e-3 encoder / 1e-2 heads; ×0.1 at 30k.
Losses: semseg CE, depth berHu on 65536 / (depth_cm + 1) (metrics in metres after the exact
inverse), normals 1 − cos, edges weighted CE; multi-scale objective over side outputs 0 and 1
(PAD-Net: final + initial predictions). Metrics are those of the full-resolution output; the
half-resolution side output is reported as ``<task>/side/1/<metric>``.

Input sizes (H×W): VKITTI2 320×1024, Synthia 512×1024, Cityscapes 512×1024, NYUD-MT 448×576;
semseg classes 14 / 16 / 16 / 40. Expected numbers (paper, Table 1, S-D-N, ours): VKITTI2 mIoU
97.00 %, depth RMSE 3.089 m, normals mean error 14.44°; Synthia 82.99 % / 4.056 m / 14.30°;
Cityscapes 74.95 % / 6.407 m / 40.05°. Their reproduction needs a GPU/TPU and the ImageNet
encoder (docs/models/densemtl.md).

Hardware and time: smoke ~1 min on 2 CPU cores (mostly compilation). dataset=synthetic,tasks=sdn
(96×128, ResNet-101 at width 16, batch 8, 600 steps, evals at 200/400/600): 14 min on 2 CPU
cores (1.0 step/s) with the dataset already prepared (~1 min the first time).

Expected numbers of that synthetic run (val, 500 images; measured at commit 771da92, before
the config took the reference's standardisation and task order; not re-run since), against
the trivial predictors written to trivial_baseline.json:
  semseg   mIoU 0.475 (trivial 0.046), pixel accuracy 0.858 (0.456)
  depth    abs rel 0.152 (0.390), RMSE 0.70 m (1.32)
  normals  mean angle 18.8° (49.9°)
  half-resolution side output: mIoU 0.450, abs rel 0.159, 20.8°
  xTAM alphas (mean |α| per direction): 0 at step 0, 0.003-0.004 at step 25, 0.03-0.08 at 600
"""

import ml_collections

from mtl_jax.config_utils import parse_arg, task_set
from mtl_jax.errors import UserError

#: name -> (builder config, semseg classes, (H, W), (encoder lr, decoder lr) for Adam,
#: normals computed from depth at load time). The builders of VKITTI2, Synthia and Cityscapes
#: store normals computed from depth and intrinsics at build time, so the flag is off for all.
DATASETS = {
    "synthetic": ("source", 10, (96, 128), (2e-4, 3e-4), False),
    "vkitti2": ("320x1024_clone_random", 14, (320, 1024), (2e-4, 3e-4), False),
    "synthia": ("512x1024", 16, (512, 1024), (2e-4, 3e-4), False),
    "cityscapes": ("512x1024_16cls", 16, (512, 1024), (1e-5, 1e-4), False),
    "nyud_mt": ("448x576", 40, (448, 576), (2e-4, 3e-4), False),
}
MODELS = ("ours", "mtl", "padnet", "3ways_padnet", "3ways", "stl")
#: The paper's fixed task weights per task set (docs/models/densemtl.md).
WEIGHT_GRID = {
    ("semseg", "depth"): dict(semseg=50.0, depth=1.0),
    ("semseg", "depth", "normals"): dict(semseg=100.0, depth=1.0, normals=100.0),
    ("semseg", "depth", "normals", "edges"): dict(semseg=100.0, depth=1.0, normals=100.0,
                                                  edges=50.0),
}
DECODER_CHANNELS = (64, 128, 128, 256, 256)  # stages 0..4 at width 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, dataset="synthetic", tasks="sdn", model="ours", stages="",
                     fusion="add", attention="spatial", weighting="fixed", steps=0, width=0,
                     encoder="resnet101", attention_impl="blocked", block_size=1024,
                     depth_scale=0.0, smoke=False)
    if args.dataset not in DATASETS:
        raise UserError(f"densemtl: unknown dataset={args.dataset!r}; choose from "
                        f"{sorted(DATASETS)}")
    if args.model not in MODELS:
        raise UserError(f"densemtl: unknown model={args.model!r}; choose from {MODELS}")
    tasks = task_set(args.tasks)
    if args.model == "stl" and len(tasks) != 1:
        raise UserError(f"model=stl trains one task: give one letter, e.g. tasks=s (got "
                        f"tasks={args.tasks!r})")
    if args.model != "stl" and len(tasks) < 2:
        raise UserError(f"model={args.model} needs at least two tasks (got tasks={args.tasks!r})")
    builder_config, num_classes, size, (enc_lr, dec_lr), normals_from_depth = \
        DATASETS[args.dataset]
    synthetic = args.dataset == "synthetic"
    smoke = args.smoke
    if smoke and not synthetic:
        raise UserError("smoke runs on dataset=synthetic only")

    c = ml_collections.ConfigDict()
    c.seed = 0
    if synthetic:
        h, w = (32, 48) if smoke else size
        n_train, n_val = (24, 10) if smoke else (2000, 500)
        c.dataset = dict(name="synthetic", config=builder_config,
                         options=dict(height=h, width=w, num_train=n_train, num_val=n_val),
                         normals_from_depth=False)
    else:
        h, w = size
        c.dataset = dict(name=args.dataset, config=builder_config,
                         normals_from_depth=normals_from_depth)
    c.input_size = (h, w)

    task_options = {
        "semseg": dict(num_classes=num_classes),
        "depth": dict(loss="berhu", encoding="inverse_cm",
                      output_scale=args.depth_scale or (100.0 if synthetic else 1.0)),
        "normals": dict(),
        "edges": dict(pos_weight=0.95, neg_weight=0.05),
    }
    c.tasks = {t: dict(task_options[t]) for t in tasks}
    # The task order (the loss vector, the heads, the mTEB fusion's input blocks): the paper's
    # S-D-N-E, which is also the reference configs' and so convert-weights --from=densemtl's
    # default (docs/models/densemtl.md, "Weights from the authors' checkpoints").
    c.task_order = list(tasks)

    width = args.width or (4 if smoke else 16 if synthetic else 64)
    encoder = "resnet18" if smoke else args.encoder
    channels = tuple(max(4, ch * width // 64) for ch in DECODER_CHANNELS)
    model = dict(
        encoder=encoder,
        encoder_kwargs=dict(width=width, replace_stride_with_dilation=(False, False, True)),
        # A converted torchvision ImageNet checkpoint (.npz; `mtl-jax convert-weights`), as the
        # paper's encoder; "" = random initialisation.
        encoder_init="",
        # A whole model converted from the authors' code (mtl-jax convert-weights --from=NAME).
        init_from="",
        # The reference's encoder (monodepth2's ResnetEncoder) standardises every image as
        # (x - 0.45) / 0.225, for every DenseMTL model and baseline: not ImageNet's mean/std.
        pixel_mean=(0.45, 0.45, 0.45),
        pixel_std=(0.225, 0.225, 0.225),
        dtype="float32",
    )
    three_ways = dict(decoder="three_ways", decoder_kwargs=dict(channels=channels,
                                                                side_scales=(1,)))
    deeplab = dict(decoder="deeplab", decoder_kwargs=dict(features=channels[4]))
    # The reference's PadnetPlus distils the output of decoder stage 2 (upconv 2); its OursAtt
    # puts the mTEB after stage 1.
    stages = (tuple(int(s) for s in args.stages.split("-") if s)
              or ((2,) if args.model == "3ways_padnet" else (1,)))
    if args.model == "ours":
        model.update(three_ways, exchange=dict(
            name="mteb", stages=stages, fusion=args.fusion, attention=args.attention,
            attention_impl=args.attention_impl, block_size=args.block_size))
    elif args.model == "3ways_padnet":
        model.update(three_ways, exchange=dict(name="padnet", stages=stages))
    elif args.model == "3ways":
        model.update(three_ways)
    elif args.model == "padnet":
        model.update(decoder="padnet", decoder_kwargs=dict(width=channels[4]),
                     interaction=dict(name="padnet", width=channels[4]))
    else:  # mtl, stl
        model.update(deeplab)
    c.model = model

    c.weighting = dict(name=args.weighting)
    if args.weighting == "fixed":
        c.weighting.weights = dict(WEIGHT_GRID.get(tasks, {t: 1.0 for t in tasks}))

    steps = args.steps or (4 if smoke else 600 if synthetic else 40000)
    adam = args.model in ("ours", "3ways_padnet", "3ways")
    if adam:
        optimizer = dict(name="adam", b1=0.9, b2=0.98, learning_rate=dec_lr,
                         part_lr_multipliers={"encoder": enc_lr / dec_lr})
    else:
        optimizer = dict(name="sgd", momentum=0.9, weight_decay=5e-4, learning_rate=1e-2,
                         part_lr_multipliers={"encoder": 0.1})
    if synthetic and not smoke and adam:  # random init at 1/4 width: a larger step helps
        optimizer.update(learning_rate=1e-3, part_lr_multipliers={"encoder": 1.0})
    decay = (int(steps * 0.75),) if steps >= 2 else ()  # a 1-step run has no decay point
    c.optimizer = dict(optimizer, schedule="step", decay_steps=decay,
                       decay_factor=0.1, warmup_steps=0, grad_clip_norm=10.0)
    c.augment = dict(enabled=True, scales=(1.0,), flip=True)  # flip only (paper)

    c.batch_size = 4 if smoke else (8 if synthetic else 2)
    c.eval_batch_size = 4 if smoke else (50 if synthetic else 2)
    c.num_train_steps = steps
    c.log_every_steps = 1 if smoke else (25 if synthetic else 100)
    c.eval_every_steps = steps if smoke else (200 if synthetic else 5000)
    c.checkpoint_every_steps = 2 if smoke else (200 if synthetic else 5000)
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.num_vis_examples = 4
    c.num_devices = -1
    c.prefetch = 2
    c.skip_nonfinite = False
    c.label_check = "error"  # 'warn': go on past out-of-range labels (docs/reliability.md)
    c.trivial_baseline = not smoke
    c.baseline_results = ""
    # Reference codes' metric averaging reported next to ours (docs/metrics.md "compat"):
    # '' | 'per_image' (DenseMTL, XTasC) | 'mtan' | 'per_image,mtan'.
    c.eval = dict(compat="")
    return c
