"""Configs load for every documented argument; CLI commands and user-facing errors."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import optim
from mtl_jax.config_utils import parse_arg, task_set
from mtl_jax.errors import UserError
from mtl_jax.experiment import build_tasks
from mtl_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CONFIG_ARGS = {
    "quickstart": ["", "smoke", "weighting=fixed", "weighting=ew,smoke", "tasks=sdne",
                   "tasks=sdnr", "steps=10", "encoder=resnet34", "encoder=resnet50,width=8",
                   "smoke,tasks=sd"],
    "stl": ["task=s", "task=d", "task=n", "task=e", "task=r", "task=s,smoke", "task=d,steps=5"],
}


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args])
def test_every_config_loads_and_builds(name, arg):
    config = load_config_module(name).get_config(arg)
    tasks = build_tasks(config)
    model = build_model(config.model, {t: task.channels for t, task in tasks.items()})
    h, w = config.input_size
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, h, w, 3)), train=False),
                            jax.random.key(0))
    assert set(shapes["params"]["decoders"]) == set(tasks)
    assert config.dataset.options.height == h and config.dataset.options.width == w
    optim.make_optimizer(config.optimizer, config.num_train_steps, shapes["params"])
    assert config.num_train_steps % config.eval_every_steps == 0 or config.num_train_steps > 0


def test_every_weighting_name_builds_from_the_quickstart_config():
    from mtl_jax.weighting import WEIGHTINGS, make_weighting

    qs = load_config_module("quickstart")
    for name, cls in WEIGHTINGS.items():
        w = make_weighting(qs.get_config(f"weighting={name}").weighting)
        assert type(w) is cls
        tasks = ("semseg", "depth", "normals")
        if cls.needs_grad_dim:  # the train step passes the number of shared parameters
            w.init(tasks, grad_dim=10)
        elif name not in ("dwa", "stch"):  # those two need steps_per_epoch from the trainer
            w.init(tasks)
        if cls.requires == "task_grads" and cls.supports_rep_grad:
            assert make_weighting(qs.get_config(f"weighting={name},rep_grad").weighting).rep_grad


def test_quickstart_docstring_is_a_run_book():
    doc = load_config_module("quickstart").__doc__
    assert "mtl-jax train --config=configs/quickstart.py" in doc and "CPU" in doc


def test_parse_arg_types_and_errors():
    c = parse_arg("smoke,steps=5,lr=0.5,name=x", smoke=False, steps=1, lr=1.0, name="a")
    assert c.smoke is True and c.steps == 5 and c.lr == 0.5 and c.name == "x"
    with pytest.raises(UserError, match="unknown config argument 'bogus'.*smoke"):
        parse_arg("bogus", smoke=False)
    with pytest.raises(UserError, match="must be a int"):
        parse_arg("steps=many", steps=1)
    with pytest.raises(UserError, match="needs a value"):
        parse_arg("steps", steps=1)
    assert task_set("sdn") == ("semseg", "depth", "normals")
    with pytest.raises(UserError):
        task_set("sx")


def test_unknown_task_in_config():
    config = load_config_module("quickstart").get_config("smoke")
    config.tasks.unlock()
    config.tasks["segmentation"] = {}
    with pytest.raises(UserError, match="unknown task 'segmentation'"):
        build_tasks(config)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mtl_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_help_lists_subcommands():
    r = _cli("--help")
    assert r.returncode == 0
    for sub in ("data", "train", "eval", "params"):
        assert sub in r.stdout


def test_cli_params_and_config_errors():
    r = _cli("params", "--config=configs/stl.py:task=d")
    assert r.returncode == 0, r.stderr
    assert "decoders/depth" in r.stdout and "total" in r.stdout
    r = _cli("params", "--config=configs/quickstart.py:smoke", "--config.modle.dtype=float32")
    assert r.returncode == 2 and 'Did you mean "model"' in r.stderr
    r = _cli("params", "--config=configs/quickstart.py:smok")
    assert r.returncode == 2 and "unknown config argument 'smok'" in r.stderr
    r = _cli("train", "--config=configs/quickstart.py:smoke")
    assert r.returncode == 2 and "--workdir is required" in r.stderr


def test_cli_missing_dataset_says_how_to_build(tmp_path):
    r = _cli("data", "show", "synthetic", "--data_dir", str(tmp_path), "--out",
             str(tmp_path / "g.png"))
    assert r.returncode == 1
    assert f"mtl-jax data build synthetic --data_dir={tmp_path}" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_data_show_writes_png(data_dir, tmp_path):
    from conftest import TINY
    from PIL import Image

    out = tmp_path / "grid.png"
    opts = [f"--{k}={v}" for k, v in TINY.items()]
    r = _cli("data", "show", "synthetic", "--data_dir", data_dir, "--out", str(out), "--num",
             "3", "--normals_from_depth", *opts)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    # 3 rows of 32-pixel pictures, 5 columns (image, semseg, depth, normals, edges) of 48.
    assert img.shape[0] > 3 * 32 and img.shape[1] >= 5 * 48
    assert img.std() > 20


def test_cli_eval_without_checkpoint(tmp_path, data_dir):
    env = dict(os.environ, TFDS_DATA_DIR=data_dir)
    r = _cli("eval", "--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}", env=env)
    assert r.returncode == 1 and "no checkpoint" in r.stderr


def test_schedules_and_part_learning_rates():
    cfg = dict(learning_rate=1.0, schedule="step", decay_steps=(10, 20), decay_factor=0.1)
    s = optim.make_schedule(cfg, 30, 1.0)
    assert [float(s(i)) for i in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = optim.make_schedule(dict(schedule="cosine", min_lr_ratio=0.1), 100, 2.0)
    assert float(cos(0)) == pytest.approx(2.0) and float(cos(100)) == pytest.approx(0.2)
    warm = optim.make_schedule(dict(schedule="constant", warmup_steps=4), 100, 1.0)
    assert float(warm(2)) == pytest.approx(0.5) and float(warm(10)) == pytest.approx(1.0)
    params = {"encoder": {"w": jnp.ones(3)}, "decoders": {"semseg": {"w": jnp.ones(2)}}}
    tx = optim.make_optimizer(dict(name="sgd", momentum=0.0, learning_rate=0.5,
                                   part_lr_multipliers={"encoder": 0.1}), 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["encoder"]["w"], -0.05)
    np.testing.assert_allclose(updates["decoders"]["semseg"]["w"], -0.5)
    lrs = optim.learning_rates(dict(learning_rate=0.5, part_lr_multipliers={"encoder": 0.1}),
                               10, 0)
    assert lrs == pytest.approx({"base": 0.5, "encoder": 0.05})
    with pytest.raises(UserError, match="does not have"):
        optim.make_optimizer(dict(part_lr_multipliers={"exchange": 2.0}), 10, params)


def test_gradient_clipping():
    tx = optim.make_optimizer(dict(name="sgd", momentum=0.0, learning_rate=1.0,
                                   grad_clip_norm=1.0), 10)
    params = {"a": jnp.zeros(2)}
    updates, _ = tx.update({"a": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0)


def test_task_order_is_the_configs_list_else_the_sorted_names():
    """config.task_order fixes the order of the tasks (heads, losses, exchange inputs); absent,
    the names sorted -- never a dict's key order, which ConfigDict sorts and JSON keeps."""
    import ml_collections

    from mtl_jax.experiment import task_order

    c = load_config_module("quickstart").get_config("smoke")
    assert "task_order" not in c
    assert tuple(build_tasks(c)) == ("depth", "normals", "semseg")
    plain = ml_collections.ConfigDict({"tasks": {"semseg": {}, "normals": {}}})
    assert task_order(plain) == ("normals", "semseg")
    c.task_order = ["normals", "semseg", "depth"]
    assert tuple(build_tasks(c)) == ("normals", "semseg", "depth")
    s = load_config_module("quickstart").get_config("smoke")
    s.task_order = "semseg, depth,normals"  # a comma-separated string is read too
    assert task_order(s) == ("semseg", "depth", "normals")
    for bad in (["semseg", "depth"], ["semseg", "depth", "normals", "semseg"],
                ["semseg", "depth", "edges"]):
        c.task_order = bad
        with pytest.raises(UserError, match="must name every task of config.tasks"):
            build_tasks(c)
    d = load_config_module("densemtl").get_config("tasks=sdne,smoke")
    assert tuple(build_tasks(d)) == ("semseg", "depth", "normals", "edges")
