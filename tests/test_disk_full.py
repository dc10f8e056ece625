"""Disk full (docs/reliability.md): a failed write of any output of a training run (the
prediction pictures, the metrics log, TensorBoard, a checkpoint) ends ``mtl-jax train`` with
exit code 1 and one line naming the file, the OS error and the intact checkpoints; no
traceback reaches the terminal (the background threads' go to a log file), and the same command
resumes from those checkpoints once the disk has room again.

The runs are the quickstart smoke config with the base run of tests/test_reliability.py's
settings (6 steps, checkpoints at 3 and 6, no augmentation), so their compiled steps come from
the persistent compilation cache.
"""

import errno
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from mtl_jax import checkpointing, log_routing, main, writers
from mtl_jax.data import visualize
from mtl_jax.errors import WriteError, os_error_text, writing

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _args(data_dir, wd, *extra):
    return ["train", "--config=configs/quickstart.py:smoke", f"--workdir={wd}",
            f"--data_dir={data_dir}", "--config.num_devices=1",
            "--config.augment.enabled=False", *extra]


def _one_error_line(err: str) -> str:
    """The one ``mtl-jax:`` line of stderr, which holds no traceback."""
    for marker in ("Traceback", "Exception in thread", "Exception ignored", "never awaited"):
        assert marker not in err, err[-4000:]
    lines = [x for x in err.splitlines() if x.startswith("mtl-jax:")]
    assert len(lines) == 1, err[-4000:]
    return lines[0]


def _intact(wd, steps) -> str:
    return (f"; the checkpoints saved before are intact (steps {steps} in {wd}/checkpoints): "
            "fix the cause (e.g. free disk space) and run the same command again to resume")


def _resume(data_dir, wd, caplog, *extra):
    """The same command again, the disk freed: resumes from step 3 and finishes."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main.main(_args(data_dir, wd, *extra)) == 0
    assert f"Resumed from the checkpoint of step 3 in {wd}." in caplog.messages
    assert checkpointing.saved_steps(str(wd)) == [3, 6]
    assert json.load(open(os.path.join(wd, "results.json")))["step"] == 6
    steps = [r["step"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))]
    assert steps == sorted(steps) and steps[-1] == 6  # steps 4..6 logged once


def test_disk_full_while_writing_the_pictures(data_dir, tmp_path, monkeypatch, capfd, caplog):
    """The pictures of the final eval (step 6, before its checkpoint): one line; the
    checkpoint of step 3 restores."""
    original = visualize.save_png

    def save_png(path, *args, **kwargs):
        if "predictions_step0000006" in os.fspath(path):
            raise ENOSPC
        return original(path, *args, **kwargs)

    monkeypatch.setattr(visualize, "save_png", save_png)
    wd = tmp_path / "run"
    assert main.main(_args(data_dir, wd)) == 1
    line = _one_error_line(capfd.readouterr().err)
    assert line == ("mtl-jax: error: writing the prediction pictures "
                    f"{wd}/predictions_step0000006.png failed: No space left on device (ENOSPC)"
                    + _intact(wd, [3]))
    assert checkpointing.saved_steps(str(wd)) == [3]
    assert not (wd / "results.json").exists()
    monkeypatch.setattr(visualize, "save_png", original)
    _resume(data_dir, wd, caplog)


def test_disk_full_while_writing_the_metrics_log(data_dir, tmp_path, monkeypatch, capfd):
    original = writers.JsonlWriter.write_scalars

    def write_scalars(self, step, scalars):
        if step >= 4:
            raise ENOSPC
        return original(self, step, scalars)

    monkeypatch.setattr(writers.JsonlWriter, "write_scalars", write_scalars)
    wd = tmp_path / "run"
    assert main.main(_args(data_dir, wd, "--config.num_vis_examples=0")) == 1
    line = _one_error_line(capfd.readouterr().err)
    assert line == (f"mtl-jax: error: writing the metrics log {wd}/metrics.jsonl failed: No "
                    "space left on device (ENOSPC)" + _intact(wd, [3]))
    assert checkpointing.saved_steps(str(wd)) == [3]


_FULL_AT_SAVE = """
import resource, signal, sys
from mtl_jax import checkpointing, main

