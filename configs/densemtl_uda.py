r"""DenseMTL MTL-UDA (the paper's §4.5, Table 6): adversarial multi-task domain adaptation.

A model is trained with labels on a source domain and without labels on a target domain
(output-level adversarial training, one spectral-normalised patch discriminator per task and
output scale; ``mtl_jax/uda/``, docs/models/densemtl.md "MTL-UDA") and evaluated on the
target's val split (``eval/<task>/<metric>``; the source's val split as
``eval/source/<task>/<metric>``).

Commands::

    # CPU smoke run on the two domains of the procedural dataset (~1 min)
    mtl-jax train --config=configs/densemtl_uda.py:smoke --workdir=workdir/uda_smoke
    # the three-way comparison on the procedural dataset (same seed and steps; sized for
    # <=15 min on 2 idle CPU cores for all three; numbers: see the end of this docstring)
    for v in uda=false uda=true oracle; do
      mtl-jax train --config=configs/densemtl_uda.py:$v,synthetic_small \
          --workdir=workdir/uda_synth_${v%%=*}_${v#*=}
    done
    # Table 6, Synthia -> Cityscapes, S-D (GPU/TPU; build both datasets first)
    C=configs/densemtl_uda.py:source=synthia,target=cityscapes
    for m in ours mtl 3ways_padnet; do
      mtl-jax train --config=$C,model=$m --workdir=workdir/uda_synthia_cs_$m
    done
    for t in s d; do   # STL-UDA, the reference of the paper's Δ_SD
      mtl-jax train --config=$C,model=stl,tasks=$t --workdir=workdir/uda_synthia_cs_stl_$t
    done
    # baselines: MTL source-only (uda=false) and the oracle (trained on the target's labels)
    mtl-jax train --config=$C,model=mtl,uda=false --workdir=workdir/uda_synthia_cs_source
    mtl-jax train --config=$C,model=mtl,oracle --workdir=workdir/uda_synthia_cs_oracle

Arguments (comma-separated after the colon):
  source=NAME    synthetic (the procedural dataset's source domain, default) | synthia | vkitti2
  target=NAME    synthetic_target (its target domain, default) | cityscapes
  model=NAME     ours (mTEB, "Ours" of Table 6) | mtl (MTL-UDA) | stl (STL-UDA, one task) |
                 3ways_padnet | 3ways | padnet (any model of configs/densemtl.py)
  tasks=sd       task set (Table 6: S-D); model=stl takes one letter
  uda=true       false: source-only (no target data, no adversarial term; same data order,
                 seed and evaluation)
  oracle         supervised training on the target's labels (no adversarial term)
  lambda_adv=0.005  weight of the adversarial term
  steps=N        iterations (paper 90,000); width=N ResNet base width
  synthetic_small  the CPU comparison's setting: 48×64 images, 1000/200 examples, ResNet-18 at
                 width 8, batch 8 + 8, 600 steps, lr 1e-3
  smoke          tiny data and model (ResNet-18 at width 4, 32×48, 4 steps, discriminators at
                 width 1/8)

Paper recipe (defaults for real datasets): the model and optimiser of configs/densemtl.py, but
90k iterations at a constant learning rate and no gradient clipping; batches of 2 source + 2
target images; discriminators (64-128-256-512-1, 2,762,689 parameters each for a 1-channel
input, one per task at the output and at the side output 1 where the model has one) trained by
Adam 1e-4, β = (0.9, 0.99), poly 0.9; λ_adv = 0.005; fixed task weights (S-D: 50, 1).
Class sets must match between the domains: synthia (16) → cityscapes (512x1024_16cls) does;
vkitti2 (14 classes) → cityscapes needs a common label set that is not implemented (semseg
is then refused; tasks=d works).

Hardware and time: smoke ~1-2 min on an idle 2-core CPU (mostly compilation; 2m38s of CPU
time measured). synthetic_small: the three runs took 585 s together on 2 CPU cores (measured
2026-11-26, load average 2-3.5: 214 s source-only with both domains' dataset builds, 261 s
UDA, 110 s oracle; compile + first step 36 / 69 / 33 s), sized for <= 15 min.

Numbers on the procedural dataset (synthetic_small, seed 0, target val = 200 images of the
target domain; the CPU runs above, and one NVIDIA H200 with the same configs -- trajectories
differ by accumulated rounding; docs/models/densemtl.md "MTL-UDA"):

  run              target mIoU  pixel acc  depth abs rel  RMSE  | source mIoU  abs rel
  CPU  uda=false   0.047        0.202      0.316          1.70  | 0.229        0.171
  CPU  uda=true    0.132        0.545      0.240          1.19  | 0.207        0.206
  CPU  oracle      0.254        0.772      0.176          0.81  | 0.099        0.290
  H200 uda=false   0.075        0.286      0.275          1.46  | 0.247        0.180
  H200 uda=true    0.149        0.612      0.237          1.17  | 0.213        0.195
  H200 oracle      0.257        0.775      0.186          0.82  | 0.102        0.263

Source-only loses clearly against the oracle; adaptation closes about 40 % of the semseg gap
and about half of the depth gap (CPU).
"""


