"""Errors a user can cause and fix, and the exit codes of the ``mtl-jax`` command.

The CLI prints a :class:`UserError` as one line ``mtl-jax: error: <message>`` without a
traceback (``--verbose`` or ``MTL_JAX_VERBOSE=1`` shows it) and exits with
:data:`EXIT_ERROR`; see docs/reliability.md for every exit code. :func:`report` is that
contract, shared by the single-process exit (:func:`mtl_jax.main.main`) and the
multi-process one (:func:`mtl_jax.distributed.exit_after_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Iterator

#: Exit codes of ``mtl-jax`` (docs/reliability.md).
EXIT_OK = 0
#: Any error: a :class:`UserError` (one line, no traceback) or a bug (with its traceback).
EXIT_ERROR = 1
#: The command line itself is wrong (unknown command or flag, a missing required flag).
EXIT_USAGE = 2
#: Stopped by SIGTERM (preemption) after saving a checkpoint: run the same command again to
#: resume. 75 is ``EX_TEMPFAIL`` of sysexits.h ("temporary failure, retry"); unlike 143
#: (= 128 + SIGTERM, what a shell reports for a process killed by SIGTERM) it cannot be
#: confused with a process that died without saving.
EXIT_PREEMPTED = 75
#: Interrupted by Ctrl-C (SIGINT), the shell convention 128 + 2.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input from the user (config, flags, data on disk): the message says how to fix it."""


class UsageError(UserError):
    """A mistake on the command line (exit code :data:`EXIT_USAGE`)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset was asked for that has not been prepared in the data dir."""


class WriteError(UserError):
    """Writing one of a run's outputs failed (disk full, quota, a lost mount, a read-only file
    system): ``what`` names the output and its file, ``cause`` the OS error. The training loop
    adds which checkpoints are intact (:meth:`with_intact_checkpoints`)."""

    def __init__(self, what: str, cause: BaseException | str):
        self.what = what
        self.cause = cause if isinstance(cause, str) else os_error_text(cause)
        super().__init__(f"writing {what} failed: {self.cause}")

    def with_intact_checkpoints(self, steps: list[int], directory: str) -> WriteError:
        """The same failure, its message ending with the checkpoints that are intact."""
        error = WriteError(self.what, self.cause)
        error.args = (f"{self}; the checkpoints saved before are intact (steps "
                      f"{steps or 'none'} in {directory}): fix the cause (e.g. free disk space) "
                      "and run the same command again to resume",)
        return error


def os_error_text(e: BaseException) -> str:
    """``No space left on device (ENOSPC)`` for an ``OSError``, else ``Type: message`` (the
    first line)."""
    if isinstance(e, OSError) and e.strerror:
        code = errno.errorcode.get(e.errno, "") if e.errno else ""
        return f"{e.strerror} ({code})" if code else e.strerror
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into a :class:`WriteError` naming ``what`` (e.g.
    ``'the prediction pictures W/predictions.png'``)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UserError):  # already a message for the user
            raise
        raise WriteError(what, e) from e


class Preempted(Exception):  # noqa: N818 (not an error: the run is to be resumed)
    """The run stopped on SIGTERM after saving the checkpoint of ``step`` in ``workdir``.

    ``mtl-jax train`` turns it into exit code :data:`EXIT_PREEMPTED`; running the same
    command again resumes from that checkpoint.
    """

    def __init__(self, step: int, workdir: str):
        self.step, self.workdir = int(step), str(workdir)
        super().__init__(f"preempted (SIGTERM) at step {self.step}; the checkpoint of step "
                         f"{self.step} is saved in {self.workdir}: run the same command again "
                         "to resume")


def verbose() -> bool:
    """Whether tracebacks of user errors are wanted (``MTL_JAX_VERBOSE`` set and not ``0``;
    ``mtl-jax --verbose`` sets it)."""
    return os.environ.get("MTL_JAX_VERBOSE", "") not in ("", "0")


def report(error: BaseException, *, process: str = "") -> int | None:
    """Print the command's message for ``error`` to stderr and return its exit code:
    :class:`Preempted` -> :data:`EXIT_PREEMPTED` (``mtl-jax: preempted ...``), a
    :class:`UserError` -> :data:`EXIT_ERROR` (:data:`EXIT_USAGE` for a :class:`UsageError`;
    one line ``mtl-jax: error: ...``), ``KeyboardInterrupt`` -> :data:`EXIT_INTERRUPTED`.
    Returns ``None`` (printing nothing) for any other error: a bug, shown with its traceback
    by the caller. ``process`` (``'process <i> of <n>'`` in a multi-process run) is appended
    to the line in brackets. With :func:`verbose`, user errors and Ctrl-C show their
    traceback first."""
    where = f" [{process}]" if process else ""
    if isinstance(error, Preempted):
        print(f"mtl-jax: {error}{where}", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(error, UserError):  # one line, whatever the message holds
        message = "error: " + " ".join(str(error).split())
        code = EXIT_USAGE if isinstance(error, UsageError) else EXIT_ERROR
    elif isinstance(error, KeyboardInterrupt):
        message = ("interrupted (Ctrl-C); a train run resumes from its latest checkpoint when "
                   "started again")
        code = EXIT_INTERRUPTED
    else:
        return None
    if verbose():
        traceback.print_exception(error, file=sys.stderr)
    print(f"mtl-jax: {message}{where}", file=sys.stderr)
    return code
