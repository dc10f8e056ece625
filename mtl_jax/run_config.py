"""Checks of a run's config: against the workdir's saved config, the devices, the dataset.

:func:`check_dataset_classes` runs at start-up (before anything is compiled), so that a class
count below the dataset's is one clear error instead of silently ignored labels (the ranges of
the config's keys and the batch sizes against the devices: :mod:`mtl_jax.config_schema`).

A workdir's ``config.json`` describes the run its checkpoints come from. Before restoring,
:func:`check_resume` compares the new config with it, key by key (nested keys joined by dots):

* a change of a key in :data:`SAFE_KEYS` (how long to train, how often to evaluate, log and
  checkpoint, where the data lives, ...) is allowed: the run resumes and :func:`record` appends
  the change to ``config_changes.jsonl`` and rewrites ``config.json``;
* any other change (model, tasks, input size, dataset, optimiser, weighting, seed, batch
  size, augmentation, a key that appears or disappears) is refused with one line listing the
  differing keys: the checkpoints hold the state of another config.

``config.json`` is only (re)written after the restore succeeded (or a fresh start), so it never
describes a config that did not run.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import ml_collections

from mtl_jax import paths
from mtl_jax.errors import UserError

CONFIG_NAME = "config.json"
CHANGES_NAME = "config_changes.jsonl"

#: Keys a resume may change, with what the change does (docs/reliability.md lists them).
SAFE_KEYS: dict[str, str] = {
    "num_train_steps": "train longer or shorter (the learning-rate schedule is recomputed for "
                       "the new total from the resumed step on)",
    "eval_every_steps": "evaluate more or less often",
    "log_every_steps": "log more or less often",
    "checkpoint_every_steps": "checkpoint more or less often",
    "keep_checkpoints": "keep more or fewer checkpoints",
    "async_checkpoints": "save checkpoints in the background or not",
    "num_vis_examples": "number of examples in prediction pictures",
    "eval_batch_size": "evaluation batch size (metrics are sums: same numbers)",
    "prefetch": "batches prepared ahead",
    "num_devices": "devices of the data-parallel mesh (same global batch)",
    "skip_nonfinite": "skip or stop on a non-finite loss",
    "label_check": "error or warning on out-of-range labels",
    "trivial_baseline": "only read by a fresh run",
    "baseline_results": "single-task results for delta_m",
    "dataset.data_dir": "where the prepared dataset lives (the same data, moved)",
}

_MISSING = "(absent)"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def as_flat_dict(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """``{'a.b.c': value}`` of ``config`` as ``config.json`` stores it (tuples as lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    return _flatten(config)


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` of flat dicts; a missing key is ``'(absent)'``."""
    return {k: (old.get(k, _MISSING), new.get(k, _MISSING))
            for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if value is not _MISSING else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def declared_num_classes(builder: Any) -> int | None:
    """The semseg class count a dataset builder guarantees its labels are below (its
    ``num_classes`` property or ``NUM_CLASSES``, per builder config when a dict), or ``None``."""
    n = getattr(builder, "num_classes", None)
    if n is None:
        n = getattr(type(builder), "NUM_CLASSES", None)
        if isinstance(n, dict):
            config = getattr(builder, "builder_config", None)
            n = n.get(getattr(config, "name", None))
    return int(n) if isinstance(n, int) else None


def check_dataset_classes(dataset: str, builder: Any, tasks: dict[str, Any]) -> None:
    """Every example's semseg labels are below the builder's class count (the builders check
    that at build time), so a task with fewer classes would ignore labels: a user error."""
    declared = declared_num_classes(builder)
    task = tasks.get("semseg")
    if declared is None or task is None or int(task.num_classes) >= declared:
        return
    raise UserError(
        f"dataset {dataset!r} has {declared} semseg classes (labels 0..{declared - 1}) but "
        f"config.tasks.semseg.num_classes={task.num_classes}: the labels >= "
        f"{task.num_classes} would be ignored; set config.tasks.semseg.num_classes={declared}")


def saved_config(workdir: str) -> dict | None:
    """The flat config stored in ``<workdir>/config.json``, or ``None`` when there is none."""
    path = paths.join(workdir, CONFIG_NAME)
    if not paths.exists(path):
        return None
    try:
        return as_flat_dict(json.loads(paths.read_text(path)))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); it describes the run of this workdir's "
                        "checkpoints: restore it or use a new --workdir") from e


def check_resume(config: ml_collections.ConfigDict, workdir: str
                 ) -> dict[str, tuple[Any, Any]]:
    """Compare ``config`` with the one ``workdir`` was trained with; return the safe changes.

    Raises :class:`UserError` (one line, listing the differing keys) when a key outside
    :data:`SAFE_KEYS` differs. Call it only when the workdir has checkpoints to resume from;
    without a saved ``config.json`` there is nothing to compare (an empty dict is returned).
    """
    old = saved_config(workdir)
    if old is None:
        return {}
    diff = differences(old, as_flat_dict(config))
    unsafe = {k: v for k, v in diff.items() if k not in SAFE_KEYS}
    if unsafe:
        listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in unsafe.items())
        raise UserError(
            f"the config differs from the one the checkpoints in {workdir} were trained with "
            f"({paths.join(workdir, CONFIG_NAME)}) in: {listed}; a resume may only change "
            f"{', '.join(SAFE_KEYS)} (docs/reliability.md): use a new --workdir for this "
            "config, or restore those values to resume")
    return diff


def record(config: ml_collections.ConfigDict, workdir: str, step: int,
           changes: dict[str, tuple[Any, Any]]) -> None:
    """Write ``config.json`` (the config running now) and, when a resume changed safe keys,
    append ``{"step", "time", "changes": {key: [old, new]}}`` to ``config_changes.jsonl``."""
    if changes:
        entry = {"step": int(step),
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "changes": {k: [a, b] for k, (a, b) in changes.items()}}
        paths.append_text(paths.join(workdir, CHANGES_NAME), json.dumps(entry) + "\n")
    paths.write_text(paths.join(workdir, CONFIG_NAME), config.to_json_best_effort(indent=2))
