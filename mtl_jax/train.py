"""The training loop: data -> step -> metrics -> checkpoints -> evals (no math here).

``train_and_evaluate(config, workdir)`` trains the model a config describes, evaluates it
periodically on the full validation split, writes TensorBoard logs, ``metrics.jsonl``,
prediction pictures, ``results.json`` (final metrics) and checkpoints into ``workdir``, and
resumes from the latest checkpoint there when restarted (bit-exactly: the data-iterator
position is saved with every checkpoint). ``evaluate(config, workdir, step=None)``
evaluates a saved checkpoint.

Reliability (docs/reliability.md): a run holds ``<workdir>/LOCK`` (:mod:`mtl_jax.workdir_lock`),
refuses to resume with a config that changes more than :data:`mtl_jax.run_config.SAFE_KEYS`,
falls back from unreadable checkpoints, stops on a failed background save, drops the
``metrics.jsonl`` lines of steps replayed after a resume, stops on labels outside the tasks'
range (``config.label_check``), and raises :class:`~mtl_jax.errors.Preempted` after saving
when SIGTERM arrives.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mtl_jax import checkpointing, run_config, workdir_lock, writers
from mtl_jax.data import pipeline
from mtl_jax.errors import Preempted, UserError
from mtl_jax.evaluation import delta_m, load_baseline
from mtl_jax.evaluation.metrics import compute_metrics, directions_for, merge_metrics
from mtl_jax.evaluation.pictures import prediction_grid
from mtl_jax.evaluation.trivial import trivial_baseline
from mtl_jax.experiment import Experiment, build_experiment, dataset_normals_from_depth, open_data


class NonFiniteLossError(UserError, FloatingPointError):
    """A task loss became NaN/inf; the update of that step was not applied."""


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate_state(exp: Experiment, state, val_source, *, baseline: dict | None = None
                   ) -> dict[str, float]:
    """Every metric of every task over the full split (each example exactly once)."""
    acc = None
    from_depth = dataset_normals_from_depth(exp.config)
    for batch in pipeline.eval_batches(val_source, global_batch_size=exp.eval_batch_size,
                                       mesh=exp.mesh, normals_from_depth=from_depth):
        acc = merge_metrics(acc, exp.eval_step(state, batch))
    results = compute_metrics(acc)
    _check_label_counts("the validation split", label_counts(results, pop=True),
                        exp.config.get("label_check", "error"))
    if baseline:
        # Main metrics only: side outputs and compat modes have no direction, never enter Δm.
        directions = directions_for(exp.tasks)
        keys = [k for k in directions if k in results and k in baseline]
        results["delta_m"] = delta_m(results, baseline, directions, keys or None)
    return results


def _write_pictures(exp: Experiment, state, val_source, writer, workdir: str, step: int,
                    num: int) -> None:
    if num <= 0:
        return
    batch = next(pipeline.eval_batches(
        val_source, global_batch_size=exp.eval_batch_size, mesh=exp.mesh,
        normals_from_depth=dataset_normals_from_depth(exp.config)))
    preds = exp.predict_step(state, batch["image"])
    if jax.process_count() > 1:  # the batch is split over processes: gather it (collective)
        from jax.experimental import multihost_utils

        batch = multihost_utils.process_allgather(batch, tiled=True)
    host_batch = {k: np.asarray(jax.device_get(v))[:num] for k, v in batch.items()}
    host_preds = {k: np.asarray(jax.device_get(v))[:num] for k, v in preds.items()}
    picture = prediction_grid(host_batch, host_preds, max_examples=num)
    writer.write_images(step, {"predictions": picture[None]})
    if jax.process_index() == 0:
        from mtl_jax.data.visualize import save_png

        save_png(os.path.join(workdir, f"predictions_step{step:07d}.png"), picture)
        save_png(os.path.join(workdir, "predictions.png"), picture)


def _baseline(config) -> dict | None:
    paths = config.get("baseline_results", "") or ()
    if isinstance(paths, str):  # comma-separated, as given on the command line
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    paths = list(paths)
    if not paths:
        return None
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"baseline_results files not found: {missing}. They are the "
                        "results.json of single-task runs (configs/stl.py).")
    return load_baseline(paths)


def _check_nonfinite(step: int, metrics: dict, tasks, skip: bool) -> None:
    flags = jax.device_get({k: v for k, v in metrics.items() if k.startswith("nonfinite")})
    if not bool(flags["nonfinite"]):
        return
    bad = [t for t in tasks if bool(flags[f"nonfinite/{t}"])] or ["(gradient or total)"]
    msg = (f"non-finite loss at step {step} in task(s) {', '.join(bad)}; the update of that "
           "step was not applied and no checkpoint holds it.")
    if skip:
        logging.warning("%s Skipped (config.skip_nonfinite=True).", msg)
        return
    raise NonFiniteLossError(msg + " Lower the learning rate, check the labels, or set "
                             "config.skip_nonfinite=True to skip such steps.")


def label_counts(metrics: dict, *, pop: bool = False) -> dict[str, int]:
    """``{task: number of labels outside its range}`` from train metrics
    (``bad_labels/<task>``) or eval results (``bad_labels/<task>/count``); ``pop`` removes
    them from ``metrics``."""
    keys = [k for k in metrics if k.startswith("bad_labels/")]
    values = {k: metrics.pop(k) if pop else metrics[k] for k in keys}
    return {k.split("/")[1]: int(v) for k, v in jax.device_get(values).items()}


def _check_label_counts(where: str, counts: dict[str, int], mode: str) -> None:
    """Error (``config.label_check='error'``, default) or warning (``'warn'``) naming the
    number of out-of-range labels (already left out of the losses and metrics)."""
    bad = {t: n for t, n in counts.items() if n}
    if not bad:
        return
    listed = ", ".join(f"{n} {t} label pixel(s)" for t, n in bad.items())
    msg = (f"{where} has {listed} outside the task's range (e.g. a class id >= "
           "config.tasks.semseg.num_classes); they are ignored by the losses and metrics")
    if mode == "warn":
        logging.warning("%s (config.label_check='warn').", msg)
        return
    if mode != "error":
        raise UserError(f"config.label_check must be 'error' or 'warn', got {mode!r}")
    raise UserError(msg + ": fix the dataset or the task's options (e.g. num_classes), or set "
                    "config.label_check='warn' to go on")


def log_first_step(writer, start: int, metrics, t_call: float) -> None:
    """Log this process's first train step time (compilation or a read of the persistent
    compilation cache, plus one step) as ``perf/time/first_step`` at step ``start + 1``."""
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t_call
    logging.info("First train step of this process (compilation or a read of the persistent "
                 "compilation cache, plus one step): %.1f s", first_s)
    writer.write_scalars(start + 1, {"perf/time/first_step": first_s})


def _any_process_stopping(local_stop: bool) -> bool:
    """Whether any process got SIGTERM: all processes must save and stop at the same step
    (a preempted TPU pod signals its workers at slightly different times)."""
    if jax.process_count() == 1:
        return local_stop
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(local_stop))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train, evaluate and checkpoint; resume from ``workdir`` if it has checkpoints.

    Returns the final evaluation metrics (``{'<task>/<metric>': value}``). A SIGTERM at any
    time (preemption) makes the run save a checkpoint after the current step and raise
    :class:`~mtl_jax.errors.Preempted` (``mtl-jax train`` exits with code 75). The run holds
    ``<workdir>/LOCK`` until it returns: a second run on the same workdir is refused.
    """
    with _StopFlag() as stop:  # installed first: a SIGTERM during setup is not lost either
        with workdir_lock.WorkdirLock(workdir):
            if config.get("uda", None):  # domain adaptation: its own state, step and data
                from mtl_jax.uda.loop import train_and_evaluate_uda

                return train_and_evaluate_uda(config, workdir, stop)
            return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: _StopFlag) -> dict[str, float]:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # also gs://bucket/run
    # Before anything is restored or written: refuse a resume with another model/tasks/data.
    changes = run_config.check_resume(config, workdir) if checkpointing.saved_steps(workdir) else {}
    train_source, val_source = open_data(config, splits=("train", "val"))
    steps_per_epoch = max(1, len(train_source) // int(config.batch_size))
    exp = build_experiment(config, steps_per_epoch=steps_per_epoch)
    baseline = _baseline(config)
    is_primary = jax.process_index() == 0

    manager = checkpointing.make_manager(workdir,
                                         async_save=config.get("async_checkpoints", True))
    train_it = pipeline.train_iterator(
        train_source, global_batch_size=config.batch_size, mesh=exp.mesh, seed=config.seed,
        augment=exp.augment, prefetch=config.get("prefetch", 2),
        normals_from_depth=dataset_normals_from_depth(config))
    try:
        restored = checkpointing.restore(manager, exp.abstract_state, set_aside=True)
    except BaseException:
        train_it.close()
        manager.close()
        raise
    if is_primary:  # the config and the logs now describe the run that resumes
        start_step = restored[2] if restored is not None else 0
        run_config.record(config, workdir, start_step, changes)
        writers.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
    writer = writers.create_default_writer(workdir, just_logging=not is_primary)
    if restored is not None:
        state, data_state, start = restored
        train_it.set_state(data_state)
        logging.info("Resumed from the checkpoint of step %d in %s.", start, workdir)
        writer.write_resume(start)
    else:
        state, start = exp.init_state(), 0
        writer.write_hparams(config.to_dict())
        if config.get("trivial_baseline", False):
            trivial = trivial_baseline(train_source, val_source, exp.tasks,
                                       normals_from_depth=dataset_normals_from_depth(config))
            writer.write_scalars(0, {f"trivial/{k}": v for k, v in trivial.items()})
            if is_primary:
                (epath.Path(workdir) / "trivial_baseline.json").write_text(
                    json.dumps(trivial, indent=2, sort_keys=True))

    total = int(config.num_train_steps)
    reporter = writers.ProgressReporter(total, writer=writer,
                                        every_steps=config.get("log_every_steps", 50))
    results: dict[str, float] = {}
    pending: tuple[int, dict] | None = None  # metrics are fetched one step late
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
            writer.write_scalars(p_step, scalars)
            acc, acc_n = None, 0

    step = start
    stopping = False
    try:
        while step < total:
            batch = next(train_it)
            t_call = time.perf_counter()
            state, metrics = exp.train_step(state, batch)
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
                    results = evaluate_state(exp, state, val_source, baseline=baseline)
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                    _write_pictures(exp, state, val_source, writer, workdir, step,
                                    config.get("num_vis_examples", 4))
            stopping = _any_process_stopping(stop.set)
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
    finally:  # stop the prefetch thread
        train_it.close()
    if stopping and step < total:  # SIGTERM here or on another process: saved, resume me
        writer.close()
        raise Preempted(step, workdir)
    if results and is_primary and step == total:
        (epath.Path(workdir) / "results.json").write_text(
            json.dumps({"step": step, **results}, indent=2, sort_keys=True))
    writer.flush()
    writer.close()
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
             ) -> dict[str, Any]:
    """Evaluate the checkpoint of ``step`` (default: latest) in ``workdir`` on the val split.

    A workdir without checkpoints evaluates the initial state when the config loads converted
    weights (``config.model.init_from``, e.g. a model trained with the authors' code), as
    step 0."""
    if config.get("uda", None):  # the target's val split (and the source's, "source/...")
        from mtl_jax.uda.loop import evaluate_uda

        return evaluate_uda(config, workdir, step)
    exp = build_experiment(config)
    (val_source,) = open_data(config, splits=("val",))
    manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
    restored = checkpointing.restore(manager, exp.abstract_state, step)
    if restored is None and step is None and config.model.get("init_from", None):
        logging.info("No checkpoint in %s: evaluating the weights of config.model.init_from=%s.",
                     workdir, config.model.init_from)
        restored = (exp.init_state(), None, 0)
    if restored is None:
        raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first "
                        "with: mtl-jax train --config=... --workdir=" + workdir)
    state, _, step = restored
    results = evaluate_state(exp, state, val_source, baseline=_baseline(config))
    manager.close()
    return {"step": step, **results}
