"""The UDA run: two datasets, both players in one compiled step, target eval.

:func:`build_uda_experiment` extends :func:`mtl_jax.experiment.build_experiment` (tasks,
model, weighting, the model's optimiser, mesh, eval/predict steps) with the discriminators,
their optimiser, the :class:`~mtl_jax.uda.steps.UDATrainState` shapes and shardings, and the
jitted :func:`~mtl_jax.uda.steps.uda_train_step`.

:func:`uda_run` is this kind of run as the one training loop of :mod:`mtl_jax.train` sees it
(a :class:`~mtl_jax.run_support.Run`): the labelled data (``config.dataset``) and the
unlabelled target (``config.uda.target_dataset``) are read by two independent
:func:`pipeline.train_iterator` (each sharded over ``data``, each with its own seed), their
positions saved together with both players in every checkpoint (data item ``{'source': ...,
'target': ...}``), so a restart resumes bit-exactly. Evaluations score the target's val split
(``eval/<task>/<metric>``, and ``results.json`` at the top level) and the source's val split
(``eval/source/...``, ``source/...`` in ``results.json``); the pictures show the target's val
split; per-step discriminator losses and accuracies are logged as
``train/disc/loss/<task>_s<k>`` and ``train/disc/accuracy/<task>_s<k>``, the discriminators'
learning rate as ``train/lr/discriminator``.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mtl_jax import optim
from mtl_jax.data import pipeline
from mtl_jax.errors import UserError
from mtl_jax.experiment import Experiment, build_experiment, dataset_normals_from_depth, open_data
from mtl_jax.models.options import as_dict
from mtl_jax.run_support import NamedIterators, Run, evaluate_split, write_pictures
from mtl_jax.uda import inputs as uda_inputs
from mtl_jax.uda import steps as uda_steps
from mtl_jax.uda.discriminator import TaskDiscriminators

DISC_OPTIMIZER = dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.99, schedule="poly",
                      power=0.9)


@dataclasses.dataclass
class UDAExperiment:
    """The model's :class:`~mtl_jax.experiment.Experiment` plus the discriminators."""

    exp: Experiment
    disc: TaskDiscriminators
    disc_tx: Any
    adversarial: bool
    half_batch: int
    abstract_state: uda_steps.UDATrainState
    init_state: Callable[[], uda_steps.UDATrainState]
    train_step: Callable


