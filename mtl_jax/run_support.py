"""What the training loop needs from a kind of run, and the checks it makes on every run.

:class:`Run` is the one interface between the loop (:func:`mtl_jax.train.run_loop`) and a
kind of run: the supervised run (:func:`mtl_jax.train.supervised_run`) and domain adaptation
(:func:`mtl_jax.uda.run.uda_run`) implement it; the next kind (say self-supervised depth from
video: frames ``t-1, t, t+1`` with their intrinsics, a pose network beside the depth model,
with its own optimiser and learning rate) is one more implementation, not another loop: its
state holds both networks (:attr:`Run.abstract_state`), its step updates both
(:attr:`Run.train_step`), its iterator yields frame triplets (:attr:`Run.train_data`), and
:attr:`Run.learning_rates` reports the pose network's rate beside the model's.

The helpers below are the loop's checks, shared by every kind of run and by the evaluation
of a checkpoint: non-finite losses (:func:`check_nonfinite`), out-of-range labels
(:func:`label_counts`, :func:`check_label_counts`), SIGTERM (:class:`StopFlag`,
:func:`any_process_stopping`), one split's metrics (:func:`evaluate_split`) and prediction
pictures (:func:`write_pictures`). This module sits below :mod:`mtl_jax.train` and
:mod:`mtl_jax.uda`; it imports neither.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from mtl_jax.data import pipeline
from mtl_jax.errors import UserError, writing
from mtl_jax.evaluation.metrics import compute_metrics, merge_metrics
from mtl_jax.evaluation.pictures import prediction_grid
from mtl_jax.experiment import Experiment

PyTree = Any


class TrainData(Protocol):
    """A resumable iterator of train batches (:class:`mtl_jax.data.pipeline.ShardedIterator`,
    :class:`NamedIterators`): its position is saved with every checkpoint."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Run:
    """One kind of training run, as the loop sees it.

    The loop owns everything else: the workdir, its lock and the config check on resume,
    checkpoints (the whole state and the data position), ``metrics.jsonl`` and TensorBoard,
    the non-finite and label checks of every step, periodic evaluation, pictures, SIGTERM.
    A run built for evaluation only (``training=False``) has no ``train_data``.
    """

    #: ``'supervised'``, ``'uda'``, ...: which implementation built it (logs, tests).
    kind: str
    config: ml_collections.ConfigDict
    #: ``{name: Task}``: the tasks the step's ``nonfinite/<task>`` flags name.
    tasks: Mapping[str, Any]
    #: Shapes, dtypes and shardings of the whole state, which every checkpoint holds.
    abstract_state: PyTree
    init_state: Callable[[], PyTree]
    #: ``(state, batch) -> (state, metrics)``, compiled; ``batch`` is what ``train_data``
    #: yields. The metrics hold ``nonfinite`` (and ``nonfinite/<task>``) and
    #: ``bad_labels/<task>`` for the loop's checks; every other key is logged as
    #: ``train/<key>`` (averaged over the steps since the last log).
    train_step: Callable[[PyTree, Any], tuple[PyTree, dict]]
    #: Opens the training data (named iterators: :class:`NamedIterators`).
    train_data: Callable[[], TrainData] | None
    #: ``state -> {metric: value}`` over the validation data (``eval/<metric>`` in the logs,
    #: the top level of ``results.json``).
    evaluate: Callable[[PyTree], dict[str, float]]
    #: ``(state, writer, workdir, step, num)``: the prediction pictures of ``num`` examples.
    write_pictures: Callable[[PyTree, Any, str, int, int], None]
    #: ``step -> {part: learning rate}``, logged as ``train/lr/<part>``.
    learning_rates: Callable[[int], dict[str, float]]
    #: ``(writer, workdir)``, called once when a run starts without a checkpoint.
    on_fresh_start: Callable[[Any, str], None] | None = None


class NamedIterators:
    """Several resumable iterators read side by side: yields ``{name: batch}``, its state is
    ``{name: state}`` (e.g. a UDA run's ``source`` and ``target``)."""

    def __init__(self, iterators: Mapping[str, TrainData]):
        self.iterators = dict(iterators)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return {name: next(it) for name, it in self.iterators.items()}

    def get_state(self) -> dict[str, Any]:
        return {name: it.get_state() for name, it in self.iterators.items()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for name, it in self.iterators.items():
            it.set_state(state[name])

    def close(self) -> None:
        for it in self.iterators.values():
            it.close()


class NonFiniteLossError(UserError, FloatingPointError):
    """A task loss became NaN/inf; the update of that step was not applied."""


class StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def any_process_stopping(local_stop: bool) -> bool:
    """Whether any process got SIGTERM: all processes must save and stop at the same step
    (a preempted TPU pod signals its workers at slightly different times)."""
    if jax.process_count() == 1:
        return local_stop
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(local_stop))))


def check_nonfinite(step: int, metrics: dict, tasks, skip: bool) -> None:
    """Raise :class:`NonFiniteLossError` (or warn, ``skip``) when the step's ``nonfinite``
    flag is set, naming the tasks whose ``nonfinite/<task>`` flag is."""
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


def check_label_counts(where: str, counts: dict[str, int], mode: str) -> None:
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


