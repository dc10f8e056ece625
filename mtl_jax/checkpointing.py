"""Orbax checkpoints of the train state plus the data-iterator position of every process.

One checkpoint = ``<workdir>/checkpoints/<step>/`` with two items: ``state`` (the
``TrainState`` pytree, saved asynchronously) and ``data`` (one JSON file per process:
``process_<i>-of-<n>.json``, holding that process's iterator position). Orbax writes into a
temporary directory and renames it when complete, so a run killed at any moment leaves only
complete checkpoints behind; restarting resumes from the latest one.

Reliability (docs/reliability.md):

* :func:`restore` without a step falls back from an unreadable latest checkpoint (a deleted or
  truncated array file, an empty iterator-state JSON, a missing metadata file) to the newest
  readable one, with a warning naming each unreadable step; a training run moves those aside
  to ``<workdir>/checkpoints_unreadable/<step>`` (never deleting them) so that the run can save
  that step again. When no checkpoint is readable it raises one :class:`CheckpointError` line.
* :class:`Saver` checks every step whether the last background save has finished and failed
  (e.g. disk full), and raises :class:`CheckpointSaveError` then; old checkpoints are deleted
  (beyond ``keep``) only after a newer one is known to be committed, so a failed save never
  costs a checkpoint already saved.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mtl_jax.errors import UserError, os_error_text

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(UserError):
    """A checkpoint asked for is missing, or none of a workdir's checkpoints is readable."""


class CheckpointSaveError(UserError):
    """A (background) checkpoint save failed; the checkpoints saved before are intact."""


class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves/restores one JSON document per process (the data-iterator position)."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / (
            f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> dict:
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"no data-iterator state for this process in {directory} (was the run "
                f"restarted with a different number of processes?)")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``; a URL workdir (``gs://bucket/run``) stays a URL (orbax and
    tensorstore write to Cloud Storage directly), a local one becomes absolute."""
    if "://" in str(workdir):
        return str(workdir).rstrip("/") + "/checkpoints"
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def saved_steps(workdir: str) -> list[int]:
    """Steps of the (committed) checkpoints in ``<workdir>/checkpoints``, ascending."""
    directory = epath.Path(checkpoint_dir(workdir))
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def make_manager(workdir: str, *, keep: int | None = None, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """Checkpoint manager over ``<workdir>/checkpoints``.

    ``keep``: let orbax keep only the latest ``keep`` checkpoints; ``None`` keeps all (a
    :class:`Saver` then deletes old ones itself, only after a newer one is committed).
    """
    directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if keep is None else ocp.checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None,
         *, force: bool = False) -> bool:
    """Start saving ``state`` (async) and the iterator position at ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    items["data"] = IteratorStateSave(data_state or {})
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _cause(e: BaseException, limit: int = 300) -> str:
    """One line saying what went wrong (the first line of the message, shortened)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _save_cause(e: BaseException) -> str:
    """What made a save fail: the OS error first (``No space left on device (ENOSPC)``, from
    an ``OSError`` in the chain or tensorstore's ``[os_error_code='28']``), then the error."""
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError) and chain.strerror:
            return os_error_text(chain)
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    match = re.search(r"os_error_code='?(\d+)", str(e))
    if match:
        code = int(match.group(1))
        name = errno.errorcode.get(code, str(code))
        return f"{os.strerror(code)} ({name}): {_cause(e, 200)}"
    return _cause(e)


