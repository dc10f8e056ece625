"""The self-supervised depth (SDE) run: frame triplets, a pose network, one compiled step.

:func:`sde_run` is this kind of run as the one training loop of :mod:`mtl_jax.train` sees it
(a :class:`~mtl_jax.run_support.Run`): ``config.dataset`` yields frame triplets
(``image``/``image_prev``/``image_next``, ``intrinsics``, the centre frame's labels), read by
one :func:`pipeline.train_iterator` whose position every checkpoint saves with both networks,
so a restart resumes bit-exactly. The state is an :class:`~mtl_jax.sde.steps.SDETrainState`;
the step is :func:`~mtl_jax.sde.steps.sde_train_step`. Evaluation scores the val split with
every task's metrics (the ``disp`` task: median-scaled depth against the depth labels, which
only evaluation reads), pictures show its predictions, and ``train/lr/pose_net`` logs the pose
network's learning rate.

``config.sde`` (defaults = the released configuration, ``resnet101_ours_SD.yml``)::

    frame_ids=(0, -1, 1)           # centre, previous, next (the only neighbours supported)
    scales=(0, 1, 2, 3)            # disparity scales in the loss: the disp head's side outputs
    disparity_smoothness=1e-3, no_ssim=False, avg_reprojection=False,
    disable_automasking=False
    pose=dict(encoder='resnet18', width=64, dtype='float32')  # models/architectures/posenet.py
    pose_init_from=''              # a converted SDE checkpoint's pose network (convert-weights)
    pose_optimizer=dict(learning_rate=1e-6)   # merged over config.optimizer

The disparity's depth range (``min_depth``/``max_depth``, 0.1..100) and the evaluation range
(1e-3..80) are the ``disp`` task's options (``config.tasks.disp``), read from there only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from mtl_jax import config_schema, optim
from mtl_jax.data import pipeline
from mtl_jax.errors import UserError
from mtl_jax.experiment import Experiment, build_experiment, open_data
from mtl_jax.models.architectures.posenet import build_pose_network
from mtl_jax.models.options import as_dict
from mtl_jax.run_support import (
    Run,
    add_delta_m,
    baseline_metrics,
    evaluate_split,
    trivial_baseline_writer,
    write_pictures,
)
from mtl_jax.sde import steps as sde_steps
from mtl_jax.sde.photometric import MonodepthOptions

KNOWN = ("frame_ids", "scales", "disparity_smoothness", "no_ssim", "avg_reprojection",
         "disable_automasking", "pose", "pose_init_from", "pose_optimizer")
POSE_LR = 1e-6


def sde_options(config: ml_collections.ConfigDict) -> dict:
    """``config.sde`` with its defaults filled in, checked."""
    opts = as_dict(config.get("sde", None))
    unknown = sorted(set(opts) - set(KNOWN))
    if unknown:
        raise UserError(f"config.sde has unknown keys {unknown}; known: {sorted(KNOWN)}")
    frame_ids = tuple(opts.get("frame_ids", (0, -1, 1)))
    if not config_schema.valid_frame_ids(frame_ids):
        raise UserError(f"config.sde.frame_ids={list(frame_ids)}: the centre frame 0 first, then "
                        "neighbours among -1 and 1 (e.g. (0, -1, 1), the released "
                        "configuration)")
    scales = tuple(int(s) for s in opts.get("scales", (0, 1, 2, 3)))
    if 0 not in scales or any(s < 0 or s > 3 for s in scales):
        raise UserError(f"config.sde.scales={list(scales)}: scale 0 and any of 1..3 (the disp "
                        "decoder's side outputs)")
    opts.update(frame_ids=frame_ids, scales=scales)
    opts["pose"] = as_dict(opts.get("pose", None))
    opts["pose_optimizer"] = {"learning_rate": POSE_LR, **as_dict(opts.get("pose_optimizer",
                                                                            None))}
    return opts


def monodepth_options(opts: dict, task) -> MonodepthOptions:
    """The loss's options: ``opts`` (:func:`sde_options`) and the ``disp`` task's depth
    range."""
    return MonodepthOptions(
        frame_ids=opts["frame_ids"], scales=opts["scales"], min_depth=task.min_depth,
        max_depth=task.max_depth,
        disparity_smoothness=float(opts.get("disparity_smoothness", 1e-3)),
        no_ssim=bool(opts.get("no_ssim", False)),
        avg_reprojection=bool(opts.get("avg_reprojection", False)),
        disable_automasking=bool(opts.get("disable_automasking", False)))


def _optimizer_configs(config: ml_collections.ConfigDict, opts: dict
                       ) -> tuple[dict, dict, float | None]:
    """The model's and the pose network's optimiser configs without clipping, and the one
    clipping norm the step applies to both gradients together."""
    model_cfg = as_dict(config.optimizer)
    clip = model_cfg.pop("grad_clip_norm", None)
    pose_cfg = {k: v for k, v in model_cfg.items() if k != "part_lr_multipliers"}
    pose_cfg.update(opts["pose_optimizer"])
    pose_cfg.pop("grad_clip_norm", None)
    return model_cfg, pose_cfg, (float(clip) if clip else None)


@dataclasses.dataclass
class SDEExperiment:
    """The model's :class:`~mtl_jax.experiment.Experiment` plus the pose network."""

    exp: Experiment
    pose_net: Any
    pose_tx: Any
    pose_optimizer: dict
    abstract_state: sde_steps.SDETrainState
    init_state: Any
    train_step: Any


