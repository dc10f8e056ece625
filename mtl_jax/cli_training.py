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


def _config_argument(argv: list[str]) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return values[-1] if values else ""


def _last_line(text: str) -> str:
    """The exception line of a traceback that ml_collections pastes into its messages."""
    if "Traceback (most recent call last)" in text:
        lines = [x for x in text.splitlines() if x.strip()]
        return lines[-1].strip() if lines else text
    return text


def _config_load_error(e: Exception, argv: list[str]) -> UsageError:
    """One line for a config file that is missing or raises while it loads (ml_collections
    loads it while parsing the flags)."""
    arg = _config_argument(argv)
    path = arg.split(":", 1)[0]
    if not path or not os.path.isfile(path):
        what = "is not a file" if path and os.path.exists(path) else "does not exist"
        return UsageError(f"--config={arg}: the config file {path!r} {what}; give a config "
                          "file, e.g. --config=configs/quickstart.py")
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, SyntaxError):
        cause = cause.__cause__
    if isinstance(cause, SyntaxError) and cause.filename:
        text = f"{cause.filename}, line {cause.lineno}: {cause.msg}"
    else:
        text = _last_line(str(e))
        if text == str(e):
            text = f"{type(cause).__name__}: {text}"
    return UsageError(f"--config={arg} cannot be loaded: {text}")


def _main(command: str) -> int:
    from mtl_jax import config_schema

    config = FLAGS.config
    if config is None:
        raise UsageError("--config is required, e.g. --config=configs/quickstart.py")
    config_schema.check(config)  # before anything is written or initialised
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

        try:
            counts = param_counts(config)
        except ValueError as e:  # models.build's contract: ValueError for a bad config.model
            raise UserError(f"config.model: {e}") from e
        print(format_param_table(counts))
        return 0
    if not FLAGS.workdir:
        raise UsageError(f"--workdir is required for 'mtl-jax {command}'")
    from mtl_jax import config_schema
    from mtl_jax.experiment import mesh_devices

    config_schema.check(config, devices=mesh_devices(config))  # before the workdir is made
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
    full_argv = ["mtl-jax " + command, *argv]
    # ml_collections reads the --config.key overrides from sys.argv: point it at this argv
    # (main() may be called in-process), and forget the flags of an earlier call.
    saved_argv, sys.argv = sys.argv, full_argv
    try:
        for name in [n for n in FLAGS if n.startswith("config.")]:
            delattr(FLAGS, name)  # override flags of an earlier call, bound to its config
        FLAGS.unparse_flags()
        FLAGS(full_argv)
        if FLAGS.config is not None:  # a config file that failed to load raises on access
            FLAGS.config.get  # noqa: B018
    except UsageError:
        raise
    except UserError as e:  # e.g. a wrong argument after the config file's colon
        raise UsageError(str(e)) from e
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections reports a mistyped --config.key as KeyError ("did you mean ...").
        key_error = e if isinstance(e, KeyError) else e.__context__
        key = str(key_error.args[0]).split()[0].strip("'\"") if (
            isinstance(key_error, KeyError) and key_error.args) else None
        overridden = [a for a in argv if a.startswith("--config.")]
        if key and any(f".{key}" in a.split("=", 1)[0] for a in overridden):
            msg = f"unknown config key {key_error.args[0]}"  # also raised as AttributeError
        elif isinstance(e, (KeyError, AttributeError)):  # raised by get_config itself
            raise _config_load_error(e, argv) from e
        elif "Error whilst parsing config file" in str(e):  # get_config raised
            raise _config_load_error(e, argv) from e
        else:
            msg = str(e)
        raise UsageError(f"{msg} (see: mtl-jax {command} --helpfull)") from e
    except Exception as e:  # noqa: BLE001 -- the config file itself: missing or raising
        raise _config_load_error(e, argv) from e
    finally:
        sys.argv = saved_argv
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(_QuietLibraries())
    return _main(command)


if __name__ == "__main__":
    sys.exit(app.run(lambda argv: run(argv[1], argv[2:])))
