r"""The SegNet family of ATI-Net and MTAN (Liu et al., CVPR 2019): MTAN, ATI-Net and
their baselines on one architecture, with any task set and weighting strategy.

Arguments (comma-separated after the colon):
  model=NAME     mtan (default) | stan | stl | split | split_deep | split_wide | dense |
                 cross_stitch | padnet | atinet  (docs/models/segnet.md)
  dataset=NAME   synthetic (default) | nyuv2 (MTAN's pre-processed NYUv2, 288×384, 13 classes)
                 | cityscapes_mtan (MTAN's Cityscapes, 128×256, 7 classes, inverse depth).
                 Build a real one first: ``mtl-jax data build nyuv2 --manual_dir=FOLDER``.
  tasks=sdn      letters s (semseg), d (depth), n (normals); default sdn (cityscapes_mtan: sd);
                 model=stl|stan take one letter
  weighting=NAME ew (default; MTAN's "equal") | uw (MTAN's "uncert", s₀ = −0.5) | dwa (τ = 2,
                 ATI-Net's default) | any strategy of docs/weighting.md
  steps=N        iterations (default: 200 epochs of the dataset at batch 2, lr ×0.5 at half)
  width=N        first SegNet width (paper 64; synthetic 8; smoke 4)
  size=HxW       dataset=synthetic: image size, both multiples of 32 (default 64x96, sized
                 for 2 CPU cores; the GPU runs below used size=96x128,width=16)
  stage_switch=X model=atinet: fraction of the run trained without the latent distillation
                 before the switch (paper 0.5; 0 = distillation from the start)
  smoke          tiny data and model (32×64 synthetic images, width 4, 3 steps)

Paper hyper-parameters (defaults on the real datasets): Adam lr 1e-4, batch 2, 200 epochs (NYUv2
795 images: 79,400 steps; Cityscapes 2,975: 297,400), lr ×0.5 after 100 epochs, no
augmentation, no ImageNet initialisation; ATI-Net: DWA τ = 2, staged at half. Images are fed in
[0, 1] (no standardisation), as MTAN's code. Metrics: ours (docs/metrics.md; MTAN's code
averages per batch -- a compat option reports those numbers).

The table rows (NYUv2, 13 classes; ``mtl-jax data build nyuv2 --manual_dir=F`` first). ATI-Net
Table I (DWA τ = 2 for every multi-task model; mean of the last 10 of 200 epochs): mIoU, pixel
accuracy | depth abs err, rel err | normals mean, median, within 11.25°, 22.5°, 30°:

  model=stl,tasks=s / d / n           One Task   27.45 54.64 | 0.6517 0.2829 | 29.85 23.67
                                                 24.83 48.34 60.17  (one run per task)
  model=mtan,weighting=dwa            MTAN       28.39 55.78 | 0.6152 0.2685 | 31.57 27.50
                                                 18.68 41.40 54.51
  model=split,weighting=dwa           Split      15.12 40.95 | 0.7725 0.3213 | 36.81 33.37
                                                 13.70 32.89 45.07
  model=padnet,weighting=dwa          PAD-Net    27.70 54.76 | 0.6393 0.2670 | 33.05 28.25
                                                 19.38 40.83 52.93
  model=atinet  (dwa, staged at half) ATI-Net    28.66 56.80 | 0.6076 0.2582 | 30.95 25.97
                                                 21.42 44.23 56.72

MTAN's own table (Liu et al. 2019, Table 3: Single-task, STAN, Split wide/deep, Dense,
Cross-stitch, MTAN under equal / uncert / dwa weighting) is reproduced with
``model=stan|split_wide|split_deep|dense|cross_stitch|mtan,weighting=ew|uw|dwa``; its numbers
are not copied here (docs/models/segnet.md). Our metrics accumulate over the whole split;
the papers average per batch (docs/metrics.md).

e.g. ``mtl-jax train --config=configs/segnet.py:model=atinet,dataset=nyuv2
--workdir=workdir/nyuv2_atinet`` (a GPU: 79,400 steps at batch 2).

Parameter counts (``mtl-jax params --config=configs/segnet.py:model=NAME,dataset=nyuv2``,
asserted by tests/test_segnet.py): mtan 44,229,073 (+3 with weighting=uw); stl (s)
24,981,069; split / split_deep / split_wide 25,055,185 / 50,807,761 / 43,934,161 (+3 with uw:
the reference files' 25,055,188 / 50,807,764 / 43,934,164); dense 123,743,992 (+3);
cross_stitch 74,941,804 (+3); padnet 45,938,641; atinet 45,716,497; mtan on cityscapes_mtan
(2 tasks, 7 classes) 41,206,984 -- MTAN's code has 21,251 more (41,228,235: a level-0
attention pair of a third task it never uses and 3 log-variances).

Synthetic (procedural dataset, ``dataset=synthetic``; default sized for 2 CPU cores: 64×96,
width 8, batch 8, Adam 1e-3 halved at 300, 600 steps, evals at 200/400/600)::

    mtl-jax train --config=configs/segnet.py --workdir=workdir/segnet_synthetic

Measured 2026-11-26 on 2 CPU cores (x86_64, load ~2): 6 min 43 s wall for the whole run
(dataset build, compile + first step 52 s, 0.75-2.6 steps/s, three evals). Val split (500
images) against the trivial predictors the run writes to trivial_baseline.json:

  eval step       mIoU   pixel acc | depth abs rel  RMSE | normals mean  median  <22.5
  trivial         0.046  0.460     | 0.376          1.29 | 49.3          47.5    0.6 %
  MTAN 200        0.140  0.731     | 0.240          0.99 | 32.8          24.9    45.8 %
  MTAN 400        0.144  0.742     | 0.224          0.90 | 29.4          20.0    54.0 %
  MTAN 600        0.145  0.745     | 0.202          0.85 | 27.4          16.9    58.7 %

GPU-sized setting ``size=96x128,width=16`` (2.8M parameters), one NVIDIA H200, step 600
(trivial: 0.046 / 0.456 | 0.390 / 1.32 | 49.9):

  MTAN (ew)                 0.239  0.801     | 0.163          0.71 | 22.9          15.1    64.1 %
  ATI-Net (dwa, switch 300) 0.199  0.790     | 0.179          0.75 | 24.5          17.0    60.4 %

(32 steps/s for MTAN there; on 2 CPU cores this setting runs at ~3-7 s/step, too slow for a
10-minute run -- docs/models/segnet.md.)
"""