def uda_options(config: ml_collections.ConfigDict) -> dict:
    """``config.uda`` with defaults filled in and checked."""
    opts = as_dict(config.get("uda", None))
    known = {"adversarial", "lambda_adv", "scales", "target_dataset", "source_eval_dataset",
             "discriminator", "optimizer"}
    unknown = set(opts) - known
    if unknown:
        raise UserError(f"config.uda has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if not opts.get("target_dataset"):
        raise UserError("config.uda.target_dataset is required: the target domain's dataset "
                        "(dict(name=..., config=..., options=...), like config.dataset)")
    opts.setdefault("adversarial", True)
    opts.setdefault("lambda_adv", 0.005)
    opts["scales"] = tuple(int(s) for s in (opts.get("scales", None) or (0,)))
    opts["discriminator"] = as_dict(opts.get("discriminator", None))
    opts["optimizer"] = {**DISC_OPTIMIZER, **as_dict(opts.get("optimizer", None))}
    return opts


def _with_dataset(config: ml_collections.ConfigDict, dataset: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.dataset = ml_collections.ConfigDict(as_dict(dataset))
    return cfg


def make_discriminators(config: ml_collections.ConfigDict, tasks: dict[str, Any]
                        ) -> tuple[TaskDiscriminators, dict[str, tuple[int, ...]]]:
    """The discriminators of ``config.uda`` for ``tasks`` (one per task and output scale) and
    their input shapes (batch 1)."""
    opts = uda_options(config)
    unsupported = set(tasks) - set(uda_inputs.DISCRIMINATOR_INPUTS)
    if unsupported:
        raise UserError(f"UDA: no discriminator input defined for task(s) {sorted(unsupported)};"
                        f" supported: {sorted(uda_inputs.DISCRIMINATOR_INPUTS)}")
    scales = opts["scales"]
    d_cfg = opts["discriminator"]
    disc = TaskDiscriminators(
        keys=uda_inputs.discriminator_keys(tuple(tasks), scales),
        channels=tuple(d_cfg.get("channels", (64, 128, 256, 512))),
        negative_slope=float(d_cfg.get("negative_slope", 0.2)),
        power_iterations=int(d_cfg.get("power_iterations", 1)))
    h, w = (int(x) for x in config.input_size)
    shapes = {uda_inputs.discriminator_key(t, s):
              (1, h, w, uda_inputs.input_channels(t, task.channels))
              for t, task in tasks.items() for s in scales}
    return disc, shapes


def discriminator_param_counts(config: ml_collections.ConfigDict, tasks: dict[str, Any]
                               ) -> dict[str, int]:
    """``{'<task>_s<k>': parameters}`` of the discriminators an adversarial UDA config trains
    (``{}`` without ``config.uda`` or with ``adversarial=False``); shapes only."""
    if not config.get("uda", None) or not uda_options(config)["adversarial"]:
        return {}
    disc, shapes = make_discriminators(config, tasks)
    params = jax.eval_shape(lambda r: disc.init(
        {"params": r}, {k: jax.numpy.zeros(v, jax.numpy.float32) for k, v in shapes.items()},
        update_stats=False)["params"], jax.random.key(0))
    return {key: int(sum(np.prod(x.shape) for x in jax.tree.leaves(params[key])))
            for key in disc.keys}


def build_uda_experiment(config: ml_collections.ConfigDict,
                         steps_per_epoch: int | None = None) -> UDAExperiment:
    """The model's experiment, discriminators, state shapes and the compiled UDA step."""
    opts = uda_options(config)
    exp = build_experiment(config, steps_per_epoch=steps_per_epoch)
    if exp.weighting.requires != "losses":
        raise UserError(f"UDA supports loss-based task weightings (fixed, uw, dwa, ...); "
                        f"{config.weighting.name!r} needs {exp.weighting.requires!r}")
    bs = int(config.batch_size)
    n_dev = exp.mesh.shape["data"]
    if bs % 2 or (bs // 2) % n_dev:
        raise UserError(f"UDA: config.batch_size={bs} is the mixed batch (half source, half "
                        f"target); it must be even and each half divisible by the {n_dev} "
                        "devices")
    tasks = exp.tasks
    scales = opts["scales"]
    disc, shapes = make_discriminators(config, tasks)
    disc_tx = optim.make_optimizer(opts["optimizer"], int(config.num_train_steps))
    disc_rng = jax.random.key(int(config.seed) + 1, impl="rbg")
    init_disc = functools.partial(uda_steps.init_disc, input_shapes=shapes, disc=disc,
                                  disc_tx=disc_tx)
    replicated = NamedSharding(exp.mesh, PartitionSpec())
    disc_abstract = jax.eval_shape(init_disc, disc_rng)
    model_abstract = exp.abstract_state

    def _fields(s):
        return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}

    abstract_state = uda_steps.UDATrainState(
        **_fields(model_abstract),
        **dict(zip(("disc_params", "disc_stats", "disc_opt_state"),
                   jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=replicated),
                                disc_abstract), strict=True)))
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract_state)
    init_disc_jit = jax.jit(init_disc, out_shardings=replicated)

    def init_state() -> uda_steps.UDATrainState:
        model_state = exp.init_state()
        d_params, d_stats, d_opt = init_disc_jit(disc_rng)
        return uda_steps.UDATrainState(**_fields(model_state), disc_params=d_params,
                                       disc_stats=d_stats, disc_opt_state=d_opt)

    adversarial = bool(opts["adversarial"])
    data_sharding = NamedSharding(exp.mesh, PartitionSpec("data"))
    train_step = jax.jit(
        functools.partial(uda_steps.uda_train_step, model=exp.model, tasks=tasks,
                          weighting=exp.weighting, tx=exp.tx, disc=disc, disc_tx=disc_tx,
                          lambda_adv=float(opts["lambda_adv"]), scales=scales,
                          adversarial=adversarial),
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    return UDAExperiment(exp=exp, disc=disc, disc_tx=disc_tx, adversarial=adversarial,
                         half_batch=bs // 2, abstract_state=abstract_state,
                         init_state=init_state, train_step=train_step)


def open_uda_data(config: ml_collections.ConfigDict, splits=("train", "val")) -> dict:
    """``{'source': [...], 'target': [...], 'source_eval': [...]}`` sources of ``splits``."""
    opts = uda_options(config)
    out = {"source": open_data(config, splits=splits),
           "target": open_data(_with_dataset(config, opts["target_dataset"]), splits=splits)}
    source_eval = opts.get("source_eval_dataset")
    out["source_eval"] = (open_data(_with_dataset(config, source_eval), splits=splits)
                          if source_eval else out["source"])
    return out


def _eval_normals_from_depth(config, dataset) -> bool:
    return dataset_normals_from_depth(_with_dataset(config, dataset))


def evaluate_both(uexp: UDAExperiment, state, data: dict) -> dict[str, float]:
    """Target val metrics at the top level, the source val's under ``source/``."""
    config = uexp.exp.config
    opts = uda_options(config)
    results = evaluate_split(uexp.exp, state, data["target"][-1],
                             _eval_normals_from_depth(config, opts["target_dataset"]),
                             where="the target's validation split")
    src_ds = opts.get("source_eval_dataset") or config.dataset
    src = evaluate_split(uexp.exp, state, data["source_eval"][-1],
                         _eval_normals_from_depth(config, src_ds),
                         where="the source's validation split")
    results.update({f"source/{k}": v for k, v in src.items()})
    return results


def uda_run(config: ml_collections.ConfigDict, *, training: bool = True) -> Run:
    """The UDA run (module docstring) for the loop of :mod:`mtl_jax.train`, with the same
    guarantees as every run (docs/reliability.md); labels outside a task's range are counted
    in every step's labelled half and over both val splits."""
    opts = uda_options(config)
    if training:
        data = open_uda_data(config)
        uexp = build_uda_experiment(config, steps_per_epoch=max(
            1, len(data["source"][0]) // max(1, int(config.batch_size) // 2)))
    else:
        uexp = build_uda_experiment(config)
        data = open_uda_data(config, splits=("val",))
    exp = uexp.exp
    total = int(config.num_train_steps)
    target_from_depth = _eval_normals_from_depth(config, opts["target_dataset"])

    def train_data() -> NamedIterators:
        iterators = {"source": pipeline.train_iterator(
            data["source"][0], global_batch_size=uexp.half_batch, mesh=exp.mesh,
            seed=int(config.seed), augment=exp.augment, prefetch=config.get("prefetch", 2),
            normals_from_depth=dataset_normals_from_depth(config))}
        if uexp.adversarial:
            iterators["target"] = pipeline.train_iterator(
                data["target"][0], global_batch_size=uexp.half_batch, mesh=exp.mesh,
                seed=int(config.seed) + 1, augment=exp.augment,
                prefetch=config.get("prefetch", 2), normals_from_depth=target_from_depth)
        return NamedIterators(iterators)

    def learning_rates(step: int) -> dict[str, float]:
        rates = exp.learning_rates(step)
        if uexp.adversarial:
            rates["discriminator"] = optim.learning_rates(opts["optimizer"], total, step)["base"]
        return rates

    return Run(
        kind="uda", config=config, tasks=exp.tasks, abstract_state=uexp.abstract_state,
        init_state=uexp.init_state, train_step=uexp.train_step,
        train_data=train_data if training else None,
        evaluate=lambda state: evaluate_both(uexp, state, data),
        write_pictures=lambda state, writer, workdir, step, num: write_pictures(
            exp, state, data["target"][-1], target_from_depth, writer, workdir, step, num),
        learning_rates=learning_rates)


def discriminator_parameter_count(uexp: UDAExperiment) -> int:
    """Parameters of all discriminators together."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(uexp.abstract_state.disc_params)))