original = checkpointing.save
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG


def save(manager, step, *args, **kwargs):
    if step == 6:  # from now on no file of this process grows beyond 64 KiB: the disk is full
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limit[1]))
    return original(manager, step, *args, **kwargs)


checkpointing.save = save
sys.argv = ["mtl-jax", *sys.argv[1:]]
sys.exit(main.main())
"""


def test_disk_full_while_saving_a_checkpoint(data_dir, tmp_path, caplog):
    """A real failure of Orbax's writes (tensorstore's, in its threads), in a process of its
    own as a user runs it: the terminal gets one line (plus one log line saying where the
    tracebacks are), not the hundreds of lines of Orbax's threads, its unfinished tasks and
    coroutines destroyed at exit; the log file holds them."""
    wd = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, TMPDIR=str(logs), PYTHONPATH=REPO)
    env.pop("MTL_JAX_VERBOSE", None)
    r = subprocess.run([sys.executable, "-c", _FULL_AT_SAVE,
                        *_args(data_dir, wd, "--config.num_vis_examples=0")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-4000:]
    line = _one_error_line(r.stderr)
    assert line.startswith("mtl-jax: error: saving the checkpoint of step 6 failed: File too "
                           "large (EFBIG): "), line
    assert line.endswith(_intact(wd, [3])), line
    [log] = [logs / f for f in os.listdir(logs) if f.startswith("mtl-jax-")]
    assert f"[traceback in {log}]" in r.stderr
    assert "Traceback (most recent call last)" in log.read_text()
    assert checkpointing.saved_steps(str(wd)) == [3]
    _resume(data_dir, wd, caplog, "--config.num_vis_examples=0")


def test_write_error_names_the_output_and_the_os_error():
    with pytest.raises(WriteError) as e, writing("the results /w/results.json"):
        raise ENOSPC
    assert str(e.value) == ("writing the results /w/results.json failed: No space left on "
                            "device (ENOSPC)")
    assert str(e.value.with_intact_checkpoints([], "/w/checkpoints")).startswith(
        "writing the results /w/results.json failed: No space left on device (ENOSPC); the "
        "checkpoints saved before are intact (steps none in /w/checkpoints)")
    assert os_error_text(ValueError("bad\nmore")) == "ValueError: bad"


def test_background_tracebacks_go_to_the_log_file(tmp_path, capfd, monkeypatch):
    """A thread's exception and logged tracebacks: in the file, one line on the terminal."""
    monkeypatch.delenv("MTL_JAX_VERBOSE", raising=False)
    from absl import logging as absl_logging

    root = logging.getLogger()
    handler = absl_logging.get_absl_handler()
    added = handler not in root.handlers
    if added:
        root.addHandler(handler)
    stream = handler.python_handler.setStream(sys.stderr)  # (not pytest's, from a run)
    file = log_routing.TracebackFile(str(tmp_path / "t.log"))
    try:
        with log_routing.background_tracebacks_to_file(file=file):
            def fail():
                raise ENOSPC

            t = threading.Thread(target=fail, name="writer")
            t.start()
            t.join()
            try:
                raise ValueError("second")
            except ValueError:
                logging.getLogger("orbax").exception("a save thread failed")
    finally:
        handler.python_handler.setStream(stream)
        if added:
            root.removeHandler(handler)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "second" not in err
    assert ("The background thread writer failed: No space left on device (ENOSPC) "
            f"[traceback in {tmp_path / 't.log'}]") in err
    text = (tmp_path / "t.log").read_text()
    assert text.count("Traceback (most recent call last)") == 2 and "second" in text
