"""``mtl-jax predict`` and ``mtl-jax compare`` on a trained smoke checkpoint."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from test_training import smoke_config

from mtl_jax import compare, predict, steps
from mtl_jax.data import visualize
from mtl_jax.errors import UserError
from mtl_jax.main import main
from mtl_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A finished 2-step smoke run (checkpoint, config.json, results.json, metrics.jsonl)."""
    config = smoke_config(data_dir, num_train_steps=2, checkpoint_every_steps=2,
                          eval_every_steps=1, num_vis_examples=1)
    wd = str(tmp_path_factory.mktemp("runs") / "mtl_ew")
    results = train_and_evaluate(config, wd)
    return config, wd, results


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8), "L").save(d / "b.jpg")
    (d / "notes.txt").write_text("not an image, ignored in a folder")
    return d


def test_predict_writes_every_task(run, images, tmp_path, monkeypatch):
    config, wd, _ = run
    original = steps.predict_step

    def with_attention(state, image, **kw):  # a model that returns an attention map
        preds = original(state, image, **kw)
        preds["attention/depth/stage1"] = jax.nn.sigmoid(image[..., 0] * 4 - 2)
        return preds

    monkeypatch.setattr(steps, "predict_step", with_attention)
    out = tmp_path / "pred"
    assert main(["predict", f"--workdir={wd}", f"--images={images}", f"--out={out}"]) == 0
    names = sorted(os.listdir(out))
    for stem in ("a", "b"):
        assert f"{stem}_input.png" in names
        for t in ("semseg", "depth", "normals", "attention_depth_stage1"):
            assert f"{stem}_{t}.png" in names and f"{stem}_{t}.npy" in names
    h, w = config.input_size
    sem = np.load(out / "a_semseg.npy")
    depth = np.load(out / "a_depth.npy")
    normals = np.load(out / "a_normals.npy")
    att = np.load(out / "a_attention_depth_stage1.npy")
    assert sem.shape == (h, w) and sem.dtype.kind == "i" and 0 <= sem.min() <= sem.max() < 10
    assert depth.shape == (h, w) and np.all(np.isfinite(depth))
    norms = np.linalg.norm(normals, axis=-1)  # unit, or 0 where the raw output was ~0
    unit = np.abs(norms - 1.0) < 1e-4
    assert np.all(unit | (norms == 0.0)) and unit.mean() > 0.95
    # PNGs: at the config's input size, the colour coding of the arrays.
    png = np.asarray(Image.open(out / "a_semseg.png"))
    np.testing.assert_array_equal(png, visualize.colorize_semseg(sem))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a_normals.png")),
                                  visualize.colorize_normals(normals))
    gray = Image.open(out / "a_attention_depth_stage1.png")
    assert gray.mode == "L" and gray.size == (w, h)
    np.testing.assert_array_equal(np.asarray(gray), np.round(att * 255).astype(np.uint8))
    # The input as the model saw it: the file resized to (h, w), alpha and grey -> RGB.
    seen = predict.read_image(str(images / "b.jpg"), (h, w))
    assert seen.shape == (h, w, 3) and np.all(seen[..., 0] == seen[..., 2])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b_input.png")),
                                  visualize.to_uint8_image(seen))


def test_predict_matches_the_step_on_the_same_input(run, images, tmp_path):
    """The .npy arrays are the predict step's output on the resized image (checkpoint 2)."""
    config, wd, _ = run
    from mtl_jax.experiment import build_experiment

    out = tmp_path / "one"
    predict.predict(wd, str(images / "a.png"), str(out))
    exp = build_experiment(config)
    state, _, _ = predict._restore(exp, wd, None)
    image = predict.read_image(str(images / "a.png"), config.input_size)
    ref = jax.device_get(exp.predict_step(state, image[None]))
    np.testing.assert_array_equal(np.load(out / "a_semseg.npy"), ref["semseg"][0])
    np.testing.assert_allclose(np.load(out / "a_depth.npy"), ref["depth"][0, ..., 0], rtol=1e-5)