def evaluate_split(exp: Experiment, state: PyTree, source, normals_from_depth: bool, *,
                   where: str = "the validation split") -> dict[str, float]:
    """Every metric of every task over ``source`` (each example exactly once).

    Labels outside a task's range, counted over the whole split, stop the evaluation with
    ``<where> has K <task> label pixel(s) outside the task's range ...`` or log it as a
    warning (``config.label_check='warn'``); the counts are not returned as metrics."""
    acc = None
    model_state = state.model_state()
    for batch in pipeline.eval_batches(source, global_batch_size=exp.eval_batch_size,
                                       mesh=exp.mesh, normals_from_depth=normals_from_depth):
        acc = merge_metrics(acc, exp.eval_step(model_state, batch))
    results = compute_metrics(acc)
    check_label_counts(where, label_counts(results, pop=True),
                       exp.config.get("label_check", "error"))
    return results


def baseline_metrics(config: ml_collections.ConfigDict) -> dict[str, float] | None:
    """The Δm baseline of ``config.baseline_results``: ``results.json`` files of single-task
    runs (a list, or comma-separated), or the metrics themselves (``{'<task>/<metric>':
    value}``, e.g. the reference's ``baselines`` of DenseMTL's SDE config); None when empty."""
    files = config.get("baseline_results", "") or ()
    if hasattr(files, "items"):
        values = dict(files.items())
        bad = {k: v for k, v in values.items()
               if "/" not in k or isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise UserError(f"config.baseline_results {bad}: give numbers keyed "
                            "'<task>/<metric>' (e.g. {'semseg/miou': 0.78}) or results.json "
                            "files of single-task runs")
        return {k: float(v) for k, v in values.items()} or None
    if isinstance(files, str):  # comma-separated, as given on the command line
        files = [p.strip() for p in files.split(",") if p.strip()]
    files = list(files)
    if not files:
        return None
    from mtl_jax import paths
    from mtl_jax.evaluation import load_baseline

    missing = [p for p in files if not paths.exists(p)]
    if missing:
        raise UserError(f"baseline_results files not found: {missing}. They are the "
                        "results.json of single-task runs (configs/stl.py).")
    return load_baseline(files)


def add_delta_m(results: dict[str, float], tasks, baseline: dict | None) -> dict[str, float]:
    """``results`` with ``delta_m`` (:func:`mtl_jax.evaluation.delta_m`) against ``baseline``
    over the tasks' main metrics that both have, when a baseline is given."""
    if baseline:
        from mtl_jax.evaluation import delta_m
        from mtl_jax.evaluation.metrics import directions_for

        # Main metrics only: side outputs and compat modes have no direction, never enter Δm.
        directions = directions_for(tasks)
        keys = [k for k in directions if k in results and k in baseline]
        results["delta_m"] = delta_m(results, baseline, directions, keys or None)
    return results


def trivial_baseline_writer(config: ml_collections.ConfigDict, train_source, val_source,
                            tasks, normals_from_depth: bool):
    """A run's ``on_fresh_start`` when ``config.trivial_baseline`` is set: the trivial
    predictors' val metrics (:mod:`mtl_jax.evaluation.trivial`), logged as ``trivial/...`` at
    step 0 and written to ``trivial_baseline.json``; ``None`` otherwise (or without training
    data)."""
    if not config.get("trivial_baseline", False) or train_source is None:
        return None

    def on_fresh_start(writer, workdir: str) -> None:
        from mtl_jax import paths
        from mtl_jax.evaluation.trivial import trivial_baseline

        trivial = trivial_baseline(train_source, val_source, tasks,
                                   normals_from_depth=normals_from_depth)
        writer.write_scalars(0, {f"trivial/{k}": v for k, v in trivial.items()})
        if jax.process_index() == 0:
            path = paths.join(workdir, "trivial_baseline.json")
            with writing(f"the trivial baseline {path}"):
                paths.write_text(path, json.dumps(trivial, indent=2, sort_keys=True))

    return on_fresh_start


def write_pictures(exp: Experiment, state: PyTree, source, normals_from_depth: bool, writer,
                   workdir: str, step: int, num: int) -> None:
    """Predictions next to the labels of the first ``num`` examples of ``source``: logged as
    the ``predictions`` image and written to ``predictions.png`` (the latest) and
    ``predictions_step<step>.png`` in ``workdir``."""
    if num <= 0:
        return
    batch = next(pipeline.eval_batches(
        source, global_batch_size=exp.eval_batch_size, mesh=exp.mesh,
        normals_from_depth=normals_from_depth))
    preds = exp.predict_step(state.model_state(), batch["image"])
    if jax.process_count() > 1:  # the batch is split over processes: gather it (collective)
        from jax.experimental import multihost_utils

        batch = multihost_utils.process_allgather(batch, tiled=True)
    host_batch = {k: np.asarray(jax.device_get(v))[:num] for k, v in batch.items()}
    host_preds = {k: np.asarray(jax.device_get(v))[:num] for k, v in preds.items()}
    picture = prediction_grid(host_batch, host_preds, max_examples=num, tasks=exp.tasks)
    writer.write_images(step, {"predictions": picture[None]})
    if jax.process_index() == 0:
        from mtl_jax import paths
        from mtl_jax.data.visualize import save_png

        for name in (f"predictions_step{step:07d}.png", "predictions.png"):
            path = paths.join(workdir, name)
            with writing(f"the prediction pictures {path}"):
                save_png(path, picture)
