"""Workdirs on an object store, through the local stand-in ``teststore://`` of
``tests/object_store.py`` (no appends, no renames, atomic create-if-absent, like gcsfs)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import object_store
import pytest
from conftest import race_for_the_lock

from mtl_jax import paths, run_config, workdir_lock, writers
from mtl_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "tests", "object_store.py")


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    object_store.register(str(root))
    return root


def test_stand_in_refuses_what_an_object_store_cannot_do(store):
    """The stand-in is as strict as gcsfs (else the tests below would prove little)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs("teststore://bucket/x")
    fs.pipe_file(path, b"1")
    with pytest.raises(NotImplementedError):
        fs.open(path, "ab")
    with pytest.raises(NotImplementedError):
        fs.mv(path, path + "2")
    with pytest.raises(FileExistsError):
        paths.create_exclusive("teststore://bucket/x", b"2")
    assert (store / "bucket" / "x").read_bytes() == b"1"


def test_lock_on_an_object_store(store):
    wd = "teststore://bucket/run"
    # Created atomically: of runs starting together, exactly one gets it.
    got, refused = race_for_the_lock(wd)
    assert len(got) == 1 and len(refused) == 5
    assert all("in use by another training run" in r for r in refused)
    assert workdir_lock.holder(wd)["token"] == got[0].info["token"]
    got[0].release()
    assert not (store / "bucket" / "run" / "LOCK").exists()
    # A lock left by a process that is gone (kill -9) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = dict(got[0].info or {}, pid=dead.pid, token="stale",
                 start_ticks=None, host=workdir_lock.socket.gethostname())
    paths.write_text(f"{wd}/LOCK", json.dumps(stale))
    with workdir_lock.WorkdirLock(wd, enabled=True) as lock:
        assert workdir_lock.holder(wd)["token"] == lock.info["token"] != "stale"
    # One of another host cannot be checked: the error says which object to delete.
    paths.write_text(f"{wd}/LOCK", json.dumps(dict(stale, host="elsewhere")))
    with pytest.raises(UserError, match=f"if that run is gone, delete {wd}/LOCK;"):
        workdir_lock.WorkdirLock(wd, enabled=True).acquire()


