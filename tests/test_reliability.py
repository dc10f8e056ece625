"""Reliability (issue 11, docs/reliability.md): the workdir lock, config changes on resume,
out-of-range labels, unreadable checkpoints, failed saves, one-line errors and exit codes,
no repeated steps in metrics.jsonl.

Training runs share one base run (module fixture); every other run resumes from a copy of it.
"""

import glob
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, BadLabels, race_for_the_lock, smoke_config

from mtl_jax import checkpointing, run_config, workdir_lock, writers
from mtl_jax.errors import EXIT_PREEMPTED, Preempted, UserError
from mtl_jax.train import NonFiniteLossError, evaluate, evaluate_state, train_and_evaluate

# ---------------------------------------------------------------------------------------------
# The lock (no model needed)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(wd, **info):
    os.makedirs(wd, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": workdir_lock._boot_id(),
            "start_ticks": workdir_lock._start_ticks(os.getpid()), "token": "t",
            "started": "2026-01-01T00:00:00+00:00"}
    with open(os.path.join(wd, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({**base, **info}, f)


def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
    wd = str(tmp_path / "wd")
    lock_path = os.path.join(wd, "LOCK")
    with workdir_lock.WorkdirLock(wd, enabled=True) as held:
        info = json.load(open(lock_path))
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"in use by another training run, pid "
                                            rf"{os.getpid()} on host '{socket.gethostname()}'"):
            workdir_lock.WorkdirLock(wd, enabled=True).acquire()
        assert workdir_lock.holder(wd)["token"] == held.info["token"]
    assert not os.path.exists(lock_path)  # released
    # Stale: the process is gone; the pid was reused by a later process; another boot.
    for stale in ({"pid": _dead_pid()}, {"start_ticks": -5}, {"boot_id": "another-boot"}):
        _write_lock(wd, **stale)
        assert workdir_lock.holder(wd) is None
        with workdir_lock.WorkdirLock(wd, enabled=True) as lock:
            assert json.load(open(lock_path))["token"] == lock.info["token"]
        assert not os.listdir(wd)  # the stale lock was removed, nothing left behind
    # Another host cannot be checked from here: refused, with how to clear it.
    _write_lock(wd, host="elsewhere", pid=1)
    with pytest.raises(UserError, match=r"pid 1 on host 'elsewhere'.*if that run is gone, "
                                        r"delete .*LOCK"):
        workdir_lock.WorkdirLock(wd, enabled=True).acquire()
    # Releasing never removes a lock that is not ours.
    lock = workdir_lock.WorkdirLock(wd, enabled=True)
    lock.info = {"token": "mine"}
    lock.release()
    assert json.load(open(lock_path))["host"] == "elsewhere"


def test_lock_is_exclusive_when_taken_at_once(tmp_path):
    got, refused = race_for_the_lock(str(tmp_path / "race"))
    assert len(got) == 1 and len(refused) == 5
    assert all("in use by another training run" in r for r in refused)


def test_unwritable_workdir_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create the workdir .*choose a writable"):
        workdir_lock.WorkdirLock(str(blocker / "wd"), enabled=True).acquire()
    # A read-only workdir (simulated: the tests may run as root, who may write anywhere).
    def read_only(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(workdir_lock.os, "open", read_only)
    with pytest.raises(UserError, match=r"the workdir .*ro is not writable \(Permission denied\);"
                                        r" choose a writable --workdir"):
        workdir_lock.WorkdirLock(str(tmp_path / "ro"), enabled=True).acquire()


@pytest.mark.parametrize("failing", ["rename", "remove"])
def test_stale_lock_that_cannot_be_removed_is_one_clear_error(tmp_path, monkeypatch, failing):
    """A stale lock in a workdir that became read-only (simulated: os.rename or, after the
    move, os.remove fails) is a one-line error naming the file left behind, not a traceback."""
    wd = str(tmp_path / "wd")
    dead = _dead_pid()
    _write_lock(wd, pid=dead)

    def denied(*args):
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(workdir_lock.os, failing, denied)
    with pytest.raises(UserError) as e:
        workdir_lock.WorkdirLock(wd, enabled=True).acquire()
    monkeypatch.undo()
    (left,) = os.listdir(wd)  # the stale lock, moved aside or not, is still there
    assert (left == "LOCK") == (failing == "rename")
    assert str(e.value) == (
        f"the workdir {wd} holds a stale lock of pid {dead} on host '{socket.gethostname()}' "
        f"(started 2026-01-01T00:00:00+00:00) (process {dead} no longer exists) that cannot be "
        f"removed (Permission denied): delete {os.path.join(wd, left)} yourself if no run uses "
        "this workdir, or choose a writable --workdir")
    assert json.load(open(os.path.join(wd, left)))["pid"] == dead


# ---------------------------------------------------------------------------------------------
# Config comparison, metrics.jsonl truncation (no model needed)


def test_config_differences_safe_and_refused(tmp_path):
    config = smoke_config("/data")
    wd = str(tmp_path)
    assert run_config.check_resume(config, wd) == {}  # nothing saved: nothing to compare
    run_config.record(config, wd, 0, {})
    longer = smoke_config("/data", num_train_steps=12, eval_every_steps=4)
    assert run_config.check_resume(longer, wd) == {"eval_every_steps": (6, 4),
                                                     "num_train_steps": (6, 12)}
    other = smoke_config("/data")
    other.model.encoder_kwargs.width = 8
    other.tasks.semseg.num_classes = 12
    other.input_size = (64, 96)
    with pytest.raises(UserError) as e:
        run_config.check_resume(other, wd)
    msg = str(e.value)
    assert "\n" not in msg and "use a new --workdir" in msg
    assert ("in: input_size ([32, 48] -> [64, 96]), model.encoder_kwargs.width (4 -> 8), "
            "tasks.semseg.num_classes (10 -> 12);") in msg
    run_config.record(longer, wd, 6, run_config.check_resume(longer, wd))
    (entry,) = [json.loads(x) for x in open(tmp_path / "config_changes.jsonl")]
    assert entry["step"] == 6 and entry["changes"]["num_train_steps"] == [6, 12]
    assert json.load(open(tmp_path / "config.json"))["num_train_steps"] == 12


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": 1.0}) for s in (0, 2, 3, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "x"')  # last line cut by a kill
    assert writers.truncate_jsonl(path, 3) == 3
    assert [json.loads(x)["step"] for x in open(path)] == [0, 2, 3]
    assert writers.truncate_jsonl(path, 0) == 3  # a fresh start keeps nothing
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------
# Runs: one base run, resumed from copies


# Keys that only the training loop reads: runs differing in them share one compiled experiment.
_LOOP_KEYS = ("checkpoint_every_steps", "eval_every_steps", "log_every_steps", "label_check",
              "keep_checkpoints", "num_vis_examples")


@pytest.fixture(scope="module", autouse=True)
def shared_experiments():
    """``build_experiment`` memoised for this module's runs (one compilation per model/data
    config instead of one per run); the runs' own config still drives the loop."""
    import mtl_jax.train as train_mod

    cache = {}
    original = train_mod.build_experiment

    def build(config, steps_per_epoch=None):  # (steps_per_epoch: unused by weighting 'ew')
        assert config.weighting.name == "ew"
        key = json.dumps({k: v for k, v in json.loads(config.to_json_best_effort()).items()
                          if k not in _LOOP_KEYS}, sort_keys=True)
        if key not in cache:
            cache[key] = original(config, steps_per_epoch=steps_per_epoch)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_experiment", build)
        yield build


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """6 steps of the smoke model, checkpoints at 3 and 6, no augmentation."""
    config = smoke_config(data_dir, checkpoint_every_steps=3, num_vis_examples=0)
    config.augment.enabled = False
    wd = str(tmp_path_factory.mktemp("base") / "run")
    results = train_and_evaluate(config, wd)
    return config, wd, results


def _copy(base_wd, tmp_path, name="run"):
    wd = str(tmp_path / name)
    shutil.copytree(base_wd, wd)
    return wd


def _jsonl_steps(wd, key):
    return [r["step"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
            if key in r]


def test_refused_config_change_leaves_the_workdir_untouched(base_run, tmp_path):
    config, base_wd, _ = base_run
    wd = _copy(base_wd, tmp_path)
    before = {f: open(os.path.join(wd, f), "rb").read() for f in ("config.json", "metrics.jsonl")}
    other = smoke_config(config.dataset.data_dir, checkpoint_every_steps=3)
    other.augment.enabled = False
    other.model.decoder_kwargs.features = 16
    with pytest.raises(UserError, match=r"in: model.decoder_kwargs.features \(8 -> 16\); "):
        train_and_evaluate(other, wd)
    for f, content in before.items():
        assert open(os.path.join(wd, f), "rb").read() == content, f
    assert checkpointing.saved_steps(wd) == [3, 6] and not os.path.exists(
        os.path.join(wd, "LOCK"))


def test_unreadable_latest_falls_back_without_repeating_steps(base_run, tmp_path, caplog):
    """Step 6's largest array file is truncated: the run warns, moves it aside (kept), resumes
    from step 3 with an allowed config change (evaluate every 2 steps), and metrics.jsonl
    holds each step once. A workdir where no checkpoint is readable is one clear error."""
    config, base_wd, results = base_run
    wd = _copy(base_wd, tmp_path)
    biggest = max(glob.glob(os.path.join(wd, "checkpoints/6/state/ocdbt.process_0/d/*")),
                  key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
        f.truncate(size // 2)
    longer = config.copy_and_resolve_references()
    longer.eval_every_steps = 2
    with caplog.at_level("WARNING"):
        again = train_and_evaluate(longer, wd)
    assert "The checkpoint of step 6 in" in caplog.text and "unreadable" in caplog.text
    moved = os.path.join(wd, checkpointing.UNREADABLE_DIR, "6")
    assert os.path.getsize(moved + biggest.split("checkpoints/6")[1]) == size // 2  # kept
    assert checkpointing.saved_steps(wd) == [3, 6]
    assert again == pytest.approx(results, rel=1e-5, abs=1e-6)  # the same run, resumed
    # Steps 4-6 were trained twice, but logged once; the resume is recorded.
    assert _jsonl_steps(wd, "train/loss/total") == [2, 4, 6]
    assert _jsonl_steps(wd, "eval/semseg/miou") == [4, 6]
    (change,) = [json.loads(x) for x in open(os.path.join(wd, "config_changes.jsonl"))]
    assert change["step"] == 3 and change["changes"] == {"eval_every_steps": [6, 2]}
    assert json.load(open(os.path.join(wd, "config.json")))["eval_every_steps"] == 2
    # No readable checkpoint at all: one line naming each step, nothing deleted.
    for s in checkpointing.saved_steps(wd):
        open(os.path.join(wd, f"checkpoints/{s}/data/process_0-of-1.json"), "w").close()
    with pytest.raises(checkpointing.CheckpointError) as e:
        train_and_evaluate(longer, wd)
    assert "\n" not in str(e.value)
    assert "no readable checkpoint in" in str(e.value) and "step 6: " in str(e.value)
    assert "step 3: " in str(e.value) and checkpointing.saved_steps(wd) == [3, 6]
    # eval --step of a missing step lists the available ones.
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"no checkpoint of step 5 in .*; available steps: \[3, 6\]"):
        evaluate(longer, wd, step=5)


def test_deleted_array_file_or_missing_metadata_falls_back(base_run, tmp_path, caplog,
                                                           shared_experiments):
    """The other shapes of a partial latest checkpoint: its largest array file deleted, or the
    state's pytree metadata (``state/_METADATA``) missing. The restore warns naming step 6,
    returns step 3 exactly as saved, and moves step 6 (minus the lost file) aside, kept."""
    config, base_wd, _ = base_run
    abstract = shared_experiments(config, steps_per_epoch=3).abstract_state
    mgr = checkpointing.make_manager(base_wd, read_only=True, async_save=False)
    want_state, want_data, _ = checkpointing.restore(mgr, abstract, step=3)
    mgr.close()
    step6 = os.path.join(base_wd, "checkpoints", "6")
    biggest = max(glob.glob(os.path.join(step6, "state/ocdbt.process_0/d/*")),
                  key=os.path.getsize)
    for name, lost in (("array", os.path.relpath(biggest, step6)),
                       ("metadata", os.path.join("state", "_METADATA"))):
        wd = _copy(base_wd, tmp_path, name)
        os.remove(os.path.join(wd, "checkpoints", "6", lost))
        caplog.clear()
        mgr = checkpointing.make_manager(wd, async_save=False)
        with caplog.at_level("WARNING"):
            state, data_state, step = checkpointing.restore(mgr, abstract, set_aside=True)
        mgr.close()
        assert step == 3 and data_state == want_data, name
        for part in ("step", "params", "batch_stats", "opt_state"):
            got, want = jax.tree.leaves(getattr(state, part)), jax.tree.leaves(
                getattr(want_state, part))
            assert got and len(got) == len(want), part
            for x, y in zip(got, want):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=part)
        assert "The checkpoint of step 6 in" in caplog.text and "unreadable" in caplog.text
        assert "Resuming from step 3, the newest readable checkpoint; unreadable: 6." \
            in caplog.text, name
        moved = os.path.join(wd, checkpointing.UNREADABLE_DIR, "6")
        kept = {os.path.relpath(os.path.join(d, f), moved)
                for d, _, files in os.walk(moved) for f in files}
        assert lost not in kept and os.path.join("state", "manifest.ocdbt") in kept, name
        assert checkpointing.saved_steps(wd) == [3], name


def test_out_of_range_labels_beyond_the_first_examples(base_run, tmp_path, monkeypatch, caplog):
    import mtl_jax.train as train_mod
    from mtl_jax.experiment import open_data

    config, base_wd, _ = base_run
    train_src, val_src = open_data(config)
    # Train: example 9 of 24 (not among the 4 checked at start-up) has 5 bad pixels. Without
    # augmentation the step whose batch holds it counts exactly 5.
    monkeypatch.setattr(train_mod, "open_data",
                        lambda c, splits: [BadLabels(train_src, 9, 5), val_src])
    with pytest.raises(UserError, match=r"the training batch of step \d has 5 semseg label "
                                        r"pixel\(s\) outside the task's range"):
        train_and_evaluate(config, str(tmp_path / "bad_train"))
    # Eval: the whole split is counted (example 7 of 10, 3 pixels), then error or warning.
    exp = train_mod.build_experiment(config, steps_per_epoch=3)
    state = exp.init_state()
    with pytest.raises(UserError, match=r"the validation split has 3 semseg label pixel\(s\)"):
        evaluate_state(exp, state, BadLabels(val_src, 7, 3))
    monkeypatch.setattr(exp, "config", config.copy_and_resolve_references())
    exp.config.label_check = "warn"
    with caplog.at_level("WARNING"):
        results = evaluate_state(exp, state, BadLabels(val_src, 7, 3))
    assert "the validation split has 3 semseg label pixel(s)" in caplog.text
    assert not any(k.startswith("bad_labels") for k in results)
    # A clean split reports no counts.
    assert evaluate_state(exp, state, val_src).keys() == results.keys()


def test_label_counters_count_real_examples_only():
    from mtl_jax.tasks import Depth, Edges, SemSeg

    semseg = np.zeros((3, 2, 4), np.int32)
    semseg[0, 0, :3] = [77, 10, -1]  # 77 and 10 are out of range for 10 classes; -1 ignored
    semseg[1, 1, 0] = -2
    semseg[2] = 99  # a padding example (example_mask 0): not counted
    edges = np.zeros((3, 2, 4), np.int32)
    edges[0, 0, :4] = [2, -1, 1, 0]
    edges[1, 0, 0] = 255
    batch = {"semseg": semseg, "edges": edges, "example_mask": np.array([1.0, 1.0, 0.0])}
    assert int(SemSeg(num_classes=10).count_bad_labels(batch)) == 3
    assert int(SemSeg(num_classes=10, ignore_index=255).count_bad_labels(batch)) == 4
    assert int(Edges().count_bad_labels(batch)) == 2
    assert Depth().count_bad_labels(batch) is None


def test_class_count_below_the_datasets_is_refused(data_dir):
    from mtl_jax.experiment import open_data

    config = smoke_config(data_dir)
    config.tasks.semseg.num_classes = 7
    with pytest.raises(UserError, match=r"has 10 semseg classes .* but "
                                        r"config.tasks.semseg.num_classes=7"):
        open_data(config)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop
def test_failed_background_save_stops_the_run(base_run, tmp_path, monkeypatch,
                                              shared_experiments):
    """The save of step 4 fails in the background (file size limit: like a full disk): the run
    stops before another step is saved, naming step 4; the checkpoint of step 2 is intact."""
    config, _, _ = base_run
    config = config.copy_and_resolve_references()
    config.checkpoint_every_steps = 2
    original = checkpointing.save
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def save(manager, step, *args, **kwargs):
        if step == 4:  # every file write of more than 64 KiB fails from now on
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
        return original(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save", save)
    wd = str(tmp_path / "full")
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as e:
            train_and_evaluate(config, wd)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(e.value)
    assert msg.startswith("saving the checkpoint of step 4 failed: ") and "\n" not in msg
    assert "the checkpoints saved before are intact (steps [2] in" in msg
    assert checkpointing.saved_steps(wd) == [2]
    assert not os.path.exists(os.path.join(wd, "results.json"))
    monkeypatch.setattr(checkpointing, "save", original)
    mgr = checkpointing.make_manager(wd, read_only=True, async_save=False)
    exp = shared_experiments(config, steps_per_epoch=3)
    _, data_state, step = checkpointing.restore(mgr, exp.abstract_state)
    assert step == 2 and data_state


def test_eval_reads_a_workdir_in_use(base_run):
    config, base_wd, results = base_run
    with workdir_lock.WorkdirLock(base_wd, enabled=True):
        again = evaluate(config, base_wd)
    assert again["step"] == 6 and again["semseg/miou"] == pytest.approx(results["semseg/miou"])


def test_nonfinite_loss_is_a_user_error():
    assert issubclass(NonFiniteLossError, UserError)
    assert str(Preempted(7, "/w")).startswith("preempted (SIGTERM) at step 7;")


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors, exit codes


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "mtl_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_line(r):
    """The stderr line of the error; asserts there is no traceback."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("mtl-jax: error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_cli_errors_are_one_line_with_exit_code_1(base_run, data_dir, tmp_path):
    _, base_wd, _ = base_run
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    smoke = "--config=configs/quickstart.py:smoke"
    r = _cli("train", smoke, "--config.batch_size=6", f"--workdir={tmp_path / 'bs'}", env=env)
    assert r.returncode == 1
    assert ("config.batch_size=6 is not divisible by the 4 devices of the data-parallel mesh "
            "(config.num_devices=-1)") in _error_line(r)
    r = _cli("train", smoke, "--config.eval_batch_size=6", f"--workdir={tmp_path / 'ebs'}",
             env=env)
    assert r.returncode == 1
    assert _error_line(r).endswith(
        "config.eval_batch_size=6 is not divisible by the 4 devices of the data-parallel mesh "
        "(config.num_devices=-1); set config.eval_batch_size to a multiple of 4 or "
        "config.num_devices to a divisor of 6")
    r = _cli("eval", smoke, f"--workdir={base_wd}", "--step=5", env=env)
    assert r.returncode == 1
    assert _error_line(r).endswith("available steps: [3, 6]")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = _cli("train", smoke, f"--workdir={blocker}/wd", env=dict(env, MTL_JAX_VERBOSE="1"))
    assert r.returncode == 1 and "Traceback" in r.stderr  # verbose: the traceback too
    assert "cannot create the workdir" in r.stderr.splitlines()[-1]


def test_cli_nonfinite_loss_is_one_line_with_exit_code_1(base_run, data_dir, tmp_path,
                                                         shared_experiments):
    """A run resumed from a checkpoint whose parameters are NaN (the base run's step 3, edited):
    its first step's loss is NaN, and the CLI stops with one line naming step 4 and the tasks.
    The command line repeats the base run's config, so its compiled step is read back from the
    persistent compilation cache."""
    config, base_wd, _ = base_run
    wd = _copy(base_wd, tmp_path, "nan")
    abstract = shared_experiments(config, steps_per_epoch=3).abstract_state
    mgr = checkpointing.make_manager(wd, async_save=False)
    state, data_state, _ = checkpointing.restore(mgr, abstract, step=3)
    mgr.delete(6)
    mgr.delete(3)
    nan_params = jax.tree.map(lambda x: x * np.nan, state.params)
    checkpointing.save(mgr, 3, state.replace(params=nan_params), data_state)
    mgr.close()
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = _cli("train", "--config=configs/quickstart.py:smoke", f"--workdir={wd}",
             "--config.num_devices=1", "--config.checkpoint_every_steps=3",
             "--config.num_vis_examples=0", "--config.augment.enabled=False", env=env)
    assert r.returncode == 1
    assert _error_line(r) == (
        "mtl-jax: error: non-finite loss at step 4 in task(s) depth, normals, semseg; the update "
        "of that step was not applied and no checkpoint holds it. Lower the learning rate, "
        "check the labels, or set config.skip_nonfinite=True to skip such steps.")
    assert checkpointing.saved_steps(wd) == [3]


def test_cli_exit_code_constants():
    assert EXIT_PREEMPTED == 75
