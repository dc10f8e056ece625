"""``mtl-jax predict`` and ``mtl-jax compare`` on a trained smoke checkpoint."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import smoke_config
from PIL import Image

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
    state, _, _ = predict._restore(exp.abstract_state, wd, None)
    image = predict.read_image(str(images / "a.png"), config.input_size)
    ref = jax.device_get(exp.predict_step(state, image[None]))
    np.testing.assert_array_equal(np.load(out / "a_semseg.npy"), ref["semseg"][0])
    np.testing.assert_allclose(np.load(out / "a_depth.npy"), ref["depth"][0, ..., 0], rtol=1e-5)


def test_predict_errors(run, images, tmp_path, capsys):
    config, wd, _ = run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"this is no png")
    with pytest.raises(UserError, match=r"1 of 1 images could not be read .*broken\.png"):
        predict.predict(wd, str(bad), str(tmp_path / "o1"))
    assert re.search(r"skipped .*broken\.png: cannot read image", capsys.readouterr().err)
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


def test_read_image_scales_16_bit_and_follows_exif(tmp_path, monkeypatch):
    """A 16-bit grey PNG is scaled by 1/65535 (not clipped to 255); EXIF orientation 6 (the
    camera turned 90° clockwise) is applied; oversize images are refused before decoding."""
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (6, 8)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    seen = predict.read_image(str(tmp_path / "deep.png"), (6, 8))
    np.testing.assert_allclose(seen, np.repeat(deep[..., None] / 65535.0, 3, -1), atol=1e-6)
    assert (seen > 254 / 255).mean() < 0.05  # clipped, >99 % of these would read as white
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "turned.png"), (6, 4)),
                                  np.rot90(rgb, k=-1) / np.float32(255))
    Image.fromarray(rng.normal(size=(4, 4)).astype(np.float32) * 9).save(
        tmp_path / "wide.tif")
    with pytest.raises(UserError, match=r"wide\.tif: float pixels must lie in \[0, 1\]"):
        predict.read_image(str(tmp_path / "wide.tif"), (4, 4))
    monkeypatch.setattr(predict, "MAX_PIXELS", 40)
    with pytest.raises(UserError, match=r"deep\.png is 8×6 = 0 Mpixels, over the limit"):
        predict.read_image(str(tmp_path / "deep.png"), (6, 8))


def test_predict_checks_out_first_and_keeps_going_past_a_bad_image(run, images, tmp_path,
                                                                   monkeypatch, capsys):
    _, wd, _ = run
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    loads = []
    monkeypatch.setattr(predict, "load_run", lambda *a, **k: loads.append(a) or 1 / 0)
    assert main(["predict", f"--workdir={wd}", f"--images={images}", f"--out={blocker}"]) == 1
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert not loads  # refused before the model was loaded
    monkeypatch.undo()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(images / "a.png", mixed / "a.png")
    (mixed / "bad.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    assert main(["predict", f"--workdir={wd}", f"--images={mixed}", f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"skipped .*bad\.png: cannot read image", err)
    assert "1 of 2 images could not be read" in err and "the other 1 were written" in err
    assert (out / "a_semseg.npy").exists() and not list(out.glob("bad_*"))


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
    # Under the table: which baseline covers which task, the metrics of each Δm, and the
    # run's tasks without a baseline.
    assert "Baselines: depth: stl_d, semseg: stl_s" in out
    assert ("- Δm of mtl_ew over 2 metrics: depth/abs_err, semseg/miou; no baseline for "
            "normals") in out
    picture = np.asarray(Image.open(png))
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    keys = compare.plot_curves([wd], str(tmp_path / "one.png"))
    assert "semseg/miou" in keys and "depth/abs_err" in keys
    curves = compare.load_curves(wd)
    assert [s for s, _ in curves["semseg/miou"]] == [1, 2]  # eval at every step


def test_compare_errors(runs, tmp_path, capsys, monkeypatch):
    wd, second, stl_s, _, _ = runs
    with pytest.raises(UserError, match="is not a finished run"):
        compare.compare([wd, str(tmp_path)])
    conflicting = tmp_path / "stl_conflict"
    conflicting.mkdir()
    (conflicting / "results.json").write_text(json.dumps({"semseg/miou": 0.123}))
    with pytest.raises(UserError, match="conflicting baseline values"):
        compare.compare([wd], [stl_s, str(conflicting)])
    assert main(["compare", wd, str(tmp_path / "missing"), "--plot="]) == 1
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    # A multi-task run as a baseline is refused, naming its tasks.
    with pytest.raises(UserError, match=r"baseline .* covers 3 tasks \(depth, normals, "
                                        r"semseg\): Δm compares against single-task runs"):
        compare.compare([second], [wd])
    table = compare.compare([wd, second])  # no baselines: no Δm column
    assert "Δm" not in table and table.count("\n") == 4
    # The curves PNG only where --plot asks for one.
    monkeypatch.chdir(tmp_path)
    assert main(["compare", wd]) == 0
    assert not list(tmp_path.glob("*.png"))
