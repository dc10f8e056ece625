"""Two processes on 127.0.0.1 (2 fake CPU devices each, ``jax.distributed``) against one.

The children run the real ``mtl-jax train`` through ``tests/multiprocess_driver.py``, which
records the SHA-1 of every example image each process consumed. The reference is computed
here, in one process on 4 devices, from the same per-process data streams.
"""

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import smoke_config

from mtl_jax import checkpointing
from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment, open_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "multiprocess_driver.py")
STEPS = 4
COMMON = ["--config=configs/quickstart.py:smoke", f"--config.num_train_steps={STEPS}",
          "--config.checkpoint_every_steps=2", f"--config.eval_every_steps={STEPS}",
          "--config.log_every_steps=1", "--config.optimizer.name=sgd",
          "--config.num_vis_examples=2"]
TIMEOUT_S = 1200  # generous: CI machines are often shared; a healthy run takes ~1-2 min


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(data_dir, cache_dir):
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(tmp, tag, args, env, heartbeat=120):
    """Both processes of one run: ``[(Popen, record path, log path)] * 2``. The heartbeat
    timeout is long by default: on an overloaded machine (load average ~100 on 2 cores) the
    heartbeat threads of healthy processes were starved for over 20 s and JAX stopped both."""
    port = _free_port()
    procs = []
    for i in range(2):
        record, log = tmp / f"{tag}_rec{i}.jsonl", tmp / f"{tag}_out{i}.log"
        cmd = [sys.executable, DRIVER, str(record), "--", "train", *args,
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}", f"--heartbeat_timeout={heartbeat}"]
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                           stderr=subprocess.STDOUT), record, log))
    return procs


def _wait(procs, timeout=TIMEOUT_S):
    deadline = time.time() + timeout
    codes = []
    for p, _, _ in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            pytest.fail("a child process hung; logs: " + " | ".join(
                open(log).read()[-2000:] for _, _, log in procs))
    return codes


#: JAX's CPU collectives (gloo) give a process 30 s to meet its peer at the first collective;
#: on an overloaded 2-core machine one process can arrive later than that (seen once while two
#: other compile-heavy jobs ran beside the test). That start-up timeout -- and nothing else --
#: gets one fresh attempt of the same run.
GLOO_START_TIMEOUT = "Gloo context initialization failed: DEADLINE_EXCEEDED"


def _run_pair(tmp, tag, args, env, wd):
    """Both processes of one run to the end; one fresh attempt (the workdir as it was before)
    when the only failure is the gloo start-up timeout. Returns (exit codes, logs)."""
    backup = tmp / f"{tag}_wd_before"
    if wd.exists():
        shutil.copytree(wd, backup)
    for attempt in range(2):
        procs = _start(tmp, tag, args, env)
        codes = _wait(procs)
        logs = [open(log).read() for _, _, log in procs]
        if codes == [0, 0] or attempt or not any(GLOO_START_TIMEOUT in x for x in logs):
            return codes, logs
        print(f"{tag}: gloo start-up timeout, one fresh attempt")
        shutil.rmtree(wd, ignore_errors=True)
        if backup.exists():
            shutil.copytree(backup, wd)
        for i in range(2):
            (tmp / f"{tag}_rec{i}.jsonl").unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _records(path, kind):
    return [r for r in map(json.loads, open(path)) if r["kind"] == kind]


def _digest(row):
    return hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def two_process_run(data_dir, cache_dir, tmp_path_factory):
    """Run 4 steps with two processes, then delete the last checkpoint and restart both."""
    tmp = tmp_path_factory.mktemp("mp")
    wd = tmp / "wd"
    env = _child_env(data_dir, cache_dir)
    args = [*COMMON, f"--workdir={wd}"]
    t0 = time.time()
    codes, logs = _run_pair(tmp, "first", args, env, wd)
    first_s = time.time() - t0
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # What the uninterrupted run left behind, before the restart changes it.
    ckpts = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    config = _config(data_dir)
    exp = build_experiment(config)
    final_state, final_data, _ = _restore(wd, exp)
    files = {p: (wd / p).read_text() for p in ("metrics.jsonl", "results.json")}
    tensorboard = sorted(os.listdir(wd / "tensorboard"))  # the restart adds its own file
    # Crash after the checkpoint of step 2: drop the later one, restart both processes.
    shutil.rmtree(wd / "checkpoints" / str(STEPS))
    (wd / "results.json").unlink()
    t0 = time.time()
    codes, relogs = _run_pair(tmp, "restart", args, env, wd)
    restart_s = time.time() - t0
    assert codes == [0, 0], relogs[0][-3000:] + relogs[1][-3000:]
    print(f"two-process run {first_s:.0f} s, restart {restart_s:.0f} s")
    return dict(wd=wd, tmp=tmp, config=config, exp=exp, ckpts=ckpts, logs=logs, relogs=relogs,
                final_state=final_state, final_data=final_data, files=files,
                tensorboard=tensorboard)