import ml_collections

from mtl_jax.config_utils import load_config_module, parse_arg, task_set
from mtl_jax.errors import UserError

SOURCES = ("synthetic", "synthia", "vkitti2")
TARGETS = {"synthetic_target": "synthetic", "cityscapes": "cityscapes"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, source="synthetic", target="synthetic_target", model="ours",
                     tasks="sd", uda=True, oracle=False, lambda_adv=0.005, steps=0, width=0,
                     synthetic_small=False, smoke=False)
    if args.source not in SOURCES:
        raise UserError(f"densemtl_uda: unknown source={args.source!r}; choose from {SOURCES}")
    if args.target not in TARGETS:
        raise UserError(f"densemtl_uda: unknown target={args.target!r}; choose from "
                        f"{sorted(TARGETS)}")
    synthetic = args.source == "synthetic"
    if synthetic != (args.target == "synthetic_target"):
        raise UserError("densemtl_uda: the procedural dataset adapts to itself only "
                        "(source=synthetic with target=synthetic_target)")
    if (args.smoke or args.synthetic_small) and not synthetic:
        raise UserError("smoke and synthetic_small run on the procedural dataset only")
    base_arg = f"dataset={args.source},tasks={args.tasks},model={args.model}"
    if args.smoke:
        base_arg += ",smoke"
    if args.width:
        base_arg += f",width={args.width}"
    dm = load_config_module("densemtl.py", relative_to=__file__)
    c = dm.get_config(base_arg)
    tasks = task_set(args.tasks)

    if synthetic:
        h, w = c.input_size
        n_train, n_val = c.dataset.options.num_train, c.dataset.options.num_val
        if args.synthetic_small:
            h, w, n_train, n_val = 48, 64, 1000, 200
            c.input_size = (h, w)
        options = dict(height=h, width=w, num_train=n_train, num_val=n_val)
        source_ds = dict(name="synthetic", config="source", options=options,
                         normals_from_depth=False)
        target_ds = dict(name="synthetic", config="target", options=options,
                         normals_from_depth=False)
    else:
        source_ds = c.dataset.to_dict()
        target_ds = dict(name="cityscapes", config=dm.DATASETS["cityscapes"][0],
                         normals_from_depth=dm.DATASETS["cityscapes"][4])
        c.input_size = dm.DATASETS["cityscapes"][2]  # train and evaluate at the target's size
        if "semseg" in tasks:
            n_src = dm.DATASETS[args.source][1]
            n_tgt = dm.DATASETS["cityscapes"][1]
            if n_src != n_tgt:
                raise UserError(f"densemtl_uda: {args.source} has {n_src} semseg classes, "
                                f"cityscapes {n_tgt}; a common label set is not implemented "
                                f"(use source=synthia, or tasks=d)")
    c.dataset = target_ds if args.oracle else source_ds

    adversarial = bool(args.uda) and not args.oracle
    small = args.smoke
    has_side = args.model in ("ours", "3ways_padnet", "3ways")
    c.uda = dict(
        adversarial=adversarial,
        lambda_adv=float(args.lambda_adv),
        scales=(0, 1) if has_side else (0,),
        target_dataset=target_ds,
        source_eval_dataset=source_ds,
        # smoke: 1/8 of the paper's width; synthetic_small: 1/4 (CPU time)
        discriminator=dict(channels=(8, 16, 32, 64) if small else (16, 32, 64, 128)
                           if args.synthetic_small else (64, 128, 256, 512),
                           negative_slope=0.2, power_iterations=1),
        optimizer=dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.99, schedule="poly",
                       power=0.9),
    )

    steps = args.steps or (4 if args.smoke else 600 if synthetic else 90000)
    opt = c.optimizer.to_dict()
    opt.update(schedule="constant", grad_clip_norm=None, decay_steps=())
    if args.synthetic_small:
        opt.update(learning_rate=1e-3, part_lr_multipliers={"encoder": 1.0})
        c.model.encoder = "resnet18"
        c.model.encoder_kwargs.width = args.width or 8
        width = c.model.encoder_kwargs.width
        ch = tuple(max(4, x * width // 64) for x in dm.DECODER_CHANNELS)
        if "decoder_kwargs" in c.model and "channels" in c.model.decoder_kwargs:
            c.model.decoder_kwargs.channels = ch
        elif "decoder_kwargs" in c.model and "features" in c.model.decoder_kwargs:
            c.model.decoder_kwargs.features = ch[4]
    c.optimizer = opt
    c.num_train_steps = steps
    c.batch_size = 4 if (args.smoke or not synthetic) else 16  # source + target halves
    if args.synthetic_small:
        c.eval_batch_size = 50
    c.eval_batch_size = 4 if args.smoke else (50 if synthetic else 2)
    c.log_every_steps = 1 if args.smoke else (25 if synthetic else 100)
    c.eval_every_steps = steps if args.smoke else (300 if synthetic else 10000)
    c.checkpoint_every_steps = 2 if args.smoke else (300 if synthetic else 5000)
    c.trivial_baseline = False
    return c
