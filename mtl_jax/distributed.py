"""Multi-process (multi-host) start-up and failure handling around ``jax.distributed``.

One process per host (TPU VM worker, GPU node, or several on one machine for tests) calls
:func:`initialize` before touching a device. Process 0 runs the coordination service at
``coordinator_address``; every process sends it heartbeats.

Failure contract (what a user sees when a peer dies):

* Before the run starts: a process that cannot join its peers (process 0 never started, died
  during start-up, or is unreachable) waits at most ``init_timeout_s`` (``--init_timeout``,
  default 300 s, JAX's own) in :func:`initialize`, then exits with code 1 and one line
  ``mtl-jax: process <i> of <n> could not join the run at <coordinator> within <t> s ...``.
  JAX's own start-up deadline is set 30 s later, so its C++ abort and stack trace never
  show.

* A peer that dies without a word (SIGKILL, OOM, lost host) stops sending heartbeats. After
  ``heartbeat_timeout_s`` the coordination service marks it unhealthy and every surviving
  process is terminated by JAX (SIGABRT, non-zero exit) with the message
  ``Terminating process because the JAX distributed service detected fatal errors ...
  The following tasks are unhealthy (stopped sending heartbeats): <process ids>``.
  This is the *coordinator heartbeat* timeout, not a collective timeout: a collective
  waiting for the dead peer is ended by it. If process 0 itself dies, the service goes with
  it and the others fail on their next heartbeat.
* A process that stops with a Python exception leaves without waiting at JAX's shutdown
  barrier, so its peers then fail by the heartbeat rule above instead of hanging in a
  collective. Its exit code and message are those of a single-process run
  (:func:`mtl_jax.errors.report`, docs/reliability.md), with ``[process <i> of <n>]``
  appended: 75 and ``mtl-jax: preempted (SIGTERM) at step N; ...`` after the checkpoint of a
  preemption is saved (every process stops at the same step), 1 and one line
  ``mtl-jax: error: ...`` for a :class:`~mtl_jax.errors.UserError` (2 for a bad command line),
  130 for Ctrl-C; a bug prints its traceback and ``mtl-jax: process <i> of <n> failed: ...``
  and exits with 1.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import NoReturn

import jax
from absl import logging

from mtl_jax.errors import EXIT_ERROR, UserError, report

#: Default seconds without heartbeat after which a process is declared dead (JAX's is 100).
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
#: Default seconds a process waits in start-up for its peers (JAX's own default).
DEFAULT_INIT_TIMEOUT_S = 300
#: JAX's start-up deadline is ours plus this, so that the one-line message comes first.
_JAX_DEADLINE_MARGIN_S = 30


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> None:
    """``jax.distributed.initialize`` with the heartbeat timeout of the failure contract and a
    start-up deadline (module docstring).

    On Cloud TPU (and under SLURM / Open MPI) all three of ``coordinator_address``,
    ``num_processes``, ``process_id`` may be ``None``: JAX finds them from the environment.
    Elsewhere give all three (``host:port`` of process 0, reachable from every process).
    """
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise UserError("multi-process runs outside Cloud TPU/SLURM need all of "
                        "--coordinator_address=HOST:PORT, --num_processes=N and "
                        "--process_id=I (0 on the host of the coordinator)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in [0, {num_processes})")
    for name, value in (("--heartbeat_timeout", heartbeat_timeout_s),
                        ("--init_timeout", init_timeout_s)):
        if int(value) < 1:
            raise UserError(f"{name}={value}: give a number of seconds >= 1")
    who = (f"process {process_id} of {num_processes}" if num_processes is not None
           else "this process")
    where = coordinator_address or "the coordinator JAX found in the environment"
    watchdog = threading.Timer(int(init_timeout_s), _give_up_joining,
                               (who, where, int(init_timeout_s)))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(init_timeout_s) + _JAX_DEADLINE_MARGIN_S,
            heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    finally:
        watchdog.cancel()
    logging.info("Process %d of %d (coordinator %s): %d local of %d global devices; a peer "
                 "silent for %d s is declared dead and every process stops.",
                 jax.process_index(), jax.process_count(), coordinator_address or "auto",
                 jax.local_device_count(), jax.device_count(), int(heartbeat_timeout_s))


def _give_up_joining(who: str, where: str, timeout_s: int) -> NoReturn:
    """The start-up deadline passed inside ``jax.distributed.initialize``: leave with one line
    (a watchdog thread; JAX's own deadline would abort with a stack trace 30 s later)."""
    print(f"mtl-jax: error: {who} could not join the run at {where} within {timeout_s} s "
          "(--init_timeout): is process 0 running, with the same --coordinator_address and "
          "--num_processes, and reachable from this host?", file=sys.stderr)
    sys.stderr.flush()
    logging.flush()
    os._exit(EXIT_ERROR)


def process_tag() -> str:
    """``'process <i> of <n>'`` (for messages)."""
    return f"process {jax.process_index()} of {jax.process_count()}"


def exit_after_failure(error: BaseException) -> NoReturn:
    """Report ``error`` naming this process and leave now with the exit code of a
    single-process run (module docstring; no shutdown barrier: a peer may be stuck in a
    collective that this process will never join)."""
    code = report(error, process=process_tag())
    if code is None:  # a bug
        traceback.print_exception(error, file=sys.stderr)
        print(f"mtl-jax: {process_tag()} failed: {type(error).__name__}: {error}",
              file=sys.stderr)
        code = EXIT_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    logging.flush()
    os._exit(code)