def _restore(wd, exp):
    """The latest checkpoint's state (restored here, in one process) and the iterator
    positions the two processes saved: ``(state, {file: position}, step)``."""
    import orbax.checkpoint as ocp

    mgr = checkpointing.make_manager(str(wd), read_only=True, async_save=False)
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(exp.abstract_state)))["state"]
    mgr.close()
    data_dir = wd / "checkpoints" / str(step) / "data"
    data = {p: json.loads((data_dir / p).read_text()) for p in sorted(os.listdir(data_dir))
            if p.endswith(".json")}
    return state, data, step


def _config(data_dir):
    config = smoke_config(data_dir, num_train_steps=STEPS, checkpoint_every_steps=2,
                          eval_every_steps=STEPS, log_every_steps=1, num_vis_examples=2)
    config.optimizer.name = "sgd"
    config.num_devices = 4  # the 4 global devices of the two processes, here in one
    return config


@pytest.fixture(scope="module")
def reference(two_process_run, data_dir):
    """One process, 4 devices, fed the same per-process streams: (params after each step,
    local batch digests per process and step)."""
    config, exp = two_process_run["config"], two_process_run["exp"]
    (src,) = open_data(config, splits=("train",))
    local_bs = config.batch_size // 2
    streams = [iter(pipeline.host_train_dataset(
        src, local_batch_size=local_bs, seed=config.seed, augment=exp.augment,
        process_index=i, process_count=2)) for i in range(2)]
    state = exp.init_state()
    digests = [[], []]
    sharding = pipeline.batch_sharding(exp.mesh)
    for _ in range(STEPS):
        local = [next(s) for s in streams]
        for i in range(2):
            digests[i].append([_digest(r) for r in local[i]["image"]])
        batch = {k: np.concatenate([local[0][k], local[1][k]]) for k in local[0]}
        state, _ = exp.train_step(state, pipeline.to_global(batch, sharding))
    return state, digests


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_params_equal_one_process_run(two_process_run, reference):
    ref_state, _ = reference
    got = two_process_run["final_state"]
    assert int(got.step) == STEPS
    for a, b in zip(_leaves(ref_state.params), _leaves(got.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(_leaves(ref_state.batch_stats), _leaves(got.batch_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_each_process_reads_a_disjoint_half(two_process_run, reference):
    _, ref_digests = reference
    tmp = two_process_run["tmp"]
    read = [[r["images"] for r in _records(tmp / f"first_rec{i}.jsonl", "train")]
            for i in range(2)]
    for i in range(2):
        assert read[i][:STEPS] == ref_digests[i]  # batch by batch, in order
    for step in range(STEPS):
        assert len(read[0][step]) == len(read[1][step]) == 4
        assert not set(read[0][step]) & set(read[1][step])
    # Over the run the two processes draw from disjoint halves of the split.
    assert not set(sum(read[0], [])) & set(sum(read[1], []))


def test_one_checkpoint_and_restart_resumes_in_place(two_process_run, reference):
    wd, tmp = two_process_run["wd"], two_process_run["tmp"]
    _, ref_digests = reference
    assert two_process_run["ckpts"] == [2, STEPS]
    # One checkpoint per step: one state, one data-iterator file per process.
    assert sorted(os.listdir(wd / "checkpoints" / "2" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    for log in two_process_run["relogs"]:
        assert "Resumed from the checkpoint of step 2" in log
    for i in range(2):
        resumed = [r["images"] for r in _records(tmp / f"restart_rec{i}.jsonl", "train")]
        assert resumed[:STEPS - 2] == ref_digests[i][2:]  # batches 3 and 4, not 1 and 2
    config, exp = two_process_run["config"], two_process_run["exp"]
    state, data, step = _restore(wd, exp)
    assert step == STEPS
    del config
    assert data == two_process_run["final_data"]
    assert sorted(data) == ["process_0-of-2.json", "process_1-of-2.json"]
    for a, b in zip(_leaves(state.params), _leaves(two_process_run["final_state"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_eval_covers_every_example_once(two_process_run, data_dir):
    tmp, wd, config = two_process_run["tmp"], two_process_run["wd"], two_process_run["config"]
    seen = collections.Counter()
    for i in range(2):
        done = {r["call"] for r in _records(tmp / f"first_rec{i}.jsonl", "eval_done")}
        assert len(done) == 1  # one full evaluation (the pictures read one batch only)
        for r in _records(tmp / f"first_rec{i}.jsonl", "eval"):
            if r["call"] in done:
                seen.update(d for d, m in zip(r["images"], r["mask"]) if m > 0)
    (val,) = open_data(config, splits=("val",))
    from mtl_jax.data.augment import decode

    expected = collections.Counter(_digest(decode(val[j])["image"]) for j in range(len(val)))
    assert len(expected) == len(val) == 10
    assert seen == expected
    # The metrics of the two-process eval equal a one-process eval of the same checkpoint.
    from mtl_jax.train import evaluate_state

    (val_src,) = open_data(config, splits=("val",))
    ref = evaluate_state(two_process_run["exp"], two_process_run["final_state"], val_src)
    results = json.loads(two_process_run["files"]["results.json"])
    assert results["step"] == STEPS
    for k, v in ref.items():
        assert results[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    del wd


def test_only_process_zero_writes(two_process_run):
    wd = two_process_run["wd"]
    lines = [json.loads(x) for x in two_process_run["files"]["metrics.jsonl"].splitlines()]
    train_steps = [x["step"] for x in lines if "train/loss/total" in x]
    assert train_steps == list(range(1, STEPS + 1))  # one writer, not two
    assert len(two_process_run["tensorboard"]) == 1  # one event file for the first run
    assert (wd / "predictions.png").exists()
    assert sorted(p for p in os.listdir(wd) if p.startswith("predictions_step")) == [
        f"predictions_step{STEPS:07d}.png"]
    # Process 1 logs its metrics but writes no file of its own.
    assert "Process 1 of 2" in two_process_run["logs"][1]


def _kill_and_wait(victim, survivor, timeout: float, hung: str) -> tuple[int, float]:
    """SIGKILL ``victim``; the survivor's exit code and the seconds it took to exit (the test
    fails with ``hung`` past ``timeout``)."""
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        code = survivor.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(hung)
    return code, time.time() - killed_at


def test_a_dead_peer_stops_the_others(data_dir, cache_dir, tmp_path):
    """SIGKILL process 1 mid-training: process 0 exits non-zero within the heartbeat timeout
    instead of waiting in the next collective forever -- stopped by the coordination service
    (naming the process that stopped sending heartbeats) or, sooner, by the collective that
    finds its peer gone (both seen on this machine). The transport words the second case
    differently from run to run ("Connection closed by peer", "Connection reset by peer", ...),
    so the test asserts the library's own contract: a non-zero exit within the timeout and the
    one-line ``process 0 of 2 failed: ...`` message, whatever follows it."""
    env = _child_env(data_dir, cache_dir)
    args = [*COMMON, "--config.num_train_steps=100000", "--config.eval_every_steps=100000",
            "--config.checkpoint_every_steps=100000", f"--workdir={tmp_path / 'wd'}"]
    heartbeat = 10
    procs = _start(tmp_path, "dead", args, env, heartbeat=heartbeat)
    deadline = time.time() + TIMEOUT_S
    jsonl = tmp_path / "wd" / "metrics.jsonl"
    while time.time() < deadline and not (
            jsonl.exists() and "train/loss/total" in jsonl.read_text()):
        if any(p.poll() is not None for p, _, _ in procs):
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p, _, _ in procs), open(procs[0][2]).read()[-3000:]
    code, waited = _kill_and_wait(procs[1][0], procs[0][0], heartbeat + 120,
                                  "process 0 hung after its peer died")
    out = open(procs[0][2]).read()
    assert code != 0
    by_heartbeat = re.search(r"stopped sending heartbeats\):\s*1\b", out)
    by_collective = re.search(r"^mtl-jax: process 0 of 2 failed: \S", out, re.MULTILINE)
    assert by_heartbeat or by_collective, out[-3000:]
    if by_heartbeat:
        assert "detected fatal errors" in out
    assert waited < heartbeat + 120
    print(f"process 0 stopped {waited:.0f} s after its peer died (heartbeat {heartbeat} s)")


def test_a_peer_dead_at_start_up_stops_the_other_within_the_init_timeout(data_dir, cache_dir,
                                                                         tmp_path):
    """Process 0 killed during start-up (before its coordination service is up): process 1
    does not wait forever in ``jax.distributed.initialize``; after ``--init_timeout`` it
    exits 1 with one line naming the coordinator and the timeout, and writes nothing."""
    env = _child_env(data_dir, cache_dir)
    init_timeout = 10
    wd = tmp_path / "wd"
    procs = _start(tmp_path, "startup", [*COMMON, f"--workdir={wd}",
                                          f"--init_timeout={init_timeout}"], env)
    code, waited = _kill_and_wait(procs[0][0], procs[1][0], init_timeout + 120,
                                  "process 1 hung at start-up after process 0 died")
    out = open(procs[1][2]).read()
    assert code == 1, out[-3000:]
    assert re.search(r"^mtl-jax: error: process 1 of 2 could not join the run at "
                     rf"127\.0\.0\.1:\d+ within {init_timeout} s \(--init_timeout\)", out,
                     re.MULTILINE), out[-3000:]
    assert "Check failure stack trace" not in out  # JAX's own abort never came
    assert not wd.exists()  # refused before anything was written
    assert init_timeout <= waited < init_timeout + 120
    print(f"process 1 stopped {waited:.0f} s after process 0 died (init timeout {init_timeout})")
