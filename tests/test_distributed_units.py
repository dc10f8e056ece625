"""Units of the multi-process support that need no second process: URL workdirs, the
coordinator flags, and workdir files written through mtl_jax.paths (a stand-in for Cloud
Storage). The two-process runs are in ``tests/test_multiprocess.py``."""

import json
import os

import numpy as np
import pytest

from mtl_jax import checkpointing


def test_url_workdir_keeps_its_scheme():
    assert checkpointing.checkpoint_dir("gs://bucket/runs/a/") == "gs://bucket/runs/a/checkpoints"
    assert checkpointing.checkpoint_dir("rel") == os.path.join(os.getcwd(), "rel", "checkpoints")


def test_partial_coordinator_flags_are_a_user_error():
    from mtl_jax import distributed
    from mtl_jax.errors import UserError

    with pytest.raises(UserError, match="need all of"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(UserError, match=r"--process_id=2 must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


def test_gs_workdir_files_go_through_the_path_layer(tmp_path, monkeypatch):
    """metrics.jsonl, hparams and pictures of a gs:// workdir are written through
    mtl_jax.paths, i.e. fsspec's filesystem for gs:// (gcsfs), here the stand-in of
    tests/object_store.py (objects are rewritten, never appended to)."""
    from fsspec.registry import _registry
    from object_store import ROOT_VARIABLE, StandInStore

    from mtl_jax import writers
    from mtl_jax.data import visualize

    class GsStandIn(StandInStore):
        protocol = ("gs",)

    monkeypatch.setenv(ROOT_VARIABLE, str(tmp_path / "gcs"))
    monkeypatch.setitem(_registry, "gs", GsStandIn)
    w = writers.JsonlWriter("gs://bucket/run/metrics.jsonl")
    w.write_scalars(1, {"a": 1.0})
    w.write_hparams({"lr": 0.1})
    w.close()
    w = writers.JsonlWriter("gs://bucket/run/metrics.jsonl")  # a resumed run
    w.write_scalars(2, {"a": 2.0})
    w.close()
    visualize.save_png("gs://bucket/run/p.png", np.zeros((4, 6, 3), np.uint8))
    run = tmp_path / "gcs" / "bucket" / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    assert json.loads((run / "hparams.json").read_text()) == {"lr": 0.1}
    from PIL import Image

    assert Image.open(run / "p.png").size == (6, 4)


class _Exited(Exception):
    """Raised by the patched ``os._exit`` with the exit code."""


def _exit_of(distributed, error, capsys):
    """``(exit code, stderr)`` of ``distributed.exit_after_failure(error)``."""
    with pytest.raises(_Exited) as e:
        distributed.exit_after_failure(error)
    return e.value.args[0], capsys.readouterr().err


def _raised(error):
    try:
        raise error
    except BaseException as e:  # noqa: BLE001 -- the error with its traceback
        return e


def test_multiprocess_exit_keeps_the_single_process_contract(monkeypatch, capsys):
    """A multi-process run leaves at once (``os._exit``: no shutdown barrier) with the exit
    codes and lines of a single-process run, naming the process: 75 after a preemption, 1 and
    one line for a user error (2 for a bad command line), 130 for Ctrl-C, 1 and a traceback
    for a bug."""
    from mtl_jax import distributed
    from mtl_jax.errors import Preempted, UsageError, UserError

    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    monkeypatch.delenv("MTL_JAX_VERBOSE", raising=False)
    tag = "[process 0 of 1]"
    assert _exit_of(distributed, _raised(Preempted(7, "/w")), capsys) == (
        75, "mtl-jax: preempted (SIGTERM) at step 7; the checkpoint of step 7 is saved in /w: "
            f"run the same command again to resume {tag}\n")
    assert _exit_of(distributed, _raised(UserError("bad value; fix it")), capsys) == (
        1, f"mtl-jax: error: bad value; fix it {tag}\n")
    assert _exit_of(distributed, _raised(UsageError("--workdir is required")), capsys) == (
        2, f"mtl-jax: error: --workdir is required {tag}\n")
    assert _exit_of(distributed, _raised(KeyboardInterrupt()), capsys) == (
        130, "mtl-jax: interrupted (Ctrl-C); a train run resumes from its latest checkpoint "
             f"when started again {tag}\n")
    code, err = _exit_of(distributed, _raised(RuntimeError("boom")), capsys)
    assert code == 1 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == "mtl-jax: process 0 of 1 failed: RuntimeError: boom"
    monkeypatch.setenv("MTL_JAX_VERBOSE", "1")  # (mtl-jax --verbose sets it)
    code, err = _exit_of(distributed, _raised(UserError("bad value")), capsys)
    assert code == 1 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == f"mtl-jax: error: bad value {tag}"


def test_multiprocess_cli_user_error_is_one_line_with_exit_code_1(data_dir, tmp_path):
    """``mtl-jax train --coordinator_address=...`` (one process) with a batch that does not
    divide over the devices: exit code 1 and one ``mtl-jax: error:`` line, no traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "mtl_jax.main", "train",
                        "--config=configs/quickstart.py:smoke", "--config.batch_size=6",
                        f"--workdir={tmp_path / 'wd'}", f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=1", "--process_id=0"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("mtl-jax:")]
    assert line.startswith("mtl-jax: error: config.batch_size=6 is not divisible by the 4 "
                           "devices of the data-parallel mesh")
    assert line.endswith("[process 0 of 1]")
