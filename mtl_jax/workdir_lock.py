"""One training run per workdir: a lock file holding the owner's pid and host.

``mtl-jax train`` holds ``<workdir>/LOCK`` for its whole life (process 0 only in a multi-host
run; every process learns whether process 0 got it). The file is created with ``O_EXCL`` (so
two runs started together cannot both get it) and holds JSON::

    {"pid": 1234, "host": "...", "boot_id": "...", "start_ticks": 5678, "token": "...",
     "started": "2026-01-01T12:00:00+00:00", "argv": [...]}

A second run finds the file and refuses with a message naming the owner, unless the lock is
*stale*: its host is this host and its process is gone (no such pid, or the pid now belongs
to a later process -- ``start_ticks`` differs -- or the machine rebooted since -- ``boot_id``
differs). A stale lock is taken over (a warning says so). A lock held on another host cannot be
checked from here: the message says to delete the file if that run is gone. The lock is
released (the file removed, if it is still ours) when the run ends, also on errors and on
SIGTERM; after a ``kill -9`` the next run finds it stale. ``mtl-jax eval`` takes no lock: it may
read a workdir in use.

A workdir on an object store (``gs://bucket/run``) holds the same ``LOCK`` object, created
through :func:`mtl_jax.paths.create_exclusive` (on Cloud Storage an upload with the generation
precondition ``ifGenerationMatch=0``: atomic, and the object holds the JSON from the start). An
object cannot be renamed atomically, so a stale lock there is taken over by reading it again
and deleting it only if it still holds the judged owner's token; between that read and the
delete (milliseconds) a third run could replace it, which only matters when two runs take over
the same stale lock at the same moment.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import uuid

import jax
from absl import logging

from mtl_jax import paths
from mtl_jax.errors import UserError

LOCK_NAME = "LOCK"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), else ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start_ticks": _start_ticks(os.getpid()), "token": uuid.uuid4().hex,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "argv": list(sys.argv)}


def _read(path: str) -> dict | None:
    """The lock's JSON, or ``None`` when it is empty or not (yet) valid JSON."""
    try:
        info = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def stale_reason(info: dict) -> str | None:
    """Why the lock ``info`` is stale (its process is gone), or ``None`` if it may be alive.

    Only a lock of this host can be checked; one of another host is taken as alive."""
    if info.get("host") != socket.gethostname():
        return None
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return "the machine rebooted since"
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} no longer exists"
    except PermissionError:
        pass  # it exists (another user's)
    ticks = _start_ticks(pid)
    if info.get("start_ticks") is not None and ticks is not None and ticks != info["start_ticks"]:
        return f"pid {pid} now belongs to another process"
    return None


def describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')!r} (started "
            f"{info.get('started', '?')})")


class WorkdirLock:
    """Context manager holding ``<workdir>/LOCK`` (see the module docstring).

    ``enabled=False`` (processes other than 0) holds nothing but still learns, in a
    multi-process run, whether process 0 got the lock, and raises :class:`UserError` if not.
    Entering it creates ``workdir``; an unwritable workdir is a :class:`UserError`.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.path = paths.join(self.workdir, LOCK_NAME)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.info: dict | None = None

    def __enter__(self) -> WorkdirLock:
        error = None
        if self.enabled:
            try:
                self.acquire()
            except UserError as e:
                error = e
        if jax.process_count() > 1:  # every process stops if process 0 did not get the lock
            import numpy as np
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = UserError(f"process 0 could not lock the workdir {self.workdir} (see "
                                  "its log)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            paths.makedirs(self.workdir)
        except OSError as e:
            raise UserError(f"cannot create the workdir {self.workdir}: {e.strerror or e}; "
                            "choose a writable --workdir") from e
        info = _owner_info()
        for _ in range(50):
            try:
                paths.create_exclusive(self.path, json.dumps(info).encode("utf-8"))
            except FileExistsError:
                if self._take_over_stale():
                    continue
                time.sleep(0.1)  # the other run is still writing its lock file
                continue
            except OSError as e:
                raise UserError(f"the workdir {self.workdir} is not writable ({e.strerror or e}"
                                "); choose a writable --workdir") from e
            self.info = info
            return
        raise UserError(f"could not lock the workdir {self.workdir}: {self.path} keeps changing "
                        "or holds no valid lock; if no run uses this workdir, delete it")

    def _take_over_stale(self) -> bool:
        """Remove the lock if it is stale; raise if it is held. True when the caller should
        retry at once, False when it should wait a moment (a lock file being written)."""
        held = _read(self.path)
        if held is None:
            try:
                age = time.time() - paths.mtime(self.path)
            except OSError:
                return True  # gone meanwhile
            if age < 5.0:
                return False
            reason = "its lock file is empty or unreadable"
        else:
            reason = stale_reason(held)
            if reason is None:
                where = ("" if held.get("host") == socket.gethostname() else
                         f"; if that run is gone, delete {self.path}")
                raise UserError(f"the workdir {self.workdir} is in use by another training run, "
                                f"{describe(held)}{where}; wait for it to end, stop it, or use "
                                "another --workdir (mtl-jax eval may read it meanwhile)")
        if paths.is_url(self.path):
            self._remove_stale_object(held, reason)
            return True
        # Move the stale file aside atomically, then check that what we moved is what we
        # judged (another run may have replaced it in between); if not, put it back.
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        current = self.path  # where the stale file is: named if it cannot be removed
        try:
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return True
            current = aside
            moved = _read(aside)
            if held is not None and (moved or {}).get("token") != held.get("token"):
                try:
                    os.link(aside, self.path)  # fails if yet another lock appeared: keep it
                except OSError:
                    pass
                os.remove(aside)
                return True
            os.remove(aside)
        except OSError as e:  # e.g. a read-only workdir: no run can take this lock over
            raise self._cannot_remove(held, reason, current, e) from e
        self._took_over(held, reason)
        return True

    def _cannot_remove(self, held: dict | None, reason: str, where: str,
                       error: OSError) -> UserError:
        return UserError(f"the workdir {self.workdir} holds a stale lock of "
                         f"{describe(held) if held else 'an unknown run'} ({reason}) that "
                         f"cannot be removed ({error.strerror or error}): delete {where} "
                         "yourself if no run uses this workdir, or choose a writable --workdir")

    def _took_over(self, held: dict | None, reason: str) -> None:
        logging.warning("Took over the stale lock of %s in %s: %s.",
                        describe(held) if held else "an unknown run", self.workdir, reason)

    def _remove_stale_object(self, held: dict | None, reason: str) -> None:
        """The object-store takeover: no atomic rename there, so read the lock again and delete
        it only if it is still the one judged stale (module docstring)."""
        if _read(self.path) != held:
            return  # replaced (or removed) meanwhile: judge the new one
        try:
            paths.remove(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._cannot_remove(held, reason, self.path, e) from e
        self._took_over(held, reason)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.info is None:
            return
        held = _read(self.path)
        if held is not None and held.get("token") == self.info["token"]:
            try:
                paths.remove(self.path)
            except OSError as e:
                logging.warning("Could not remove the lock %s: %s", self.path, e)
        self.info = None


def holder(workdir: str) -> dict | None:
    """The live owner of ``workdir``'s lock, or ``None`` (no lock, or a stale one)."""
    info = _read(paths.join(workdir, LOCK_NAME))
    return info if info is not None and stale_reason(info) is None else None
