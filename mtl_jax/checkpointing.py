"""Orbax checkpoints of the train state plus the data-iterator position of every process.

One checkpoint = ``<workdir>/checkpoints/<step>/`` with two items: ``state`` (the
``TrainState`` pytree, saved asynchronously) and ``data`` (one JSON file per process:
``process_<i>-of-<n>.json``, holding that process's iterator position). Orbax writes into a
temporary directory and renames it when complete, so a run killed at any moment leaves only
complete checkpoints behind; restarting resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


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


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """Checkpoint manager over ``<workdir>/checkpoints`` keeping the latest ``keep``."""
    directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
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


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, dict, int] | None:
    """Restore ``(state, data_state, step)`` at ``step`` (default: latest), or ``None``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (from
    ``jax.eval_shape``); the state is restored directly into those shardings.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; "
                                f"available: {list(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=IteratorStateRestore()))
    return restored["state"], restored["data"], step