def test_config_and_metrics_log_on_an_object_store(store):
    from ml_collections import ConfigDict

    wd = "teststore://bucket/run"
    config = ConfigDict({"seed": 0, "num_train_steps": 6, "eval_every_steps": 6})
    run_config.record(config, wd, 0, {})
    longer = ConfigDict({"seed": 0, "num_train_steps": 8, "eval_every_steps": 6})
    changes = run_config.check_resume(longer, wd)
    assert changes == {"num_train_steps": (6, 8)}
    run_config.record(longer, wd, 6, changes)
    run_config.record(longer, wd, 6, changes)  # appended to: rewritten whole
    assert len((store / "bucket" / "run" / "config_changes.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match=r"in: seed \(0 -> 1\)"):
        run_config.check_resume(ConfigDict({"seed": 1, "num_train_steps": 8,
                                            "eval_every_steps": 6}), wd)
    log = f"{wd}/metrics.jsonl"
    writer = writers.JsonlWriter(log)
    for step in range(1, 5):
        writer.write_scalars(step, {"loss": step})
    writer.close()
    paths.write_text(log, paths.read_text(log) + '{"step": 5, "lo')  # cut by a kill
    assert writers.truncate_jsonl(log, 2) == 3
    assert [json.loads(x)["step"] for x in paths.read_text(log).splitlines()] == [1, 2]


def _launch(root, args, cwd, env):
    return subprocess.Popen([sys.executable, LAUNCHER, str(root), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_kill_resume_evaluate_and_compare_on_an_object_store(data_dir, tmp_path):
    """``mtl-jax train`` with ``--workdir=teststore://bucket/run``: killed (SIGKILL) after its
    first checkpoint, run again (it takes over the stale lock, drops the metrics lines of the
    replayed steps and resumes), then ``eval`` and ``compare``; every file of the run is in
    the store, nothing lands in the current folder (a local-path bypass would write
    ``./teststore:/bucket/run``)."""
    root, cwd = tmp_path / "store", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    wd, run = "teststore://bucket/run", root / "bucket" / "run"
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, XLA_FLAGS="", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    total = 24
    args = ["train", f"--config={REPO}/configs/quickstart.py:smoke", "--config.num_devices=1",
            f"--config.num_train_steps={total}", "--config.checkpoint_every_steps=4",
            f"--config.eval_every_steps={total}", "--config.num_vis_examples=2",
            f"--workdir={wd}"]
    victim = _launch(root, args, cwd, env)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts))):
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    if (run / "results.json").exists():
        pytest.fail("the run finished before it was killed")
    assert json.loads((run / "LOCK").read_text())["pid"] == victim.pid  # left by the kill

    resumed = _launch(root, args, cwd, env)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    start = int(re.search(r"Resumed from the checkpoint of step (\d+) in teststore://", out)[1])
    assert 0 < start < total
    assert "Took over the stale lock of pid" in out
    assert not (run / "LOCK").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss/depth" in x]
    assert steps == sorted(set(steps)) and steps[-1] == total  # replayed steps not repeated
    assert json.loads((run / "config.json").read_text())["num_train_steps"] == total
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == total
    assert (run / "predictions.png").stat().st_size > 0
    assert (run / f"predictions_step{total:07d}.png").exists()
    assert json.loads((run / "hparams.json").read_text())["num_train_steps"] == total
    assert os.listdir(run / "tensorboard")
    assert not os.listdir(cwd)

    evaluated = _launch(root, ["eval", f"--config={REPO}/configs/quickstart.py:smoke",
                               "--config.num_devices=1", f"--workdir={wd}"], cwd, env)
    out, _ = evaluated.communicate(timeout=300)
    assert evaluated.returncode == 0, out[-3000:]
    printed = json.loads(out[out.rindex("{\n"):out.rindex("}") + 1])  # eval prints JSON
    assert printed["step"] == total
    assert printed["semseg/miou"] == pytest.approx(results["semseg/miou"], rel=1e-5)

    compared = _launch(root, ["compare", wd], cwd, env)
    out, _ = compared.communicate(timeout=120)
    assert compared.returncode == 0, out[-3000:]
    assert "semseg/miou" in out
    assert not os.listdir(cwd)


def test_tensorboard_events_on_an_object_store_are_all_kept(store):
    """The event file is uploaded whole: nothing written before a flush is lost (gcsfs would
    replace an object opened for appending; the stand-in refuses that)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    writer = writers.TensorBoardWriter("teststore://bucket/run/tensorboard")
    writer.write_scalars(1, {"a": 1.0})
    writer.flush()
    writer.write_scalars(2, {"a": 2.0})
    writer.write_resume(2)
    writer.flush()
    writer.write_scalars(3, {"a": 3.0})
    writer.close()
    (name,) = os.listdir(store / "bucket" / "run" / "tensorboard")
    events = list(EventFileLoader(str(store / "bucket" / "run" / "tensorboard" / name)).Load())
    assert [e.step for e in events if e.summary.value] == [1, 2, 3]
    assert [e.step for e in events if e.HasField("session_log")] == [2]


def test_saver_sees_committed_checkpoints_under_a_url(store):
    """The Saver's 'was this step committed' check goes through epath, as orbax does, so a
    save to gs://... is not taken for a failed one (os.path cannot see a URL's folders)."""
    from types import SimpleNamespace

    from mtl_jax import checkpointing

    (store / "bucket" / "run" / "checkpoints" / "4").mkdir(parents=True)
    manager = SimpleNamespace(directory="teststore://bucket/run/checkpoints")
    saver = checkpointing.Saver(manager, keep=1)
    assert saver._committed(4) and not saver._committed(8)
