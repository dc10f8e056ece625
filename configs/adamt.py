r"""AdaMT-Net: dense U-Net encoder, attention decoders, gradient-magnitude weights.

Commands::

    # CPU smoke run on the procedural dataset (seconds; numbers meaningless)
    mtl-jax train --config=configs/adamt.py:smoke --workdir=workdir/adamt_smoke
    # parameter counts per part (shapes only, no dataset needed)
    mtl-jax params --config=configs/adamt.py:dataset=nyuv2,tasks=sdn
    # grad_magnitude vs ew on the procedural dataset (S-D-N, same seed and steps; 2 CPU cores)
    for w in grad_magnitude ew; do
      mtl-jax train --config=configs/adamt.py:weighting=$w --workdir=workdir/adamt_synth_$w
    done

Arguments (comma-separated after the colon):
  dataset=NAME   synthetic (default) | nyuv2 | cityscapes_mtan | isprs_potsdam. Build a real one
                 first: ``mtl-jax data build NAME --manual_dir=FOLDER`` (docs/datasets.md).
  tasks=sdn      letters: s semseg, d depth, n normals, r reconstruction (sd, sdn, sdnr, ...);
                 variant=st takes one letter.
  variant=adamt  adamt (dense encoder + attention decoders) | unet (plain U-Net: no dense
                 connections, no attention) | dense_noatt (dense encoder, decoders without
                 attention) | st (ST-Net: AdaMT-Net with one task)
  weighting=grad_magnitude   grad_magnitude (eq. 5, default) | ew | uw | dwa (Table 7); any
                 strategy name of docs/weighting.md works
  width=N        first encoder width (paper 64 -> 64/128/256/512, bottleneck 1024); default 64,
                 8 on dataset=synthetic
  steps=N        training steps (default: 200 epochs on the real datasets, 300 on synthetic)
  upsample=bilinear   decoder up-sampling: bilinear | transpose (learnt 2×2 up-conv)
  smoke          tiny data and model (width 4, 32×48, 4 steps)

Paper recipe (§4.2, defaults on the real datasets): Adam, lr 1e-4 constant, 200 epochs, batch 8
(Cityscapes) / 4 (ISPRS) / 2 (NYUv2); inputs 128×256 (Cityscapes), 256×256 ISPRS tiles. NYUv2
runs at the 288×384 of MTAN's export (our pipeline evaluates at the stored resolution; the
paper's 128×256 would squash its 3:4 frames). No augmentation is mentioned: off. Losses: L1
depth, cross-entropy, 1 − cos normals (the paper's −dot up to a constant), L1 reconstruction.
Encoder choices the paper leaves open (model docstrings, docs/models/adamt.md): dropout 0.2,
earlier outputs max-pooled to the current resolution, 1×1 bottleneck conv, bilinear ×2.

Every row of the paper's tables (GPU; commands only -- their numbers below are the paper's)::

    # Table 1, NYUv2 S-D-N: ST-Net (one run per task), AdaMT-Net* (ew), AdaMT-Net† (ours)
    for t in s d n; do mtl-jax train --config=configs/adamt.py:dataset=nyuv2,variant=st,tasks=$t \
        --workdir=workdir/nyu_st_$t; done
    mtl-jax train --config=configs/adamt.py:dataset=nyuv2,tasks=sdn,weighting=ew --workdir=...
    mtl-jax train --config=configs/adamt.py:dataset=nyuv2,tasks=sdn --workdir=...
    # Table 2, NYUv2 S-D: tasks=sd, weighting=ew | grad_magnitude (ST-Net as above, s and d)
    # Table 3, Cityscapes 7 classes S-D: dataset=cityscapes_mtan,tasks=sd[,weighting=ew];
    #          ST-Net: dataset=cityscapes_mtan,variant=st,tasks=s | tasks=d
    # Table 4, ISPRS Potsdam S-D: dataset=isprs_potsdam,tasks=sd[,weighting=ew]; ST-Net likewise
    # Table 5, NYUv2 4 tasks: dataset=nyuv2,tasks=sdnr
    # Table 6, ablation on Cityscapes: dataset=cityscapes_mtan,tasks=sd,variant=unet |
    #          variant=dense_noatt | variant=adamt,weighting=ew | variant=adamt
    # Table 7, weightings on Cityscapes: dataset=cityscapes_mtan,tasks=sd,weighting=ew|uw|dwa|
    #          grad_magnitude

Baselines of Tables 1-5 that are other papers' networks (STAN, Dense, Cross-Stitch, MTAN) are
not this config. The paper's numbers (its "IoU" is pixel accuracy; Cityscapes depth is MTAN's
inverse depth, and its "Rel." column there is on a different scale):

  Table 1 NYUv2 S-D-N   pix.acc mIoU  abs    rel    mean  median <11.25 <22.5 <30
    ST-Net              58.44  20.98 0.6657 0.2746 29.67 25.08  20.94  45.52 58.74
    AdaMT-Net* (ew)     59.55  22.36 0.6247 0.2558 29.41 24.05  23.72  47.42 59.83
    AdaMT-Net†          60.35  21.86 0.5933 0.2456 27.74 21.85  26.58  51.63 63.88
  Table 2 NYUv2 S-D     ST-Net 58.44 / 20.98 / 0.6657 / 0.2746; AdaMT-Net* 58.42 / 21.74 /
                        0.6320 / 0.2551; AdaMT-Net† 58.91 / 20.61 / 0.6136 / 0.2547
  Table 3 Cityscapes    ST-Net 93.71 / 61.58 / 0.0131 / 24.21; AdaMT-Net* 94.01 / 61.91 /
                        0.0129 / 23.82; AdaMT-Net† 94.16 / 62.53 / 0.0125 / 22.23
  Table 4 ISPRS         ST-Net 81.52 / 43.27 / 0.1731 / 1.3843; AdaMT-Net* 81.82 / 43.66 /
                        0.1698 / 1.3595; AdaMT-Net† 83.04 / 45.34 / 0.1642 / 1.3676
  Table 5 NYUv2 4 tasks AdaMT-Net† 59.22 / 20.93 / 0.6519 / 0.2618 / 31.69 / 25.13 / 23.16 /
                        45.80 / 57.61, reconstruction PSNR 30.68
  Table 6 Cityscapes    U-Net 91.27 / 53.55 / 0.0196 / 26.19; dense w/o attention 92.07 /
                        55.67 / 0.0187 / 24.67; AdaMT-Net* 94.01 / 61.91 / 0.0129 / 23.82;
                        AdaMT-Net† 94.16 / 62.53 / 0.0125 / 22.23
  Table 7 Cityscapes    ew 91.11 / 53.04 / 0.0144 / 33.63; uw 91.10 / 53.86 / 0.0144 / 35.72;
                        dwa 91.09 / 53.29 / 0.0144 / 34.14; grad_magnitude 94.16 / 62.53 /
                        0.0125 / 22.23

Hardware and time: smoke ~1 min on 2 CPU cores (mostly compilation). dataset=synthetic
(64×96, width 8, S-D-N, batch 8, 300 steps, one eval at the end): sized for a few minutes per
run on 2 idle CPU cores. The grad_magnitude-vs-ew comparison (the two commands at the top),
measured 2026-11-26 on 2 CPU cores (load average 2-5: shared with test jobs) and on one NVIDIA
H200 (same config and seed), val split (200 images):

  weighting            mIoU   pixel acc | depth abs rel  RMSE | normals mean  median | wall
  trivial              0.047  0.468     | 0.377          1.28 | 48.8          --     |
  CPU grad_magnitude   0.198  0.768     | 0.205          0.95 | 25.0          18.3   | 6m05s
  CPU ew               0.197  0.766     | 0.202          0.92 | 22.9          15.5   | 9m14s
  H200 grad_magnitude  0.192  0.765     | 0.204          0.91 | 25.4          17.7   |
  H200 ew              0.174  0.756     | 0.197          0.88 | 22.7          14.9   |

Neither wins everywhere at 300 steps: eq. 5 favours semseg over depth and normals; CPU and GPU
trajectories diverge at this width, so differences of 1-2 mIoU are noise (docs/models/adamt.md).
Step time: grad_magnitude 1.01x ew on the H200 at the paper's width (benchmarks/adamt.py). On 2
idle CPU cores: compile + first step 73 s, 0.45 s/step (grad_magnitude).
"""

