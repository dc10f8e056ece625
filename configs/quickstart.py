r"""Quickstart: hard-sharing MTL (S-D-N) on the procedural dataset, on a laptop CPU.

Command (builds the synthetic dataset on first use, ~1 min)::

    mtl-jax train --config=configs/quickstart.py --workdir=workdir/quickstart

Arguments (comma-separated after a colon, e.g. ``configs/quickstart.py:smoke,weighting=fixed``):
  smoke          tiny data, model and step count: seconds, for tests and CI
  weighting=NAME loss-weighting strategy (``ew`` default; see the README's strategy table)
  rep_grad       gradient-based strategies: gradients w.r.t. the shared representation
  tasks=sdn      task letters: s semseg, d depth, n normals, e edges, r reconstruction
  steps=N        training steps (default 1200)
  encoder=NAME   resnet18 (default) | resnet34 | resnet50 | resnet101
  width=N        base width of the ResNet (default 16; torchvision's is 64)

Model: ResNet-18 at width 16 (torchvision layout, 1/4 width), one U-Net decoder per task
(32 features, one conv per block), 96x128 input, batch 16, Adam 1e-3 with cosine decay,
joint scale-crop + flip augmentation.

Hardware and time: 2 CPU cores (x86_64): 7 min 45 s for 1,200 steps (2.8 steps/s) plus ~50 s
to build the dataset on first use (docs/benchmarks.md).

Expected numbers (val split, 500 images at 96x128; measured 2026-11-26 on one NVIDIA H200 with
the same config and seed -- a CPU run differs only by rounding), against the trivial
predictors (majority class / mean training depth / mean training normal) that the run itself
writes to trivial_baseline.json:

  semseg   mIoU 0.595 (trivial 0.046), pixel accuracy 0.900 (0.456)
  depth    abs err 0.429 m (1.109), abs rel 0.127 (0.390), delta1 0.840 (0.382)
  normals  mean angle 15.2 deg (49.9), median 9.1 deg (47.8), within 11.25 deg 57.4 % (0.1 %)

The smoke variant trains 6 steps on 32x48 images in seconds; its numbers are meaningless.
"""

import ml_collections

from mtl_jax.config_utils import parse_arg, task_set
from mtl_jax.models.encoders import LAST_SHARED_LAYER

TASK_OPTIONS = {
    "semseg": dict(num_classes=10),
    "depth": dict(loss="l1"),
    "normals": dict(),
    "edges": dict(),
    "reconstruction": dict(),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, smoke=False, weighting="ew", rep_grad=False, tasks="sdn", steps=1200,
                     encoder="resnet18", width=16)
    c = ml_collections.ConfigDict()
    c.seed = 0
    h, w = (32, 48) if args.smoke else (96, 128)
    n_train, n_val = (24, 10) if args.smoke else (2000, 500)
    c.dataset = dict(name="synthetic", config="source",
                     options=dict(height=h, width=w, num_train=n_train, num_val=n_val),
                     normals_from_depth=False)
    c.input_size = (h, w)
    c.tasks = {t: dict(TASK_OPTIONS[t]) for t in task_set(args.tasks)}
    c.model = dict(
        encoder=args.encoder,
        encoder_kwargs=dict(width=4 if args.smoke else args.width),
        encoder_init="",  # converted torchvision weights (.npz), see models/pretrained.py
        init_from="",  # a whole converted model (mtl-jax convert-weights --from=NAME)
        decoder="unet",
        decoder_kwargs=dict(features=8 if args.smoke else 32, convs_per_block=1),
        dtype="float32",
    )
    c.weighting = dict(name=args.weighting)
    if args.weighting == "fixed":
        c.weighting.weights = {t: 1.0 for t in c.tasks}
    if args.weighting == "gradnorm":  # GradNorm reads the last shared layer (paper, XTasC)
        c.weighting.grad_param_prefix = LAST_SHARED_LAYER[args.encoder]
    if args.rep_grad:
        c.weighting.rep_grad = True
    c.optimizer = dict(name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=0,
                       min_lr_ratio=0.01, grad_clip_norm=None)
    c.augment = dict(enabled=True, scales=(1.0, 1.2, 1.5), flip=True)
    c.batch_size = 8 if args.smoke else 16
    c.eval_batch_size = 8 if args.smoke else 50
    c.num_train_steps = 6 if args.smoke else args.steps
    c.log_every_steps = 2 if args.smoke else 50
    c.eval_every_steps = 6 if args.smoke else 400
    c.checkpoint_every_steps = 3 if args.smoke else 400
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.num_vis_examples = 4
    c.num_devices = -1
    c.prefetch = 2
    c.skip_nonfinite = False
    c.label_check = "error"  # 'warn': go on past out-of-range labels (docs/reliability.md)
    # Score constant predictors (majority class, mean depth, mean normal) on the val split
    # at the start: written to trivial_baseline.json and logged as trivial/<task>/<metric>.
    c.trivial_baseline = not args.smoke
    # Comma-separated results.json files of single-task runs (configs/stl.py): adds eval/delta_m.
    c.baseline_results = ""
    # Reference codes' metric averaging reported next to ours (docs/metrics.md "compat"):
    # '' | 'per_image' (DenseMTL, XTasC) | 'mtan' | 'per_image,mtan'.
    c.eval = dict(compat="")
    return c
