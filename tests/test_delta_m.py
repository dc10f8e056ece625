"""Δm against single-task baselines, and loading baseline files."""

import json

import pytest

from mtl_jax.evaluation import delta_m, delta_m_terms, directions_for, load_baseline
from mtl_jax.tasks import make_task

DIRECTIONS = {
    "semseg/miou": True,
    "depth/abs_err": False,
    "normals/mean_angle": False,
    "edges/f1": True,
}
BASELINE = {"semseg/miou": 0.40, "depth/abs_err": 0.50, "normals/mean_angle": 20.0, "x/y": 1.0}
RESULTS = {"semseg/miou": 0.46, "depth/abs_err": 0.55, "normals/mean_angle": 19.0, "edges/f1": 0.7}


def test_delta_m_hand_computed():
    # miou +15 %, abs_err 10 % worse (lower is better) -> -10, mean_angle 5 % better -> +5.
    terms = delta_m_terms(RESULTS, BASELINE, DIRECTIONS)
    assert sorted(terms) == ["depth/abs_err", "normals/mean_angle", "semseg/miou"]
    assert terms == pytest.approx(
        {"semseg/miou": 15.0, "depth/abs_err": -10.0, "normals/mean_angle": 5.0}
    )
    # edges/f1 (not in the baseline) and x/y (not in the results) are skipped.
    assert delta_m(RESULTS, BASELINE, DIRECTIONS) == pytest.approx(3.3333333)
    assert delta_m(RESULTS, BASELINE, DIRECTIONS, keys=["semseg/miou"]) == pytest.approx(15.0)
    same = {k: v for k, v in BASELINE.items() if k in DIRECTIONS}
    assert delta_m(same, BASELINE, DIRECTIONS) == 0.0


def test_delta_m_errors():
    with pytest.raises(ValueError, match="no metric in common"):
        delta_m({"edges/f1": 0.7}, BASELINE, DIRECTIONS)
    with pytest.raises(KeyError, match="x/y"):
        delta_m({"x/y": 2.0}, BASELINE, DIRECTIONS)
    with pytest.raises(ValueError, match="missing"):
        delta_m(RESULTS, BASELINE, DIRECTIONS, keys=["edges/f1"])
    with pytest.raises(ValueError, match="nonzero"):
        delta_m({"semseg/miou": 0.1}, {"semseg/miou": 0.0}, DIRECTIONS)


def test_delta_m_with_task_directions():
    tasks = [make_task("semseg", num_classes=3), make_task("depth")]
    directions = directions_for(tasks)
    assert directions["depth/rmse"] is False and directions["depth/delta1"] is True
    results = {"semseg/pixel_acc": 0.9, "depth/rmse": 0.4}
    baseline = {"semseg/pixel_acc": 0.75, "depth/rmse": 0.5}
    # pixel_acc +20 %, rmse 20 % lower -> +20: mean +20.
    assert delta_m(results, baseline, directions) == pytest.approx(20.0)


def test_load_baseline_merges_files(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"semseg/miou": 0.4, "semseg/pixel_acc": 0.7}))
    b.write_text(json.dumps({"depth": {"abs_err": 0.5}, "semseg/miou": 0.4}))  # same value: ok
    c.write_text(json.dumps({"semseg/miou": 0.41}))
    assert load_baseline(a) == {"semseg/miou": 0.4, "semseg/pixel_acc": 0.7}
    assert load_baseline([a, str(b)]) == {
        "semseg/miou": 0.4,
        "semseg/pixel_acc": 0.7,
        "depth/abs_err": 0.5,
    }
    with pytest.raises(ValueError, match="conflicting.*semseg/miou"):
        load_baseline([a, c])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"semseg/miou": "high"}))
    with pytest.raises(ValueError, match="not a number"):
        load_baseline(bad)