import ml_collections

from mtl_jax.config_utils import parse_arg, task_set
from mtl_jax.errors import UserError

#: name -> (builder config, semseg classes, (H, W), training examples, default task letters)
DATASETS = {
    "synthetic": ("source", 10, (64, 96), 2000, "sdn"),
    "nyuv2": (None, 13, (288, 384), 795, "sdn"),
    "cityscapes_mtan": ("128x256_7cls", 7, (128, 256), 2975, "sd"),
}
#: config model name -> (architecture, extra config.model keys)
MODELS = {
    "mtan": ("segnet_mtan", {}),
    "stan": ("segnet_mtan", {}),
    "stl": ("segnet_split", {"variant": "standard"}),
    "split": ("segnet_split", {"variant": "standard"}),
    "split_deep": ("segnet_split", {"variant": "deep"}),
    "split_wide": ("segnet_split", {"variant": "wide"}),
    "dense": ("segnet_dense", {}),
    "cross_stitch": ("segnet_cross_stitch", {}),
    "padnet": ("segnet_padnet", {"initial_heads": False}),
    "atinet": ("segnet_atinet", {}),
}
SINGLE_TASK = ("stl", "stan")
EPOCHS = 200


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, model="mtan", dataset="synthetic", tasks="", weighting="",
                     steps=0, width=0, size="", stage_switch=0.5, smoke=False)
    if args.dataset not in DATASETS:
        raise UserError(f"segnet: unknown dataset={args.dataset!r}; choose from "
                        f"{sorted(DATASETS)}")
    if args.model not in MODELS:
        raise UserError(f"segnet: unknown model={args.model!r}; choose from {sorted(MODELS)}")
    builder_config, num_classes, size, num_train, default_tasks = DATASETS[args.dataset]
    tasks = task_set(args.tasks or ("s" if args.model in SINGLE_TASK else default_tasks))
    if args.model in SINGLE_TASK and len(tasks) != 1:
        raise UserError(f"model={args.model} trains one task: give one letter, e.g. tasks=s "
                        f"(got tasks={args.tasks!r})")
    if args.model not in SINGLE_TASK and len(tasks) < 2:
        raise UserError(f"model={args.model} needs at least two tasks (got tasks={args.tasks!r}"
                        "); single-task runs are model=stl or model=stan")
    if args.dataset == "cityscapes_mtan" and "normals" in tasks:
        raise UserError("cityscapes_mtan has no normals: use tasks=sd, s or d")
    synthetic = args.dataset == "synthetic"
    if args.smoke and not synthetic:
        raise UserError("smoke runs on dataset=synthetic only")
    smoke = args.smoke
    if args.size:
        if not synthetic or smoke:
            raise UserError("size=HxW sets the procedural dataset's image size: use it with "
                            "dataset=synthetic (without smoke)")
        try:
            size = tuple(int(v) for v in str(args.size).lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) <= 0 or size[0] % 32 or size[1] % 32:
            raise UserError(f"segnet: size={args.size!r} must be HxW with both multiples of 32 "
                            "(five 2x2 poolings), e.g. size=96x128")

    c = ml_collections.ConfigDict()
    c.seed = 0
    if synthetic:
        h, w = (32, 64) if smoke else size
        n_train, n_val = (8, 4) if smoke else (2000, 500)
        c.dataset = dict(name="synthetic", config=builder_config,
                         options=dict(height=h, width=w, num_train=n_train, num_val=n_val),
                         normals_from_depth=False)
        num_train = n_train
    else:
        h, w = size
        c.dataset = dict(name=args.dataset, config=builder_config, normals_from_depth=False)
    c.input_size = (h, w)
    task_options = {"semseg": dict(num_classes=num_classes), "depth": dict(loss="l1"),
                    "normals": dict()}
    c.tasks = {t: dict(task_options[t]) for t in tasks}

    architecture, extra = MODELS[args.model]
    width = args.width or (4 if smoke else 8 if synthetic else 64)
    c.model = dict(architecture=architecture, width=width, dtype="float32", init_from="",
                   **extra)
    if architecture == "segnet_dense":  # its unused shared last block: MTAN's class_nb channels
        c.model.class_nb = num_classes
    if args.model == "atinet":
        c.model.stage_switch = float(args.stage_switch)

    weighting = args.weighting or ("dwa" if args.model == "atinet" else "ew")
    c.weighting = dict(name=weighting)
    if weighting == "dwa":
        c.weighting.temperature = 2.0

    batch = 4 if smoke else (8 if synthetic else 2)
    steps = args.steps or (3 if smoke else 600 if synthetic
                           else EPOCHS * (num_train // batch))
    lr = 1e-3 if synthetic and not smoke else 1e-4
    c.optimizer = dict(name="adam", learning_rate=lr, schedule="step",
                       decay_steps=(steps // 2,), decay_factor=0.5, warmup_steps=0,
                       grad_clip_norm=None)
    c.augment = dict(enabled=False)  # MTAN trains without augmentation by default
    c.batch_size = batch
    c.eval_batch_size = 4 if smoke else (50 if synthetic else 2)
    c.num_train_steps = steps
    c.log_every_steps = 1 if smoke else (25 if synthetic else 200)
    c.eval_every_steps = steps if smoke else (200 if synthetic else 4000)
    c.checkpoint_every_steps = steps if smoke else (200 if synthetic else 4000)
    c.keep_checkpoints = 2
    c.async_checkpoints = not smoke
    c.num_vis_examples = 0 if smoke else 4
    c.num_devices = -1
    c.prefetch = 2
    c.skip_nonfinite = False
    c.trivial_baseline = not smoke
    c.baseline_results = ""
    return c