def test_predict_errors(run, images, tmp_path, capsys):
    config, wd, _ = run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"this is no png")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        predict.predict(wd, str(bad), str(tmp_path / "o1"))
    with pytest.raises(UserError, match="no image found"):
        predict.predict(wd, str(tmp_path / "nothing" / "*.png"), str(tmp_path / "o2"))
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(wd, "config.json"), empty / "config.json")
    with pytest.raises(UserError, match="no checkpoint in"):
        predict.predict(str(empty), str(images), str(tmp_path / "o3"))
    with pytest.raises(UserError, match="has no config.json"):
        predict.predict(str(tmp_path), str(images), str(tmp_path / "o4"))
    other = smoke_config(config.dataset.data_dir)
    other.model.decoder_kwargs.features = 16  # not the trained model
    with pytest.raises(UserError, match="does not match the config"):
        predict.predict(wd, str(images), str(tmp_path / "o5"), config=other)
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        predict.predict(wd, str(images), str(tmp_path / "o6"), step=7)
    # The command line turns them into exit status 1 and one line on stderr.
    assert main(["predict", f"--workdir={empty}", f"--images={images}",
                 f"--out={tmp_path / 'o7'}"]) == 1
    assert "mtl-jax: error: no checkpoint in" in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(run, tmp_path_factory):
    """The trained run, a copy with other final numbers, and two single-task results."""
    _, wd, results = run
    root = tmp_path_factory.mktemp("compare")
    second = root / "mtl_other"
    shutil.copytree(wd, second)
    other = dict(json.load(open(os.path.join(wd, "results.json"))))
    other["semseg/miou"] = results["semseg/miou"] / 2
    (second / "results.json").write_text(json.dumps(other))
    stl_s, stl_d = root / "stl_s", root / "stl_d"
    for d, metrics in ((stl_s, {"semseg/miou": results["semseg/miou"] / 2}),
                       (stl_d, {"depth/abs_err": results["depth/abs_err"] * 2})):
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"step": 100, **metrics}))
    return wd, str(second), str(stl_s), str(stl_d), results


def test_compare_table_and_delta_m(runs, tmp_path, capsys):
    wd, second, stl_s, stl_d, results = runs
    png = tmp_path / "curves.png"
    assert main(["compare", wd, second, f"--baseline={stl_s},{stl_d}", f"--plot={png}"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "run" and header[-1] == "Δm % ↑"
    assert "semseg/miou ↑" in header and "depth/abs_err ↓" in header
    assert not any("/side/" in h for h in header)
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")]
                              for line in lines[2:])}
    assert set(rows) == {"mtl_ew", "mtl_other"}
    col = header.index("semseg/miou ↑")
    assert float(rows["mtl_ew"][col]) == pytest.approx(results["semseg/miou"], rel=1e-3)
    # Δm: semseg twice the baseline (+100 %), depth error half the baseline's (+50 %).
    assert float(rows["mtl_ew"][-1]) == pytest.approx(75.0, abs=0.01)
    assert float(rows["mtl_other"][-1]) == pytest.approx((0.0 + 50.0) / 2, abs=0.01)
    picture = np.asarray(Image.open(png))
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    keys = compare.plot_curves([wd], str(tmp_path / "one.png"))
    assert "semseg/miou" in keys and "depth/abs_err" in keys
    curves = compare.load_curves(wd)
    assert [s for s, _ in curves["semseg/miou"]] == [1, 2]  # eval at every step


def test_compare_errors(runs, tmp_path, capsys):
    wd, second, stl_s, _, _ = runs
    with pytest.raises(UserError, match="is not a finished run"):
        compare.compare([wd, str(tmp_path)])
    conflicting = tmp_path / "stl_conflict"
    conflicting.mkdir()
    (conflicting / "results.json").write_text(json.dumps({"semseg/miou": 0.123}))
    with pytest.raises(UserError, match="conflicting baseline values"):
        compare.compare([wd], [stl_s, str(conflicting)])
    assert main(["compare", wd, str(tmp_path / "missing"), "--plot="]) == 1
    assert "not a finished run" in capsys.readouterr().err
    table = compare.compare([wd, second])  # no baselines: no Δm column
    assert "Δm" not in table and table.count("\n") == 4