import ml_collections

from mtl_jax.config_utils import parse_arg, task_set
from mtl_jax.errors import UserError
from mtl_jax.models.architectures.adamt import VARIANTS

#: name -> (builder config, semseg classes, (H, W), batch size, epoch length in steps
#: (train examples // batch)).
DATASETS = {
    "synthetic": ("source", 10, (64, 96), 8, 125),
    "nyuv2": (None, 13, (288, 384), 2, 795 // 2),
    "cityscapes_mtan": ("128x256_7cls", 7, (128, 256), 8, 2975 // 8),
    "isprs_potsdam": ("256", 6, (256, 256), 4, 0),
}
#: ISPRS Potsdam's epoch: 24 training images of 6000×6000 cut into 23×23 tiles of 256×256.
_POTSDAM_TRAIN_TILES = 24 * 23 * 23
SUPPORTED_TASKS = ("semseg", "depth", "normals", "reconstruction")
EPOCHS = 200


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, dataset="synthetic", tasks="sdn", variant="adamt",
                     weighting="grad_magnitude", width=0, steps=0, upsample="bilinear",
                     smoke=False)
    if args.dataset not in DATASETS:
        raise UserError(f"adamt: unknown dataset={args.dataset!r}; choose from {sorted(DATASETS)}")
    if args.variant not in VARIANTS:
        raise UserError(f"adamt: unknown variant={args.variant!r}; choose from {sorted(VARIANTS)}")
    tasks = task_set(args.tasks)
    unsupported = [t for t in tasks if t not in SUPPORTED_TASKS]
    if unsupported:
        raise UserError(f"adamt: tasks {unsupported} are not in the paper's set; use letters "
                        f"s, d, n, r")
    if args.variant == "st" and len(tasks) != 1:
        raise UserError(f"variant=st (ST-Net) trains one task: give one letter, e.g. tasks=s "
                        f"(got tasks={args.tasks!r})")
    if args.variant != "st" and len(tasks) < 2:
        raise UserError(f"variant={args.variant} is multi-task: give at least two task letters "
                        f"or use variant=st for one task")
    builder_config, num_classes, size, batch, epoch = DATASETS[args.dataset]
    synthetic = args.dataset == "synthetic"
    if args.dataset == "isprs_potsdam":
        epoch = _POTSDAM_TRAIN_TILES // batch
    if "normals" in tasks and args.dataset in ("cityscapes_mtan", "isprs_potsdam"):
        raise UserError(f"dataset={args.dataset} has no surface normals; use tasks=sd or sdr")
    smoke = args.smoke
    if smoke and not synthetic:
        raise UserError("smoke runs on dataset=synthetic only")

    c = ml_collections.ConfigDict()
    c.seed = 0
    if synthetic:
        h, w = (32, 48) if smoke else size
        n_train, n_val = (24, 10) if smoke else (1000, 200)
        c.dataset = dict(name="synthetic", config=builder_config,
                         options=dict(height=h, width=w, num_train=n_train, num_val=n_val),
                         normals_from_depth=False)
    else:
        h, w = size
        c.dataset = dict(name=args.dataset, config=builder_config, normals_from_depth=False)
    c.input_size = (h, w)
    task_options = {"semseg": dict(num_classes=num_classes), "depth": dict(loss="l1"),
                    "normals": dict(), "reconstruction": dict()}
    c.tasks = {t: dict(task_options[t]) for t in tasks}

    width = args.width or (4 if smoke else 8 if synthetic else 64)
    dense, attention = VARIANTS[args.variant]
    c.model = dict(
        architecture="adamt",
        widths=tuple(width * m for m in (1, 2, 4, 8)),
        bottleneck_features=16 * width,
        dense=dense,
        attention=attention,
        dropout_rate=0.2,
        dense_pool="max",
        bottleneck_kernel=1,
        upsample=args.upsample,
        dtype="float32",
    )
    c.weighting = dict(name=args.weighting)
    if args.weighting == "gradnorm":  # the last shared layer: the bottleneck conv
        c.weighting.grad_param_prefix = "bottleneck/conv"

    steps = args.steps or (4 if smoke else 300 if synthetic else EPOCHS * epoch)
    # Paper: Adam 1e-4. From random weights, a 700-step CPU run on the procedural data needs
    # a larger step.
    lr = 1e-3 if synthetic else 1e-4
    c.optimizer = dict(name="adam", learning_rate=lr, schedule="constant", warmup_steps=0,
                       grad_clip_norm=None)
    c.augment = dict(enabled=False)  # the paper mentions none

    c.batch_size = 4 if smoke else batch
    c.eval_batch_size = 4 if smoke else (40 if synthetic else batch)
    c.num_train_steps = steps
    c.log_every_steps = 1 if smoke else (25 if synthetic else 100)
    c.eval_every_steps = steps if (smoke or synthetic) else 10 * epoch
    c.checkpoint_every_steps = 2 if smoke else (steps if synthetic else 10 * epoch)
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.num_vis_examples = 4
    c.num_devices = -1
    c.prefetch = 2
    c.skip_nonfinite = False
    c.trivial_baseline = not smoke
    c.baseline_results = ""
    return c
