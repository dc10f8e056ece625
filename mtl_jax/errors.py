"""Errors a user can cause and fix, and the exit codes of the ``mtl-jax`` command.

The CLI prints a :class:`UserError` as one line ``mtl-jax: error: <message>`` without a
traceback (``--verbose`` or ``MTL_JAX_VERBOSE=1`` shows it) and exits with
:data:`EXIT_ERROR`; see docs/reliability.md for every exit code.
"""

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
