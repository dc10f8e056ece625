"""The training loop: data -> step -> metrics -> checkpoints -> evals (no math here).

``train_and_evaluate(config, workdir)`` trains what a config describes, evaluates it
periodically on the full validation split, writes TensorBoard logs, ``metrics.jsonl``,
prediction pictures, ``results.json`` (final metrics) and checkpoints into ``workdir``, and
resumes from the latest checkpoint there when restarted (bit-exactly: the data-iterator
position is saved with every checkpoint). ``evaluate(config, workdir, step=None)``
evaluates a saved checkpoint.

Every kind of run goes through the one loop :func:`run_loop`: :func:`build_run` picks the
kind's implementation of :class:`~mtl_jax.run_support.Run` -- the supervised run
(:func:`supervised_run`) or domain adaptation (``config.uda``,
:func:`mtl_jax.uda.run.uda_run`) -- and the loop does the rest.

Reliability (docs/reliability.md): a run holds ``<workdir>/LOCK`` (:mod:`mtl_jax.workdir_lock`),
refuses to resume with a config that changes more than :data:`mtl_jax.run_config.SAFE_KEYS`,
falls back from unreadable checkpoints, stops on a failed background save or any failed write
(one line naming the file and the intact checkpoints: :func:`run_loop`), drops the
``metrics.jsonl`` lines of steps replayed after a resume, stops on labels outside the tasks'
range (``config.label_check``), and raises :class:`~mtl_jax.errors.Preempted` after saving
when SIGTERM arrives.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mtl_jax import checkpointing, config_schema, paths, run_config, workdir_lock, writers
from mtl_jax.data import pipeline
from mtl_jax.errors import Preempted, UserError, WriteError, writing
from mtl_jax.experiment import Experiment, build_experiment, dataset_normals_from_depth, open_data
from mtl_jax.run_support import (
    NonFiniteLossError,
    Run,
    StopFlag,
    add_delta_m,
    any_process_stopping,
    baseline_metrics,
    check_label_counts,
    check_nonfinite,
    evaluate_split,
    label_counts,
    log_first_step,
    trivial_baseline_writer,
    write_pictures,
)
from mtl_jax.sde.run import build_sde_experiment, sde_run
from mtl_jax.uda.run import build_uda_experiment, uda_run

__all__ = ["NonFiniteLossError", "build_run", "evaluate", "evaluate_state", "run_experiment",
           "run_loop", "supervised_run", "train_and_evaluate"]


def evaluate_state(exp: Experiment, state, val_source, *, baseline: dict | None = None
                   ) -> dict[str, float]:
    """Every metric of every task over the full split (each example exactly once), and
    ``delta_m`` against ``baseline`` (single-task results) when given."""
    results = evaluate_split(exp, state, val_source, dataset_normals_from_depth(exp.config))
    return add_delta_m(results, exp.tasks, baseline)


def supervised_run(config: ml_collections.ConfigDict, *, training: bool = True) -> Run:
    """The multi-task model trained on ``config.dataset``'s labels, evaluated on its val
    split (with ``delta_m`` when ``config.baseline_results`` names single-task results)."""
    if training:
        train_source, val_source = open_data(config, splits=("train", "val"))
        steps_per_epoch = max(1, len(train_source) // int(config.batch_size))
        exp = build_experiment(config, steps_per_epoch=steps_per_epoch)
    else:
        exp = build_experiment(config)
        (val_source,) = open_data(config, splits=("val",))
    baseline = baseline_metrics(config)
    from_depth = dataset_normals_from_depth(config)

    def train_data():
        return pipeline.train_iterator(
            train_source, global_batch_size=config.batch_size, mesh=exp.mesh, seed=config.seed,
            augment=exp.augment, prefetch=config.get("prefetch", 2),
            normals_from_depth=from_depth)

    return Run(
        kind="supervised", config=config, tasks=exp.tasks, abstract_state=exp.abstract_state,
        init_state=exp.init_state, train_step=exp.train_step,
        train_data=train_data if training else None,
        evaluate=lambda state: evaluate_state(exp, state, val_source, baseline=baseline),
        write_pictures=lambda state, writer, workdir, step, num: write_pictures(
            exp, state, val_source, from_depth, writer, workdir, step, num),
        learning_rates=exp.learning_rates,
        on_fresh_start=trivial_baseline_writer(config, train_source if training else None,
                                               val_source, exp.tasks, from_depth))


#: The kinds of run besides the supervised one: the config key that selects each, its
#: :class:`~mtl_jax.run_support.Run` and its experiment (model + what the checkpoints hold).
KINDS = (
    ("uda", uda_run, build_uda_experiment),  # domain adaptation: two datasets, two players
    ("sde", sde_run, build_sde_experiment),  # depth from video: triplets and a pose network
)


def _kind(config: ml_collections.ConfigDict):
    return next((k for k in KINDS if config.get(k[0], None)), None)


def build_run(config: ml_collections.ConfigDict, *, training: bool = True) -> Run:
    """The kind of run ``config`` describes. A new kind (its own state, step and data) is a
    new implementation of :class:`~mtl_jax.run_support.Run` and one line of :data:`KINDS`."""
    kind = _kind(config)
    return kind[1](config, training=training) if kind else supervised_run(config,
                                                                         training=training)


def run_experiment(config: ml_collections.ConfigDict) -> tuple[Experiment, Any]:
    """The model's :class:`~mtl_jax.experiment.Experiment` and the abstract state that the
    checkpoints of the kind of run ``config`` describes hold (with a UDA run's discriminators
    or an SDE run's pose network), without opening any data: what ``predict`` restores."""
    kind = _kind(config)
    if kind is None:
        exp = build_experiment(config)
        return exp, exp.abstract_state
    built = kind[2](config)
    return built.exp, built.abstract_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train, evaluate and checkpoint; resume from ``workdir`` if it has checkpoints.

    Returns the final evaluation metrics (``{'<task>/<metric>': value}``). A SIGTERM at any
    time (preemption) makes the run save a checkpoint after the current step and raise
    :class:`~mtl_jax.errors.Preempted` (``mtl-jax train`` exits with code 75). The run holds
    ``<workdir>/LOCK`` until it returns: a second run on the same workdir is refused.
    """
    config_schema.check(config)  # before the workdir, its lock or config.json exist
    with StopFlag() as stop:  # installed first: a SIGTERM during setup is not lost either
        with workdir_lock.WorkdirLock(workdir):
            paths.makedirs(workdir)  # also gs://bucket/run
            # Before anything is restored or written: refuse a resume with another
            # model/tasks/data.
            changes = (run_config.check_resume(config, workdir)
                       if checkpointing.saved_steps(workdir) else {})
            return run_loop(build_run(config), workdir, stop, changes)


def run_loop(run: Run, workdir: str, stop: StopFlag, changes: dict) -> dict[str, float]:
    """The training loop of every kind of run (module docstring); ``changes`` are the config
    changes of a resume (:func:`mtl_jax.run_config.check_resume`), recorded once restored.

    A failed write of any output (checkpoint, pictures, TensorBoard, ``metrics.jsonl``,
    ``results.json``: disk full, quota, a lost mount) stops the run with one
    :class:`~mtl_jax.errors.WriteError` line naming the output, the OS error and the
    checkpoints that are intact (those committed once the saves in flight have finished)."""
    try:
        return _run_loop(run, workdir, stop, changes)
    except WriteError as e:  # the checkpoint manager is closed: its saves have finished
        raise e.with_intact_checkpoints(checkpointing.saved_steps(workdir),
                                        checkpointing.checkpoint_dir(workdir)) from e


def _run_loop(run: Run, workdir: str, stop: StopFlag, changes: dict) -> dict[str, float]:
    config = run.config
    is_primary = jax.process_index() == 0
    manager = checkpointing.make_manager(workdir,
                                         async_save=config.get("async_checkpoints", True))
    saver = checkpointing.Saver(manager, config.keep_checkpoints)
    train_it = run.train_data()
    try:
        restored = checkpointing.restore(manager, run.abstract_state, set_aside=True)
        if is_primary:  # the config and the logs now describe the run that resumes
            start_step = restored[2] if restored is not None else 0
            with writing(f"the run's config {paths.join(workdir, 'config.json')}"):
                run_config.record(config, workdir, start_step, changes)
            metrics_log = paths.join(workdir, "metrics.jsonl")
            with writing(f"the metrics log {metrics_log}"):
                writers.truncate_jsonl(metrics_log, start_step)
        writer = writers.create_default_writer(workdir, just_logging=not is_primary)
    except BaseException:
        train_it.close()
        saver.close(check=False)
        raise
    try:
        return _train(run, workdir, stop, restored, writer, saver, train_it)
    finally:  # stop the prefetch threads
        train_it.close()


def _train(run: Run, workdir: str, stop: StopFlag, restored, writer, saver, train_it
           ) -> dict[str, float]:
    config = run.config
    is_primary = jax.process_index() == 0
    total = int(config.num_train_steps)
    reporter = writers.ProgressReporter(total, writer=writer,
                                        every_steps=config.get("log_every_steps", 50))
    results: dict[str, float] = {}
    pending: tuple[int, dict] | None = None  # metrics are fetched one step late
    acc, acc_n = None, 0
    label_check = config.get("label_check", "error")

    def flush_pending():
        nonlocal pending, acc, acc_n
        if pending is None:
            return
        p_step, p_metrics = pending
        pending = None
        check_nonfinite(p_step, p_metrics, run.tasks, config.get("skip_nonfinite", False))
        check_label_counts(f"the training batch of step {p_step}", label_counts(p_metrics),
                           label_check)
        if p_step % config.log_every_steps == 0 or p_step == total:
            means = jax.device_get(jax.tree.map(lambda a: a / acc_n, acc))
            scalars = {f"train/{k}": float(v) for k, v in means.items()
                       if not k.startswith(("nonfinite", "bad_labels"))}
            for part, lr in run.learning_rates(p_step).items():
                scalars[f"train/lr/{part}"] = lr
            writer.write_scalars(p_step, scalars)
            acc, acc_n = None, 0

    step, stopping = 0, False
    try:
        if restored is not None:
            state, data_state, start = restored
            train_it.set_state(data_state)
            logging.info("Resumed from the checkpoint of step %d in %s.", start, workdir)
            writer.write_resume(start)
        else:
            state, start = run.init_state(), 0
            writer.write_hparams(config.to_dict())
            if run.on_fresh_start is not None:
                run.on_fresh_start(writer, workdir)
        step = start
        while step < total:
            batch = next(train_it)
            t_call = time.perf_counter()
            state, metrics = run.train_step(state, batch)
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
                    results = run.evaluate(state)
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                    run.write_pictures(state, writer, workdir, step,
                                       config.get("num_vis_examples", 4))
            stopping = any_process_stopping(stop.set)
            if last or stopping or step % config.checkpoint_every_steps == 0:
                flush_pending()  # never save a state whose step was not checked
                with reporter.timed("checkpoint"):
                    saver.save(step, state, train_it.get_state())
            if stopping:
                break
        flush_pending()
        saver.close()  # raises if the last save failed
    except BaseException:  # finish in-flight async saves; the first error is the one reported
        saver.close(check=False)
        raise
    if stopping and step < total:  # SIGTERM here or on another process: saved, resume me
        writer.close()
        raise Preempted(step, workdir)
    if results and is_primary and step == total:
        path = paths.join(workdir, "results.json")
        with writing(f"the final results {path}"):
            paths.write_text(path, json.dumps({"step": step, **results}, indent=2,
                                              sort_keys=True))
    writer.flush()
    writer.close()
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
             ) -> dict[str, Any]:
    """Evaluate the checkpoint of ``step`` (default: latest) in ``workdir`` on the val split
    (a UDA run: the target's, and the source's as ``source/...``).

    A workdir without checkpoints evaluates the initial state when the config loads converted
    weights (``config.model.init_from``, e.g. a model trained with the authors' code), as
    step 0."""
    run = build_run(config, training=False)
    manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
    try:
        restored = checkpointing.restore(manager, run.abstract_state, step)
    finally:
        manager.close()
    if restored is None and step is None and config.model.get("init_from", None):
        logging.info("No checkpoint in %s: evaluating the weights of config.model.init_from=%s.",
                     workdir, config.model.init_from)
        restored = (run.init_state(), None, 0)
    if restored is None:
        raise UserError(f"no checkpoint in {paths.join(workdir, 'checkpoints')}; train first "
                        "with: mtl-jax train --config=... --workdir=" + workdir)
    state, _, step = restored
    return {"step": step, **run.evaluate(state)}
