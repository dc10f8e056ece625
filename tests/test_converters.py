"""The converter framework (models/converters): name/layout mapping, every source array used
exactly once, strict loading into a model, the CLI and config.model.init_from."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.experiment import build_experiment
from mtl_jax.main import main
from mtl_jax.models import converters
from mtl_jax.models.converters.torch_names import TorchStateDict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_state_dict_layouts():
    rng = np.random.default_rng(0)
    sd = {
        "c.weight": rng.standard_normal((5, 3, 3, 2)).astype(np.float32),  # O I kh kw
        "c.bias": np.arange(5, dtype=np.float32),
        "b.weight": np.full(5, 2.0, np.float32), "b.bias": np.full(5, 3.0, np.float32),
        "b.running_mean": np.full(5, 4.0, np.float32),
        "b.running_var": np.full(5, 5.0, np.float32),
        "b.num_batches_tracked": np.array(9),
        "l.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "a": np.ones(3, np.float32),
    }
    m = TorchStateDict(sd)
    m.conv("c", "x/conv")
    m.bn("b", "x/bn")
    m.linear("l", "x/fc")
    m.copy("a", "x/alpha")
    out = m.finish()
    assert out["params/x/conv/kernel"].shape == (3, 2, 3, 5)  # kh kw I O
    np.testing.assert_array_equal(out["params/x/conv/kernel"][1, 0, 2, 4],
                                  sd["c.weight"][4, 2, 1, 0])
    np.testing.assert_array_equal(out["params/x/conv/bias"], sd["c.bias"])
    assert out["params/x/bn/scale"][0] == 2 and out["params/x/bn/bias"][0] == 3
    assert out["batch_stats/x/bn/mean"][0] == 4 and out["batch_stats/x/bn/var"][0] == 5
    np.testing.assert_array_equal(out["params/x/fc/kernel"], sd["l.weight"].T)
    assert "params/x/fc/bias" not in out
    assert sorted(out) == sorted(["params/x/conv/kernel", "params/x/conv/bias",
                                  "params/x/bn/scale", "params/x/bn/bias", "batch_stats/x/bn/mean",
                                  "batch_stats/x/bn/var", "params/x/fc/kernel", "params/x/alpha"])


def test_torch_state_dict_every_array_exactly_once():
    sd = {"c.weight": np.zeros((2, 1, 1, 1)), "d.weight": np.zeros((2, 1, 1, 1))}
    m = TorchStateDict(sd, source="ref.npz")
    m.conv("c", "c")
    with pytest.raises(UserError, match=r"ref.npz: 1 array\(s\) were not mapped.*d.weight"):
        m.finish()
    with pytest.raises(UserError, match="used twice"):
        m.conv("c", "c2")
    with pytest.raises(UserError, match=r"no array 'e.weight'"):
        m.conv("e", "e")
    with pytest.raises(UserError, match="names under 'c'"):
        m.take("c.bias")
    with pytest.raises(UserError, match="expected 4 dimensions"):
        TorchStateDict({"c.weight": np.zeros(3)}).conv("c", "c")


def _smoke_config(data_dir):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    c = quickstart.get_config("smoke")
    c.dataset.data_dir = data_dir
    c.num_devices = 1
    return c


def _to_torch(params, batch_stats):
    """A fake 'authors' state_dict' of a model: our leaves renamed PyTorch-style and laid out
    as PyTorch (OIHW), written independently of the converter helpers."""
    sd = {}
    for tree in (params, batch_stats):
        for path, leaf in traverse_util.flatten_dict(jax.device_get(tree), sep=".").items():
            value = np.asarray(leaf) + 0.25  # differs from the initial values
            module, name = path.rsplit(".", 1)
            if name == "kernel":
                sd[f"{module}.weight"] = np.transpose(value, (3, 2, 0, 1))
            else:
                torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                              "var": "running_var"}[name]
                sd[f"{module}.{torch_name}"] = value
    return sd


def _fake_converter(state_dict, prefix=""):
    m = TorchStateDict(state_dict, source="fake")
    modules = sorted({k.rsplit(".", 1)[0] for k in state_dict})
    for module in modules:
        dst = module.replace(".", "/")
        if f"{module}.running_mean" in state_dict:
            m.bn(module, dst)
        elif m.has(f"{module}.weight") and state_dict[f"{module}.weight"].ndim == 4:
            m.conv(module, dst)
    return m.finish()


@pytest.fixture()
def fake_registered(monkeypatch):
    monkeypatch.setitem(converters.CONVERTERS, "fake", _fake_converter)


@pytest.fixture(scope="module")
def base_variables(data_dir):
    """(params, batch_stats) of the initial smoke model, on the host (one init compile)."""
    base = build_experiment(_smoke_config(data_dir)).init_state()
    return jax.device_get(base.params), jax.device_get(base.batch_stats), base.opt_state


def test_convert_cli_and_init_from(tmp_path, data_dir, base_variables, fake_registered, capsys):
    config = _smoke_config(data_dir)
    base_params, base_stats, base_opt = base_variables
    sd = _to_torch(base_params, base_stats)
    src, dst = str(tmp_path / "ref.npz"), str(tmp_path / "ours.npz")
    np.savez(src, **sd)
    assert main(["convert-weights", "--from=fake", src, dst]) == 0
    assert "init_from=" in capsys.readouterr().out

    config.model.init_from = dst
    exp = build_experiment(config)
    state = exp.init_state()
    for collection, base_tree in (("params", base_params), ("batch_stats", base_stats)):
        got = traverse_util.flatten_dict(jax.device_get(getattr(state, collection)), sep=".")
        want = traverse_util.flatten_dict(base_tree, sep=".")
        assert set(got) == set(want)
        for path, value in got.items():
            np.testing.assert_allclose(value, np.asarray(want[path]) + 0.25, err_msg=path)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(base_opt)

    # eval on a workdir without checkpoints evaluates the converted weights (step 0).
    from mtl_jax.train import evaluate

    results = evaluate(config, str(tmp_path / "no_ckpt"))
    assert results["step"] == 0 and np.isfinite(results["semseg/miou"])
    json.dumps(results)


def test_init_from_mismatch_and_cli_errors(tmp_path, data_dir, base_variables, fake_registered,
                                           capsys):
    config = _smoke_config(data_dir)
    flat = _fake_converter(_to_torch(*base_variables[:2]))
    key = next(k for k in flat if k.endswith("kernel"))
    missing = {k: v for k, v in flat.items() if k != key}
    path = str(tmp_path / "missing.npz")
    np.savez(path, **missing)
    config.model.init_from = path
    with pytest.raises(UserError, match=f"1 missing from the file \\(first: {key}"):
        build_experiment(config)
    np.savez(path, **{**flat, key: flat[key][..., :1], "params/extra/kernel": np.zeros(1)})
    with pytest.raises(UserError, match="1 with other shapes.*1 in the file but not in the "
                                        "model \\(first: params/extra/kernel"):
        build_experiment(config)
    np.savez(path, **{"weights/x": np.zeros(1)})
    with pytest.raises(UserError, match="outside params/ and batch_stats/"):
        build_experiment(config)

    assert main(["convert-weights", "--from=nope", path, path]) == 1
    assert "unknown converter --from='nope'" in capsys.readouterr().err
    assert main(["convert-weights", "--from=fake", str(tmp_path / "absent.npz"), path]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert-weights", "--from=fake", "--option", "novalue", path, path]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
