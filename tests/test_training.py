"""Train step, loop, checkpoints and resume on the smoke config."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import REPO, smoke_config, write_uda_config

from mtl_jax import checkpointing, steps, workdir_lock
from mtl_jax.config_utils import load_config
from mtl_jax.data import pipeline
from mtl_jax.experiment import build_experiment, open_data
from mtl_jax.predict import workdir_config
from mtl_jax.sde.run import build_sde_experiment
from mtl_jax.train import NonFiniteLossError, evaluate, train_and_evaluate
from mtl_jax.uda.run import build_uda_experiment

# First two steps of the smoke model (seed 0, first unaugmented batch), recorded once on CPU.
GOLDEN = {
    "step1": {"loss/semseg": 2.297908, "loss/depth": 3.914044, "loss/normals": 0.656034},
    "step2_total": 6.722528,
}
@pytest.fixture(scope="module")
def exp_and_batch(data_dir):
    config = smoke_config(data_dir)
    exp = build_experiment(config)
    (src,) = open_data(config, splits=("train",))
    it = pipeline.train_iterator(src, global_batch_size=config.batch_size, mesh=exp.mesh,
                                 seed=0, augment=None)
    batch = next(it)
    it.close()
    return config, exp, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_golden_train_step(exp_and_batch):
    """Loss values of the first two steps of the smoke model are pinned (float tolerance)."""
    _, exp, batch = exp_and_batch
    state = exp.init_state()
    state, m1 = exp.train_step(state, batch)
    state, m2 = exp.train_step(state, batch)
    got = {k: float(m1[k]) for k in ("loss/semseg", "loss/depth", "loss/normals")}
    got2 = float(m2["loss/total"])
    golden = GOLDEN
    for k, v in golden["step1"].items():
        assert got[k] == pytest.approx(v, rel=2e-3), (k, got)
    assert got2 == pytest.approx(golden["step2_total"], rel=2e-3)
    assert got2 < sum(got.values())  # one Adam step on the same batch lowers the loss
    assert int(state.step) == 2
    for t in ("semseg", "depth", "normals"):
        assert float(m1[f"weight/{t}"]) == 1.0
        assert float(m1[f"grad_norm/decoders/{t}"]) > 0
    assert float(m1["update_norm"]) > 0 and not bool(m1["nonfinite"])


def test_sharded_equals_unsharded(data_dir, exp_and_batch):
    # SGD: the update is linear in the gradient, so summation-order noise stays tiny (Adam's
    # m/sqrt(v) would turn noise on near-zero gradients into +-lr steps).
    _, _, batch = exp_and_batch
    exps = []
    for n in (1, 4):
        config = smoke_config(data_dir)
        config.num_devices = n
        config.optimizer.name = "sgd"
        exps.append(build_experiment(config))
    exp1, exp4 = exps
    s1, m1 = exp1.train_step(exp1.init_state(), batch)
    batch4 = pipeline.to_global(jax.device_get(batch), pipeline.batch_sharding(exp4.mesh))
    s4, m4 = exp4.train_step(exp4.init_state(), batch4)
    for k in ("loss/total", "loss/semseg", "loss/depth", "loss/normals", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(_leaves(s1.params), _leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(_leaves(s1.batch_stats), _leaves(s4.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_not_applied(exp_and_batch):
    _, exp, batch = exp_and_batch
    state = exp.init_state()
    before = _leaves(state.params)
    bad = dict(batch)
    bad["depth"] = batch["depth"] * np.inf  # valid pixels become +inf: depth loss inf
    new, m = exp.train_step(state, bad)
    assert bool(m["nonfinite"]) and bool(m["nonfinite/depth"])
    assert not bool(m["nonfinite/semseg"])
    for a, b in zip(before, _leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


def test_train_evaluate_and_restore(data_dir, tmp_path):
    config = smoke_config(data_dir)
    wd = str(tmp_path / "run")
    results = train_and_evaluate(config, wd)
    assert set(results) >= {"semseg/miou", "depth/abs_rel", "normals/mean_angle"}
    assert all(np.isfinite(v) for v in results.values())
    assert os.path.exists(os.path.join(wd, "predictions.png"))
    assert os.listdir(os.path.join(wd, "tensorboard"))
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train_lines = [x for x in lines if "train/loss/depth" in x]
    assert train_lines and {"step", "train/weight/semseg", "train/lr/base"} <= set(train_lines[0])
    assert [x["step"] for x in train_lines] == list(range(2, config.num_train_steps + 1, 2))
    assert any("eval/semseg/miou" in x for x in lines)
    first = [x for x in lines if "perf/time/first_step" in x]  # compile time, logged once
    assert [x["step"] for x in first] == [1] and first[0]["perf/time/first_step"] > 0
    saved = json.load(open(os.path.join(wd, "results.json")))
    assert saved["step"] == config.num_train_steps
    # Checkpoints: latest N kept, the final one evaluates to the same numbers.
    steps_saved = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints"))
                         if d.isdigit())
    assert steps_saved[-1] == config.num_train_steps
    again = evaluate(config, wd)
    assert again["step"] == config.num_train_steps
    for k, v in results.items():
        assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # A second call resumes from the final checkpoint and has nothing left to train.
    assert train_and_evaluate(config, wd) == {}


def test_nonfinite_loss_stops_with_named_task(data_dir, tmp_path):
    config = smoke_config(data_dir)
    config.optimizer.learning_rate = 1e30  # diverges within a few steps
    config.checkpoint_every_steps = 100
    with pytest.raises(NonFiniteLossError, match=r"step \d+ in task"):
        train_and_evaluate(config, str(tmp_path / "nan"))
    config.skip_nonfinite = True
    results = train_and_evaluate(config, str(tmp_path / "skip"))
    assert results  # finished, with the non-finite steps skipped


class _Cli:
    """``mtl-jax ARGS`` in a subprocess whose output (stdout and stderr) is read as it comes."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "mtl_jax.main", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_until(self, found, timeout: float = 400):
        """``found()`` once it is true, polled while the process runs (at most ``timeout`` s)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None and not found():
            time.sleep(0.05)
        return found()

    def finish(self, timeout: float = 400) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join()
        return "".join(self.lines)


#: Every kind of run: its command line, and what its uninterrupted run leaves behind.
RUN_KINDS = {
    "supervised": dict(
        config=lambda tmp_path: "configs/quickstart.py:smoke", total=40, args=[
            "--config.checkpoint_every_steps=4", "--config.eval_every_steps=100",
            "--config.num_vis_examples=0"],
        kept=[32, 36, 40],  # 10 saves, the latest keep_checkpoints=3 kept
        log_every=2, parts=(), data_names=None, lock_check=True,
        abstract_state=lambda config: build_experiment(config).abstract_state),
    "uda": dict(  # both players (model, BatchNorm, optimiser; discriminators, their spectral-
        # norm state and optimiser) and both iterator positions
        config=lambda tmp_path: write_uda_config(tmp_path / "uda_tiny.py"), total=20, args=[
            "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000",
            "--config.num_vis_examples=0"],
        kept=[16, 18, 20], log_every=1, parts=("disc_params", "disc_stats", "disc_opt_state"),
        data_names={"source", "target"}, lock_check=False,
        abstract_state=lambda config: build_uda_experiment(config).abstract_state),
    "sde": dict(  # both networks (model; pose network, its BatchNorm and optimiser) and the
        # triplet iterator's position
        config=lambda tmp_path: "configs/densemtl_sde.py:smoke", total=12, args=[
            "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000",
            "--config.num_vis_examples=0", "--config.trivial_baseline=false"],
        kept=[8, 10, 12], log_every=1, parts=("pose_params", "pose_stats", "pose_opt_state"),
        data_names=None, lock_check=False,
        abstract_state=lambda config: build_sde_experiment(config).abstract_state),
}


@pytest.mark.parametrize("kind", sorted(RUN_KINDS))
def test_kill_preempt_and_resume_are_bit_exact(kind, sde_data_dir, tmp_path):
    """Kill a run with SIGKILL at a random moment after its first checkpoint, restart it,
    preempt the restarted run with SIGTERM (it saves a checkpoint of the step it is at and
    exits with code 75, 'preempted, resume me'), restart it again: the final state and data
    position equal those of an uninterrupted run bit for bit, and metrics.jsonl holds every
    logged step once. While a run holds its workdir, a second run on it is refused (exit 1,
    naming the first one's pid): checked once, the lock is taken before the kind of run is
    chosen."""
    k = RUN_KINDS[kind]
    total = k["total"]
    env = dict(os.environ, TFDS_DATA_DIR=sde_data_dir, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    common = [f"--config={k['config'](tmp_path)}", "--config.num_devices=1",
              f"--config.num_train_steps={total}", *k["args"]]
    ref_wd, wd = str(tmp_path / "ref"), str(tmp_path / "killed")
    # The reference first: the other runs then read the compiled steps from the persistent
    # compilation cache instead of compiling them again.
    ref = _Cli(["train", *common, f"--workdir={ref_wd}"], env)
    out_ref = ref.finish()
    assert ref.proc.returncode == 0, out_ref[-3000:]
    kept = sorted(int(d) for d in os.listdir(os.path.join(ref_wd, "checkpoints")) if d.isdigit())
    assert kept == k["kept"]

    victim = _Cli(["train", *common, f"--workdir={wd}"], env)
    if k["lock_check"]:  # the victim is paused meanwhile: it holds the lock throughout
        assert victim.wait_until(
            lambda: (workdir_lock.holder(wd) or {}).get("pid") == victim.proc.pid), \
            "".join(victim.lines)[-3000:]
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            second = _Cli(["train", *common, f"--workdir={wd}"], env)
            out2 = second.finish(timeout=240)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        assert second.proc.returncode == 1, out2[-3000:]
        assert (f"mtl-jax: error: the workdir {wd} is in use by another training run, pid "
                f"{victim.proc.pid} on host") in out2 and "Traceback" not in out2
        assert victim.proc.poll() is None  # the first run goes on
    ckpt_dir = os.path.join(wd, "checkpoints")
    victim.wait_until(lambda: os.path.isdir(ckpt_dir)
                      and any(d.isdigit() for d in os.listdir(ckpt_dir)))
    time.sleep(random.Random().uniform(0.0, 0.1))
    victim.proc.send_signal(signal.SIGKILL)
    victim.finish()

    resumed = _Cli(["train", *common, f"--workdir={wd}"], env)
    resumed_at = re.compile(r"Resumed from the checkpoint of step (\d+)")
    assert resumed.wait_until(lambda: resumed_at.search("".join(resumed.lines))), \
        "".join(resumed.lines)[-3000:]
    resumed.proc.send_signal(signal.SIGTERM)
    out = resumed.finish()
    resumed_from = int(resumed_at.search(out).group(1))
    assert 0 < resumed_from < total, resumed_from  # the kill really interrupted training
    assert resumed.proc.returncode == 75, out[-3000:]
    assert "SIGTERM received" in out
    preempted = int(re.search(r"mtl-jax: preempted \(SIGTERM\) at step (\d+);", out).group(1))
    assert resumed_from < preempted < total
    assert (f"mtl-jax: preempted (SIGTERM) at step {preempted}; the checkpoint of step "
            f"{preempted} is saved in {wd}: run the same command again to resume") in out
    assert checkpointing.saved_steps(wd)[-1] == preempted
    assert not os.path.exists(os.path.join(wd, "results.json"))  # not finished
    assert not os.path.exists(os.path.join(wd, "LOCK"))  # released

    final = _Cli(["train", *common, f"--workdir={wd}"], env)
    out = final.finish()
    assert final.proc.returncode == 0, out[-3000:]
    assert f"Resumed from the checkpoint of step {preempted} in" in out

    abstract = k["abstract_state"](workdir_config(ref_wd))
    restored = []
    for d in (ref_wd, wd):
        mgr = checkpointing.make_manager(d, read_only=True, async_save=False)
        restored.append(checkpointing.restore(mgr, abstract))
        mgr.close()
    (a, a_data, a_step), (b, b_data, b_step) = restored
    assert a_step == b_step == total and a_data == b_data
    if k["data_names"]:
        assert set(a_data) == k["data_names"]  # several iterators, saved side by side
    for part in ("params", "batch_stats", "opt_state", "weighting_state", "step", *k["parts"]):
        la, lb = _leaves(getattr(a, part)), _leaves(getattr(b, part))
        # the weighting strategies of these configs (equal, fixed weights) keep no state
        assert (la or part == "weighting_state") and len(la) == len(lb), part
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x, y, err_msg=part)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
    # metrics.jsonl holds every logged step once: the replayed steps' records were dropped;
    # the label counts are checked, never logged or saved as metrics.
    for d in (ref_wd, wd):
        records = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        logged = [r["step"] for r in records if "train/loss/total" in r]
        assert logged == list(range(k["log_every"], total + 1, k["log_every"])), (d, logged)
        assert [r["step"] for r in records if "eval/semseg/miou" in r] == [total], d
        assert not [key for r in records for key in r if "bad_labels" in key], d
        results = json.load(open(os.path.join(d, "results.json")))
        assert "semseg/miou" in results and not [key for key in results if "bad_labels" in key]
    # predict restores every kind's checkpoint, and takes the model's part of it
    from mtl_jax.predict import load_run

    _, model_state, step = load_run(ref_wd)
    assert step == total and type(model_state) is steps.TrainState
    for x, y in zip(_leaves(model_state.params), _leaves(a.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_every_kind_of_run_goes_through_the_one_loop(sde_data_dir, tmp_path, monkeypatch):
    """``train_and_evaluate`` hands the supervised run, the UDA run and the SDE run, each its
    own implementation of ``Run``, to the same loop function, ``train.run_loop`` (not run here:
    test_kill_preempt_and_resume_are_bit_exact runs it for every kind)."""
    from mtl_jax import train
    from mtl_jax.sde.steps import SDETrainState
    from mtl_jax.uda.steps import UDATrainState

    seen = []

    def spy(run, workdir, stop, changes):
        seen.append(run)
        return {"kind": run.kind, "workdir": workdir}

    monkeypatch.setattr(train, "run_loop", spy)
    uda = load_config(write_uda_config(tmp_path / "uda_tiny.py"))
    uda.num_devices = 1
    for ds in (uda.dataset, uda.uda.target_dataset, uda.uda.source_eval_dataset):
        ds.data_dir = sde_data_dir
    sde = load_config(os.path.join(REPO, "configs", "densemtl_sde.py"), "smoke")
    sde.num_devices = 1
    sde.dataset.data_dir = sde_data_dir
    for config, kind in ((smoke_config(sde_data_dir), "supervised"), (uda, "uda"), (sde, "sde")):
        wd = str(tmp_path / kind)
        assert train.train_and_evaluate(config, wd) == {"kind": kind, "workdir": wd}
    supervised, uda_run, sde_run = seen
    assert isinstance(uda_run.abstract_state, UDATrainState)
    assert isinstance(sde_run.abstract_state, SDETrainState)
    assert not isinstance(supervised.abstract_state, (UDATrainState, SDETrainState))
    assert len({id(r.train_step) for r in seen}) == 3


def test_state_is_one_pytree(exp_and_batch):
    _, exp, _ = exp_and_batch
    state = exp.init_state()
    assert isinstance(state, steps.TrainState)
    assert set(state.params) == {"encoder", "decoders"}
    assert set(state.params["decoders"]) == {"semseg", "depth", "normals"}


def test_trivial_baseline_constants_and_scores(data_dir):
    from mtl_jax.evaluation.trivial import evaluate_constants, fit_constants

    config = smoke_config(data_dir)
    tasks = build_experiment(config).tasks
    train_src, val_src = open_data(config)
    const = fit_constants(train_src, tasks)
    assert int(np.argmax(const["semseg"])) in (0, 1)  # floor or wall dominates
    assert 1.0 < float(const["depth"][0]) < 8.0
    np.testing.assert_allclose(np.linalg.norm(const["normals"]), 1.0, rtol=1e-6)
    scores = evaluate_constants(val_src, tasks, const, batch_size=4)
    # A constant class: one class has non-zero IoU, so mIoU <= its IoU / #present classes.
    assert 0 < scores["semseg/miou"] < 0.25 and 0.1 < scores["semseg/pixel_acc"] < 0.7
    assert scores["depth/abs_rel"] > 0.2 and scores["normals/mean_angle"] > 30


def test_delta_m_against_stl_results(data_dir, tmp_path):
    """evaluate() reports eval delta_m when config.baseline_results names STL results."""
    config = smoke_config(data_dir, num_train_steps=2, checkpoint_every_steps=2,
                          eval_every_steps=2)
    wd = str(tmp_path / "mtl")
    results = train_and_evaluate(config, wd)
    baseline = {"semseg/miou": results["semseg/miou"] * 2,  # MTL half as good: -50 %
                "depth/abs_err": results["depth/abs_err"] / 2}  # twice the error: -100 %
    path = tmp_path / "stl_results.json"
    path.write_text(json.dumps(baseline))
    config.baseline_results = str(path)
    again = evaluate(config, wd)
    assert again["delta_m"] == pytest.approx(100 * (-0.5 + -1.0) / 2, rel=1e-4)
    config.baseline_results = f"{path},{tmp_path / 'missing.json'}"
    from mtl_jax.errors import UserError

    with pytest.raises(UserError, match="configs/stl.py"):
        evaluate(config, wd)


def test_bfloat16_compute_trains(data_dir, exp_and_batch):
    _, _, batch = exp_and_batch
    config = smoke_config(data_dir)
    config.model.dtype = "bfloat16"
    exp = build_experiment(config)
    state = exp.init_state()
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    state, m = exp.train_step(state, batch)
    assert np.isfinite(float(m["loss/total"])) and float(m["update_norm"]) > 0