def build_sde_experiment(config: ml_collections.ConfigDict,
                         steps_per_epoch: int | None = None) -> SDEExperiment:
    """The model's experiment, the pose network, the state's shapes and the compiled step."""
    opts = sde_options(config)
    if sde_steps.SDE_TASK not in config.tasks:
        raise UserError(f"config.sde needs the self-supervised depth task "
                        f"'{sde_steps.SDE_TASK}' in config.tasks (its head predicts the "
                        "disparity the photometric loss trains)")
    model_opt, pose_opt, clip = _optimizer_configs(config, opts)
    model_config = ml_collections.ConfigDict(config.to_dict())
    model_config.optimizer = ml_collections.ConfigDict(model_opt)
    exp = build_experiment(model_config, steps_per_epoch=steps_per_epoch)
    if exp.weighting.requires != "losses":
        raise UserError(f"the SDE run supports loss-based task weightings (fixed, uw, dwa, "
                        f"...); {config.weighting.name!r} needs {exp.weighting.requires!r}")
    task = exp.tasks[sde_steps.SDE_TASK]
    options = monodepth_options(opts, task)
    pose_net = build_pose_network(config)
    total = int(config.num_train_steps)
    pose_tx = optim.make_optimizer(pose_opt, total)
    h, w = (int(x) for x in config.input_size)
    pose_rng = jax.random.key(int(config.seed) + 2, impl="rbg")
    init_pose = functools.partial(sde_steps.init_pose, input_size=(h, w),
                                  pose_net=pose_net, pose_tx=pose_tx)
    replicated = NamedSharding(exp.mesh, PartitionSpec())
    pose_abstract = jax.eval_shape(init_pose, pose_rng)
    model_abstract = exp.abstract_state
    fields = {f.name: getattr(model_abstract, f.name)
              for f in dataclasses.fields(model_abstract)}
    pose_fields = dict(zip(("pose_params", "pose_stats", "pose_opt_state"), jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), pose_abstract),
        strict=True))
    abstract_state = sde_steps.SDETrainState(**fields, **pose_fields)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract_state)
    init_pose_jit = jax.jit(init_pose, out_shardings=replicated)
    pose_weights = _pose_weights(str(opts.get("pose_init_from", "") or ""), pose_abstract)

    def init_state() -> sde_steps.SDETrainState:
        model_state = exp.init_state()
        params, stats, opt_state = init_pose_jit(pose_rng)
        if pose_weights is not None:
            params, stats = jax.device_put(pose_weights, replicated)
            opt_state = jax.jit(pose_tx.init, out_shardings=replicated)(params)
        return sde_steps.SDETrainState(
            **{f.name: getattr(model_state, f.name) for f in dataclasses.fields(model_state)},
            pose_params=params, pose_stats=jax.device_put(stats, replicated),
            pose_opt_state=opt_state)

    data_sharding = NamedSharding(exp.mesh, PartitionSpec("data"))
    train_step = jax.jit(
        functools.partial(sde_steps.sde_train_step, model=exp.model, pose_net=pose_net,
                          tasks=exp.tasks, weighting=exp.weighting, tx=exp.tx, pose_tx=pose_tx,
                          options=options, clip_norm=clip),
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    return SDEExperiment(exp=exp, pose_net=pose_net, pose_tx=pose_tx, pose_optimizer=pose_opt,
                         abstract_state=abstract_state, init_state=init_state,
                         train_step=train_step)


def _pose_weights(path: str, pose_abstract) -> tuple[Any, Any] | None:
    """A converted pose network (``convert-weights --from=densemtl`` of an SDE checkpoint:
    its ``pose_net/`` subtree) as ``(params, batch_stats)`` host arrays, checked leaf by leaf
    against the network's shapes; None without a path."""
    if not path:
        return None
    from mtl_jax.models.converters import apply_variables, load_variables

    params_shape, stats_shape, _ = pose_abstract
    return apply_variables(params_shape, stats_shape, load_variables(path, part="pose_net"))


def sde_run(config: ml_collections.ConfigDict, *, training: bool = True) -> Run:
    """The SDE run (module docstring) for the loop of :mod:`mtl_jax.train`, with the same
    guarantees as every run (docs/reliability.md)."""
    if training:
        train_source, val_source = open_data(config, splits=("train", "val"))
        sexp = build_sde_experiment(config, steps_per_epoch=max(
            1, len(train_source) // int(config.batch_size)))
    else:
        sexp = build_sde_experiment(config)
        (val_source,) = open_data(config, splits=("val",))
    exp = sexp.exp
    total = int(config.num_train_steps)
    baseline = baseline_metrics(config)

    def train_data():
        return pipeline.train_iterator(
            train_source, global_batch_size=int(config.batch_size), mesh=exp.mesh,
            seed=int(config.seed), augment=exp.augment, prefetch=config.get("prefetch", 2),
            normals_from_depth=False)

    def learning_rates(step: int) -> dict[str, float]:
        rates = exp.learning_rates(step)
        rates["pose_net"] = optim.learning_rates(sexp.pose_optimizer, total, step)["base"]
        return rates

    return Run(
        kind="sde", config=config, tasks=exp.tasks, abstract_state=sexp.abstract_state,
        init_state=sexp.init_state, train_step=sexp.train_step,
        train_data=train_data if training else None,
        evaluate=lambda state: add_delta_m(evaluate_split(exp, state, val_source, False),
                                           exp.tasks, baseline),
        write_pictures=lambda state, writer, workdir, step, num: write_pictures(
            exp, state, val_source, False, writer, workdir, step, num),
        learning_rates=learning_rates,
        on_fresh_start=trivial_baseline_writer(config, train_source if training else None,
                                               val_source, exp.tasks, False))
