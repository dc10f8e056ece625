"""Tracebacks of background threads go to a log file, not the terminal.

A failed write (disk full) makes the library's background threads fail too: Orbax's save
threads log their exceptions with tracebacks, TensorBoard's event-writer thread dies (Python
prints ``Exception in thread ...``), and coroutines of an unfinished save are destroyed at
exit (``Exception ignored in ...``). The run itself stops with one line
(docs/reliability.md); :func:`background_tracebacks_to_file` keeps those hundreds of lines
off the terminal: they are appended to ``<temp dir>/mtl-jax-<pid>.log`` (the system's
temporary directory: the workdir's disk may be the full one), and the first of them leaves one
log line on the terminal, ending with ``[traceback in <file>] (further errors with tracebacks
go there too)``. ``mtl-jax --verbose`` shows them all on the terminal as before.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator

from absl import logging

from mtl_jax.errors import os_error_text


class TracebackFile:
    """Appends texts to ``path`` (created on the first one); never raises."""

    def __init__(self, path: str | None = None):
        self.path = path or os.path.join(tempfile.gettempdir(), f"mtl-jax-{os.getpid()}.log")
        self._file = None
        self._lock = threading.Lock()

    def write(self, text: str) -> bool:
        """Whether ``text`` was written (a full or read-only disk: it is dropped)."""
        try:
            with self._lock:
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._file.write(text if text.endswith("\n") else text + "\n")
                self._file.flush()
            return True
        except BaseException:  # noqa: BLE001 - at interpreter exit even imports fail
            return False

    def where(self, written: bool) -> str:
        return (f" [traceback in {self.path}]" if written
                else " [traceback not shown: run with --verbose to see it]")


class _TracebacksToFile(pylogging.Filter):
    """Log records with a traceback (``exc_info``/``stack_info``) go to the file; the first
    one leaves its first line on the terminal, saying where they are (a failed save makes
    hundreds: one per array being written)."""

    def __init__(self, file: TracebackFile):
        super().__init__()
        self.file = file
        self.count = 0
        self._formatter = pylogging.Formatter(
            "%(levelname)s %(asctime)s %(threadName)s %(pathname)s:%(lineno)d] %(message)s")

    def filter(self, record: pylogging.LogRecord) -> bool:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return True
        written = self.file.write(self._formatter.format(record))
        self.count += 1
        if self.count > 1:
            return False
        lines = record.getMessage().splitlines()
        record.msg = ((lines[0] if lines else "") + self.file.where(written)
                      + " (further errors with tracebacks go there too)")
        record.args = None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


@contextlib.contextmanager
def background_tracebacks_to_file(*, keep: bool = False,
                                  file: TracebackFile | None = None
                                  ) -> Iterator[TracebackFile | None]:
    """Within the block, logged tracebacks (through absl's handler), exceptions that end a
    thread and unraisable exceptions go to ``file`` (default :class:`TracebackFile`); a thread's
    exception leaves one ERROR log line. Nothing changes with ``MTL_JAX_VERBOSE``
    (``--verbose``). ``keep``: leave it so afterwards (in a command's own process: threads and
    coroutines of a failed save may end after the command has returned, or at exit)."""
    from mtl_jax.errors import verbose

    if verbose():
        yield None
        return
    file = file or TracebackFile()
    log_filter = _TracebacksToFile(file)
    handler = logging.get_absl_handler()

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        cause = (os_error_text(args.exc_value) if args.exc_value is not None
                 else args.exc_type.__name__)
        logging.error("The background thread %s failed: %s", name, cause,
                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable_hook(unraisable) -> None:
        try:
            text = "".join(traceback.format_exception(
                unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
        except BaseException:  # noqa: BLE001 - at interpreter exit
            text = f"{unraisable.exc_type}: {unraisable.exc_value}"
        try:
            message = unraisable.err_msg or "Exception ignored in"
            file.write(f"{message}: {unraisable.object!r}\n{text}")
        except BaseException:  # noqa: BLE001 - never let the hook itself fail
            pass

    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc_value, exc_traceback) -> None:
        """An exception printed by a native library's callback thread (tensorstore's, when
        Orbax's event loop is gone); the main thread's (a bug) is shown as before."""
        if threading.current_thread() is threading.main_thread():
            previous_excepthook(exc_type, exc_value, exc_traceback)
            return
        try:
            text = "".join(traceback.format_exception(exc_type, exc_value, exc_traceback))
        except BaseException:  # noqa: BLE001 - at interpreter exit
            text = f"{exc_type}: {exc_value}"
        file.write(f"Exception in a background thread:\n{text}")

    previous_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file_=None, line=None) -> None:
        """``coroutine ... was never awaited``: the writes of a failed save, at exit."""
        if issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
            file.write(f"{filename}:{lineno}: {category.__name__}: {message}")
            return
        previous_showwarning(message, category, filename, lineno, file_, line)

    hooks = {(sys, "excepthook"): excepthook, (sys, "unraisablehook"): unraisable_hook,
             (threading, "excepthook"): thread_hook, (warnings, "showwarning"): showwarning}
    previous = {where: getattr(*where) for where in hooks}
    handler.addFilter(log_filter)
    for (module, name), hook in hooks.items():
        setattr(module, name, hook)
    try:
        yield file
    finally:
        if not keep:
            handler.removeFilter(log_filter)
            for (module, name), hook in hooks.items():
                if getattr(module, name) is hook:
                    setattr(module, name, previous[module, name])
