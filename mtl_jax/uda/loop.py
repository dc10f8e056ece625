"""The UDA experiment and loop: two datasets, both players in one compiled step, target eval.

:func:`build_uda_experiment` extends :func:`mtl_jax.experiment.build_experiment` (tasks,
model, weighting, the model's optimiser, mesh, eval/predict steps) with the discriminators,
their optimiser, the :class:`~mtl_jax.uda.steps.UDATrainState` shapes and shardings, and the
jitted :func:`~mtl_jax.uda.steps.uda_train_step`.

:func:`train_and_evaluate_uda` is the training loop of :mod:`mtl_jax.train` for a mixed
batch: the labelled data (``config.dataset``) and the unlabelled target
(``config.uda.target_dataset``) are read by two independent :func:`pipeline.train_iterator`
(each sharded over ``data``, each with its own seed), their positions saved together with both
players in every checkpoint (data item ``{'source': ..., 'target': ...}``), so a restart
resumes bit-exactly. Evaluations score the target's val split (``eval/<task>/<metric>``, and
``results.json`` at the top level) and the source's val split (``eval/source/...``,
``source/...`` in ``results.json``); per-step discriminator losses and accuracies are logged
as ``train/disc/loss/<task>_s<k>`` and ``train/disc/accuracy/<task>_s<k>``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from mtl_jax import checkpointing, optim, run_config, writers
from mtl_jax.data import pipeline
from mtl_jax.errors import Preempted, UserError
from mtl_jax.evaluation.metrics import compute_metrics, merge_metrics
from mtl_jax.experiment import Experiment, build_experiment, dataset_normals_from_depth, open_data
from mtl_jax.uda import inputs as uda_inputs
from mtl_jax.uda import steps as uda_steps
from mtl_jax.uda.discriminator import TaskDiscriminators

DISC_OPTIMIZER = dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.99, schedule="poly",
                      power=0.9)


def _to_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


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
    opts = _to_dict(config.get("uda", None))
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
    opts["discriminator"] = _to_dict(opts.get("discriminator", None))
    opts["optimizer"] = {**DISC_OPTIMIZER, **_to_dict(opts.get("optimizer", None))}
    return opts


def _with_dataset(config: ml_collections.ConfigDict, dataset: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.dataset = ml_collections.ConfigDict(_to_dict(dataset))
    return cfg


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
    unsupported = set(tasks) - set(uda_inputs.DISCRIMINATOR_INPUTS)
    if unsupported:
        raise UserError(f"UDA: no discriminator input defined for task(s) {sorted(unsupported)};"
                        f" supported: {sorted(uda_inputs.DISCRIMINATOR_INPUTS)}")
    scales = opts["scales"]
    keys = uda_inputs.discriminator_keys(tuple(tasks), scales)
    d_cfg = opts["discriminator"]
    disc = TaskDiscriminators(
        keys=keys, channels=tuple(d_cfg.get("channels", (64, 128, 256, 512))),
        negative_slope=float(d_cfg.get("negative_slope", 0.2)),
        power_iterations=int(d_cfg.get("power_iterations", 1)))
    disc_tx = optim.make_optimizer(opts["optimizer"], int(config.num_train_steps))
    h, w = (int(x) for x in config.input_size)
    shapes = {uda_inputs.discriminator_key(t, s):
              (1, h, w, uda_inputs.input_channels(t, task.channels))
              for t, task in tasks.items() for s in scales}
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


def evaluate_on(exp: Experiment, state, source, normals_from_depth: bool, *,
                where: str = "the validation split") -> dict[str, float]:
    """Every metric of every task over ``source`` (each example exactly once).

    Labels outside a task's range, counted over the whole split, stop the evaluation with
    ``<where> has K <task> label pixel(s) outside the task's range ...`` or log it as a
    warning (``config.label_check='warn'``), as :func:`mtl_jax.train.evaluate_state` does;
    the counts are not returned as metrics."""
    from mtl_jax.train import _check_label_counts, label_counts

    acc = None
    model_state = state.model_state() if hasattr(state, "model_state") else state
    for batch in pipeline.eval_batches(source, global_batch_size=exp.eval_batch_size,
                                       mesh=exp.mesh, normals_from_depth=normals_from_depth):
        acc = merge_metrics(acc, exp.eval_step(model_state, batch))
    results = compute_metrics(acc)
    _check_label_counts(where, label_counts(results, pop=True),
                        exp.config.get("label_check", "error"))
    return results


def evaluate_both(uexp: UDAExperiment, state, data: dict) -> dict[str, float]:
    """Target val metrics at the top level, the source val's under ``source/``."""
    config = uexp.exp.config
    opts = uda_options(config)
    results = evaluate_on(uexp.exp, state, data["target"][-1],
                          _eval_normals_from_depth(config, opts["target_dataset"]),
                          where="the target's validation split")
    src_ds = opts.get("source_eval_dataset") or config.dataset
    src = evaluate_on(uexp.exp, state, data["source_eval"][-1],
                      _eval_normals_from_depth(config, src_ds),
                      where="the source's validation split")
    results.update({f"source/{k}": v for k, v in src.items()})
    return results


