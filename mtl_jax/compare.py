"""``mtl-jax compare``: final metrics of several runs side by side, Δm, eval curves.

``compare(workdirs, baselines)`` reads each run's ``results.json`` (final evaluation),
``metrics.jsonl`` (eval curves) and ``config.json`` (its tasks, for the metric directions)
and returns a Markdown table: one row per run, one column per metric of the runs' tasks
(arrow = better direction), and a ``Δm %`` column when ``baselines`` are given. Baselines
are single-task runs (their workdirs, or ``results.json`` files): one that covers more than
one task (by its ``config.json``, or by the tasks its metrics name) is refused. Their metrics
are merged (``evaluation.load_baseline``), and Δm of each run is computed over the metrics it
shares with them, exactly as the trainer's ``eval/delta_m``; lines under the table say which
baseline covers which task, the metrics each run's Δm is computed over, and the run's tasks
that no baseline covers. ``plot_curves`` draws every eval metric over steps, one panel per
metric and one line per run (matplotlib; ``mtl-jax compare --plot=FILE``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mtl_jax import paths
from mtl_jax.errors import UserError
from mtl_jax.evaluation import delta_m, directions_for, load_baseline


def _is_metric(key: str) -> bool:
    return "/" in key and not key.startswith(("delta_m", "trivial/"))


def run_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def load_results(workdir: str) -> dict[str, float]:
    """Final metrics of a run (``results.json`` without ``step``/``delta_m``), or of a
    ``results.json`` path given directly."""
    path = workdir if workdir.endswith(".json") else paths.join(workdir, "results.json")
    if not paths.exists(workdir):
        raise UserError(f"{workdir} does not exist (give a run's --workdir or its "
                        "results.json)")
    if not paths.exists(path):
        raise UserError(f"{path} not found: {workdir} is not a finished run (results.json "
                        "is written at the last step; for an unfinished one run "
                        "'mtl-jax eval --config=... --workdir=...')")
    try:
        data = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a results.json (a JSON object of metrics)")
    try:
        return {k: float(v) for k, v in data.items() if _is_metric(k)}
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: a metric is not a number: {e}") from e


def config_tasks(workdir: str) -> dict[str, Any] | None:
    """The tasks of a run's ``config.json`` (``{name: Task}``; ``workdir`` may also be a
    ``results.json`` beside it), or ``None`` when it has none."""
    from mtl_jax.experiment import build_tasks

    folder = paths.parent(workdir) if workdir.endswith(".json") else workdir
    path = paths.join(folder, "config.json")
    if not paths.exists(path):
        return None
    return build_tasks(ml_collections.ConfigDict(json.loads(paths.read_text(path))))


def run_tasks(workdir: str, results: Mapping[str, float]) -> list[str]:
    """The tasks a run covers: those of its ``config.json`` if it has one, else the tasks its
    metrics name (``<task>/<metric>``)."""
    tasks = config_tasks(workdir)
    return list(tasks) if tasks is not None else sorted({k.split("/")[0] for k in results})


def _load_baselines(baselines: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Merged baseline metrics and ``{task: baseline}``; refuses multi-task baselines."""
    files = [b if b.endswith(".json") else paths.join(b, "results.json") for b in baselines]
    covers: dict[str, str] = {}
    for b in baselines:
        tasks = run_tasks(b, load_results(b))  # the same clear error for a missing one
        if len(tasks) != 1:
            raise UserError(
                f"baseline {b} covers {len(tasks)} tasks ({', '.join(tasks) or 'none'}): Δm "
                "compares against single-task runs, one per task (train them with "
                "configs/stl.py); pass the multi-task run as a run, not as --baseline")
        covers.setdefault(tasks[0], b)  # two of one task must agree (load_baseline)
    try:
        merged = load_baseline(files)
    except ValueError as e:
        raise UserError(f"baselines: {e}") from e
    return {k: v for k, v in merged.items() if _is_metric(k)}, covers