def _check_data_files(step_dir: epath.Path) -> None:
    """Every process's iterator-state JSON of a checkpoint parses (the same verdict on every
    process, so that all fall back to the same step)."""
    files = sorted((step_dir / "data").glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no data-iterator state in {step_dir / 'data'}")
    for f in files:
        text = f.read_text()
        try:
            json.loads(text)
        except ValueError as e:
            raise ValueError(f"{f} is not valid JSON ({len(text)} bytes): {e}") from None


def _restore_step(manager: ocp.CheckpointManager, abstract_state: Any, step: int
                  ) -> tuple[Any, dict]:
    _check_data_files(epath.Path(manager.directory) / str(step))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=IteratorStateRestore()))
    return restored["state"], restored["data"]


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move unreadable step directories to ``<workdir>/checkpoints_unreadable/`` (process 0),
    so that the resumed run can save those steps again; nothing is deleted."""
    directory = epath.Path(manager.directory)
    target_dir = directory.parent / UNREADABLE_DIR
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = target_dir / str(step), 1
            while target.exists():
                target, n = target_dir / f"{step}.{n}", n + 1
            (directory / str(step)).rename(target)
            logging.warning("Moved the unreadable checkpoint of step %d to %s (not deleted).",
                            step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mtl_jax unreadable checkpoints set aside")
    manager.reload()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
            *, set_aside: bool = False) -> tuple[Any, dict, int] | None:
    """Restore ``(state, data_state, step)`` at ``step`` (default: latest readable), or ``None``
    when there is no checkpoint.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (from
    ``jax.eval_shape``); the state is restored directly into those shardings. Without ``step``,
    unreadable checkpoints are skipped with a warning (newest first) and, with ``set_aside``
    (a training run), moved to ``<workdir>/checkpoints_unreadable/`` once a readable one is
    found. Raises :class:`CheckpointError` (one line) for a missing or unreadable ``step`` and
    when no checkpoint is readable.
    """
    directory = manager.directory
    available = sorted(manager.all_steps())
    if step is not None:
        if step not in available:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; available "
                                  f"steps: {available or 'none'}")
        try:
            return (*_restore_step(manager, abstract_state, step), step)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            raise CheckpointError(f"the checkpoint of step {step} in {directory} is "
                                  f"unreadable: {_cause(e)}") from e
    bad: list[tuple[int, str]] = []
    for s in reversed(available):
        try:
            state, data_state = _restore_step(manager, abstract_state, s)
        except Exception as e:  # noqa: BLE001
            bad.append((s, _cause(e)))
            logging.warning("The checkpoint of step %d in %s is unreadable, trying an older one "
                            "(it is not deleted): %s", s, directory, bad[-1][1])
            continue
        if bad:
            logging.warning("Resuming from step %d, the newest readable checkpoint; unreadable: "
                            "%s.", s, ", ".join(str(b) for b, _ in bad))
            if set_aside:
                _set_aside(manager, [b for b, _ in bad])
        return state, data_state, s
    if not bad:
        return None
    raise CheckpointError(
        f"no readable checkpoint in {directory} (" + "; ".join(f"step {s}: {c}" for s, c in bad)
        + "); nothing was deleted: repair them, or move the checkpoints directory away to start "
        "afresh, or use a new --workdir")


class Saver:
    """Starts checkpoint saves and makes a failed background save an error.

    ``check()`` (call it every step; it only reads a flag while a save is running) raises
    :class:`CheckpointSaveError` once the last save has finished without being committed.
    Before each new save and in ``close()``, checkpoints beyond the latest ``keep`` are deleted;
    a step is only counted once committed, so a failed save deletes nothing.
    """

    def __init__(self, manager: ocp.CheckpointManager, keep: int):
        self.manager = manager
        self.keep = max(1, int(keep))
        self._pending: int | None = None

    def _committed(self, step: int) -> bool:  # epath: the directory may be gs://...
        return (epath.Path(self.manager.directory) / str(step)).is_dir()

    def check(self, *, wait: bool = False) -> None:
        """Raise if the last save failed; ``wait`` blocks until it has finished."""
        if self._pending is None or (not wait and self.manager.is_saving_in_progress()):
            return
        step, self._pending = self._pending, None
        cause = None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer's error
            cause = e
        if cause is not None or not self._committed(step):
            raise self._error(step, cause)

    def _error(self, step: int, cause: BaseException | None) -> CheckpointSaveError:
        saved = sorted(s for s in saved_steps(os.path.dirname(os.fspath(self.manager.directory)))
                       if s != step)
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} failed: "
            f"{_save_cause(cause) if cause else 'it was not committed (see the log)'}; "
            f"the checkpoints saved before are intact (steps {saved or 'none'} in "
            f"{self.manager.directory}): fix the cause (e.g. free disk space) and run the same "
            "command again to resume")

    def _delete_old(self) -> None:
        committed = [s for s in sorted(self.manager.all_steps()) if self._committed(s)]
        for s in committed[:-self.keep]:
            self.manager.delete(s)

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        """Wait for the previous save (raising if it failed), delete checkpoints beyond
        ``keep``, then start saving ``step``."""
        self.check(wait=True)
        self._delete_old()
        try:
            save(self.manager, step, state, data_state, force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous part of the save failed
            raise self._error(step, e) from e
        self._pending = step

    def close(self, *, check: bool = True) -> None:
        """Finish the last save (raising if it failed, unless ``check=False``), delete
        checkpoints beyond ``keep`` and close the manager."""
        try:
            if check:
                self.check(wait=True)
                self._delete_old()
        finally:
            try:
                self.manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - already reported, or being reported
                if check:
                    raise
                logging.warning("A checkpoint save failed: %s", _cause(e))
            self.manager.close()