def train_and_evaluate_uda(config: ml_collections.ConfigDict, workdir: str, stop
                           ) -> dict[str, float]:
    """:func:`mtl_jax.train.train_and_evaluate` for ``config.uda`` (module docstring), with
    the same guarantees (docs/reliability.md): a resume refuses a config that changes the
    model, tasks or data; unreadable checkpoints fall back to the newest readable one; a
    failed background save stops the run; ``metrics.jsonl`` never repeats a step; labels
    outside a task's range are counted in every step's labelled half and over both val
    splits, and stop the run (or warn, ``config.label_check``); SIGTERM saves and raises
    :class:`~mtl_jax.errors.Preempted`."""
    from mtl_jax.train import (
        _any_process_stopping,
        _check_label_counts,
        _check_nonfinite,
        _write_pictures,
        label_counts,
        log_first_step,
    )

    os.makedirs(workdir, exist_ok=True)
    changes = run_config.check_resume(config, workdir) if checkpointing.saved_steps(workdir) else {}
    data = open_uda_data(config)
    source_train = data["source"][0]
    uexp = build_uda_experiment(config, steps_per_epoch=max(
        1, len(source_train) // max(1, int(config.batch_size) // 2)))
    exp = uexp.exp
    opts = uda_options(config)
    is_primary = jax.process_index() == 0
    manager = checkpointing.make_manager(workdir,
                                         async_save=config.get("async_checkpoints", True))
    iterators = {"source": pipeline.train_iterator(
        source_train, global_batch_size=uexp.half_batch, mesh=exp.mesh, seed=int(config.seed),
        augment=exp.augment, prefetch=config.get("prefetch", 2),
        normals_from_depth=dataset_normals_from_depth(config))}
    if uexp.adversarial:
        iterators["target"] = pipeline.train_iterator(
            data["target"][0], global_batch_size=uexp.half_batch, mesh=exp.mesh,
            seed=int(config.seed) + 1, augment=exp.augment, prefetch=config.get("prefetch", 2),
            normals_from_depth=_eval_normals_from_depth(config, opts["target_dataset"]))
    try:
        restored = checkpointing.restore(manager, uexp.abstract_state, set_aside=True)
    except BaseException:
        for it in iterators.values():
            it.close()
        manager.close()
        raise
    if is_primary:  # the config and the logs now describe the run that resumes
        run_config.record(config, workdir, restored[2] if restored is not None else 0, changes)
        writers.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"),
                               restored[2] if restored is not None else 0)
    writer = writers.create_default_writer(workdir, just_logging=not is_primary)
    if restored is not None:
        state, data_state, start = restored
        for name, it in iterators.items():
            it.set_state(data_state[name])
        logging.info("Resumed from the checkpoint of step %d in %s.", start, workdir)
        writer.write_resume(start)
    else:
        state, start = uexp.init_state(), 0
        writer.write_hparams(config.to_dict())

    total = int(config.num_train_steps)
    reporter = writers.ProgressReporter(total, writer=writer,
                                        every_steps=config.get("log_every_steps", 50))
    results: dict[str, float] = {}
    pending: tuple[int, dict] | None = None
    acc, acc_n = None, 0
    saver = checkpointing.Saver(manager, config.keep_checkpoints)
    label_check = config.get("label_check", "error")

    def flush_pending():
        nonlocal pending, acc, acc_n
        if pending is None:
            return
        p_step, p_metrics = pending
        pending = None
        _check_nonfinite(p_step, p_metrics, exp.tasks, config.get("skip_nonfinite", False))
        _check_label_counts(f"the training batch of step {p_step}", label_counts(p_metrics),
                            label_check)
        if p_step % config.log_every_steps == 0 or p_step == total:
            means = jax.device_get(jax.tree.map(lambda a: a / acc_n, acc))
            scalars = {f"train/{k}": float(v) for k, v in means.items()
                       if not k.startswith(("nonfinite", "bad_labels"))}
            for part, lr in exp.learning_rates(p_step).items():
                scalars[f"train/lr/{part}"] = lr
            if uexp.adversarial:
                scalars["train/lr/discriminator"] = optim.learning_rates(
                    opts["optimizer"], total, p_step)["base"]
            writer.write_scalars(p_step, scalars)
            acc, acc_n = None, 0

    def data_state() -> dict:
        return {name: it.get_state() for name, it in iterators.items()}

    step = start
    stopping = False
    try:
        while step < total:
            batch = {name: next(it) for name, it in iterators.items()}
            t_call = time.perf_counter()
            state, metrics = uexp.train_step(state, batch)
            if step == start:
                log_first_step(writer, start, metrics, t_call)
            flush_pending()
            saver.check()  # a failed background save stops the run here
            step += 1
            acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
            acc_n += 1
            pending = (step, metrics)
            reporter(step)
            last = step == total
            if last or step % config.eval_every_steps == 0:
                flush_pending()
                with reporter.timed("eval"):
                    results = evaluate_both(uexp, state, data)
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                    _write_pictures(exp, state.model_state(), data["target"][-1], writer,
                                    workdir, step, config.get("num_vis_examples", 4))
            stopping = _any_process_stopping(stop.set)
            if last or stopping or step % config.checkpoint_every_steps == 0:
                flush_pending()  # never save a state whose step was not checked
                with reporter.timed("checkpoint"):
                    saver.save(step, state, data_state())
            if stopping:
                break
        flush_pending()
        saver.close()  # raises if the last save failed
    except BaseException:  # finish in-flight async saves; the first error is the one reported
        saver.close(check=False)
        raise
    finally:
        for it in iterators.values():
            it.close()
    if stopping and step < total:  # SIGTERM here or on another process: saved, resume me
        writer.close()
        raise Preempted(step, workdir)
    if results and is_primary and step == total:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"step": step, **results}, f, indent=2, sort_keys=True)
    writer.flush()
    writer.close()
    return results


def evaluate_uda(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
                 ) -> dict[str, Any]:
    """Evaluate a UDA checkpoint on the target val split (and the source's, ``source/``)."""
    uexp = build_uda_experiment(config)
    data = open_uda_data(config, splits=("val",))
    manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
    restored = checkpointing.restore(manager, uexp.abstract_state, step)
    manager.close()
    if restored is None:
        raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first "
                        "with: mtl-jax train --config=... --workdir=" + workdir)
    state, _, step = restored
    return {"step": step, **evaluate_both(uexp, state, data)}


def discriminator_parameter_count(uexp: UDAExperiment) -> int:
    """Parameters of all discriminators together."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(uexp.abstract_state.disc_params)))