def load_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """``{'<task>/<metric>': [(step, value), ...]}`` of the ``eval/`` lines of metrics.jsonl."""
    path = paths.join(workdir, "metrics.jsonl")
    curves: dict[str, list[tuple[int, float]]] = {}
    if not paths.exists(path):
        return curves
    for line in paths.read_text(path).splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith("eval/"):
                curves.setdefault(key[len("eval/"):], []).append((int(row["step"]),
                                                                   float(value)))
    return {k: sorted(dict(v).items()) for k, v in curves.items()}


def load_directions(workdir: str) -> dict[str, bool]:
    """``{'<task>/<metric>': higher_is_better}`` of the run's tasks (from config.json)."""
    tasks = config_tasks(workdir)
    return {} if tasks is None else directions_for(tasks)


def _direction(key: str, directions: Mapping[str, bool]) -> bool | None:
    """Direction of ``key``; side outputs ``<task>/side/<k>/<metric>`` share the task's."""
    if key in directions:
        return directions[key]
    parts = key.split("/")
    if len(parts) == 4 and parts[1] == "side":
        return directions.get(f"{parts[0]}/{parts[3]}")
    return None


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def compare(workdirs: Sequence[str], baselines: Sequence[str] = (),
            include_side: bool = False) -> str:
    """The Markdown table described in the module docstring."""
    if not workdirs:
        raise UserError("compare needs at least one run directory")
    runs = {w: load_results(w) for w in workdirs}
    directions: dict[str, bool] = {}
    for w in workdirs:
        directions.update(load_directions(w))
    keys: list[str] = []
    for results in runs.values():
        keys += [k for k in results if k not in keys
                 and (include_side or "/side/" not in k)]
    keys.sort(key=lambda k: (k.split("/")[0], k))
    base, covers = None, {}
    if baselines:
        base, covers = _load_baselines(baselines)
    header = ["run"]
    for k in keys:
        d = _direction(k, directions)
        header.append(k + ("" if d is None else " ↑" if d else " ↓"))
    if base is not None:
        header.append("Δm % ↑")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    names = [run_name(w) for w in workdirs]
    if len(set(names)) < len(names):
        names = list(workdirs)
    notes = []
    for name, w, results in zip(names, workdirs, runs.values()):
        row = [name] + [_fmt(results.get(k)) for k in keys]
        if base is not None:
            dirs = {k: _direction(k, directions) for k in set(results) & set(base)}
            dirs = {k: v for k, v in dirs.items() if v is not None}
            try:
                row.append(f"{delta_m(results, base, dirs, keys=sorted(dirs)):+.2f}")
            except ValueError:
                row.append("–")  # no metric in common with the baselines
            uncovered = [t for t in run_tasks(w, results) if t not in covers]
            notes.append(f"- Δm of {name} over {len(dirs)} metrics: "
                         f"{', '.join(sorted(dirs)) or 'none'}"
                         + (f"; no baseline for {', '.join(uncovered)}" if uncovered else ""))
        lines.append("| " + " | ".join(row) + " |")
    if base is not None:
        lines += ["", "Baselines: " + ", ".join(f"{t}: {run_name(b)}"
                                               for t, b in sorted(covers.items())), *notes]
    return "\n".join(lines) + "\n"


def plot_curves(workdirs: Sequence[str], path: str, include_side: bool = False) -> list[str]:
    """PNG of every eval metric over steps (one panel each, one line per run); returns the
    metrics drawn. Needs matplotlib (``pip install 'mtl_jax[colab]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("the curves PNG needs matplotlib: pip install 'mtl_jax[colab]' (or "
                        "pass --plot='' to skip it)") from e
    curves = {w: load_curves(w) for w in workdirs}
    keys = sorted({k for c in curves.values() for k in c
                   if _is_metric(k) and (include_side or "/side/" not in k)})
    if not keys:
        raise UserError(f"no eval/ lines in the metrics.jsonl of {list(workdirs)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for w, c in curves.items():
            if key in c:
                steps, values = zip(*c[key])
                ax.plot(steps, values, marker="o", markersize=3, label=run_name(w))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys
