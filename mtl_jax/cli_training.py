"""``mtl-jax train | eval | params``: absl flags with an ml_collections config file.

Flags: ``--config=configs/x.py[:args]`` (locked: a mistyped override key is an error),
overrides ``--config.a.b=value``, ``--workdir=DIR``, ``--data_dir=DIR`` (where prepared
datasets live; default ``$TFDS_DATA_DIR`` or the TFDS default), ``--compilation_cache=DIR|off``
(JAX's persistent compilation cache, on by default: :mod:`mtl_jax.compile_cache`) and, for
``eval``, ``--step=N`` (default: latest checkpoint).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mtl_jax.errors import UsageError, UserError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    if "config" in FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/x.py:args)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and pictures")
    flags.DEFINE_string("data_dir", None, "data dir of prepared datasets")
    flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest)")
    flags.DEFINE_bool("distributed", False,
                      "call jax.distributed.initialize() (multi-host; on Cloud TPU pods it "
                      "finds its peers by itself)")
    flags.DEFINE_string("coordinator_address", None,
                        "multi-process runs: host:port of process 0 (implies --distributed)")
    flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index")
    flags.DEFINE_string("compilation_cache", None,
                        "directory of JAX's persistent compilation cache (default: "
                        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/mtl_jax/"
                        "jax_compilation_cache); 'off' switches it off. A restarted or "
                        "resumed run then reads its compiled steps back instead of compiling")
    flags.DEFINE_integer("heartbeat_timeout", 60,
                         "multi-process runs: seconds without heartbeat after which a process "
                         "is declared dead and all others stop (docs/tpu.md)")
    flags.DEFINE_integer("init_timeout", 300,
                         "multi-process runs: seconds a process waits at start-up for all "
                         "processes to join before it exits with an error (docs/tpu.md)")


class _QuietLibraries(pylogging.Filter):
    """Drop INFO chatter of orbax and JAX's backend probing (warnings still pass)."""

    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return not any(part in record.pathname for part in self._NOISY)


def _apply_data_dir(config) -> None:
    if FLAGS.data_dir:
        os.environ["TFDS_DATA_DIR"] = FLAGS.data_dir


def _main(command: str) -> int:
    config = FLAGS.config
    if config is None:
        raise UsageError("--config is required, e.g. --config=configs/quickstart.py")
    _apply_data_dir(config)
    from mtl_jax import compile_cache

    compile_cache.enable(FLAGS.compilation_cache)
    if FLAGS.distributed or FLAGS.coordinator_address:
        from mtl_jax import distributed

        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, heartbeat_timeout_s=FLAGS.heartbeat_timeout,
                               init_timeout_s=FLAGS.init_timeout)
        try:
            return _run_command(command, config)
        except BaseException as e:  # noqa: BLE001 -- every failure must leave at once
            distributed.exit_after_failure(e)
    return _run_command(command, config)


def _run_command(command: str, config) -> int:
    if command == "params":
        from mtl_jax.models import format_param_table
        from mtl_jax.params_report import param_counts

        print(format_param_table(param_counts(config)))
        return 0
    if not FLAGS.workdir:
        raise UsageError(f"--workdir is required for 'mtl-jax {command}'")
    if command == "train":
        from mtl_jax.train import train_and_evaluate

        results = train_and_evaluate(config, FLAGS.workdir)
    else:
        from mtl_jax.train import evaluate

        results = evaluate(config, FLAGS.workdir, FLAGS.step)
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


def run(command: str, argv: list[str]) -> int:
    """Parse ``argv`` (flags after the subcommand) and run ``command``."""
    _define_flags()
    try:
        FLAGS(["mtl-jax " + command, *argv])
    except UsageError:
        raise
    except UserError as e:  # e.g. a wrong argument after the config file's colon
        raise UsageError(str(e)) from e
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections reports a mistyped --config.key as KeyError ("did you mean ...").
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"{msg} (see: mtl-jax {command} --helpfull)") from e
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(_QuietLibraries())
    return _main(command)


if __name__ == "__main__":
    sys.exit(app.run(lambda argv: run(argv[1], argv[2:])))
