"""Metric writers read back from disk, and the progress reporter on a hand-made clock."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from mtl_jax import writers


def _load_events(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return acc


class _RecordingWriter(writers.MetricWriter):
    """Keeps every call, to check what reaches a writer."""

    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_images(self, step, images):
        self.calls.append(("images", step, dict(images)))

    def write_texts(self, step, texts):
        self.calls.append(("texts", step, dict(texts)))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


class _FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def test_tensorboard_scalars_read_back(tmp_path):
    w = writers.TensorBoardWriter(tmp_path)
    w.write_scalars(1, {"train/loss": 0.5, "train/lr": np.float32(1e-3)})
    w.write_scalars(7, {"train/loss": np.array(0.25)})
    w.close()
    acc = _load_events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 7]
    assert [e.value for e in loss] == [0.5, 0.25]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-3)


def test_tensorboard_images_read_back(tmp_path):
    rgb_HxWx3 = np.zeros((5, 8, 3), np.uint8)
    rgb_HxWx3[2, 3] = (255, 0, 128)
    gray_NxHxWx1 = np.linspace(0.0, 1.0, 2 * 4 * 6).reshape(2, 4, 6, 1)
    w = writers.TensorBoardWriter(tmp_path)
    w.write_images(3, {"pred/rgb": rgb_HxWx3, "pred/depth": gray_NxHxWx1})
    w.close()
    acc = _load_events(tmp_path)
    assert set(acc.Tags()["images"]) == {"pred/rgb", "pred/depth/0", "pred/depth/1"}
    (rgb,) = acc.Images("pred/rgb")
    assert (rgb.step, rgb.height, rgb.width) == (3, 5, 8)
    decoded = np.asarray(Image.open(io.BytesIO(rgb.encoded_image_string)))
    np.testing.assert_array_equal(decoded, rgb_HxWx3)
    (gray,) = acc.Images("pred/depth/1")
    assert (gray.height, gray.width) == (4, 6)
    decoded = np.asarray(Image.open(io.BytesIO(gray.encoded_image_string)))
    np.testing.assert_array_equal(decoded, np.round(gray_NxHxWx1[1, ..., 0] * 255))


def test_tensorboard_rejects_bad_image_shape(tmp_path):
    w = writers.TensorBoardWriter(tmp_path)
    with pytest.raises(ValueError, match="C in"):
        w.write_images(0, {"x": np.zeros((4, 4, 2))})
    w.close()


def test_tensorboard_texts_and_hparams_are_text_plugin_tensors(tmp_path):
    w = writers.TensorBoardWriter(tmp_path)
    w.write_texts(2, {"notes": "**bold** é"})
    w.write_hparams({"lr": 0.1, "tasks": {"depth": "l1"}})
    w.close()
    acc = _load_events(tmp_path)
    assert set(acc.Tags()["tensors"]) == {"notes", "hparams"}
    (note,) = acc.Tensors("notes")
    assert note.step == 2
    assert tensor_util.make_ndarray(note.tensor_proto).item().decode() == "**bold** é"
    assert acc.SummaryMetadata("notes").plugin_data.plugin_name == "text"
    (hparams,) = acc.Tensors("hparams")
    text = tensor_util.make_ndarray(hparams.tensor_proto).item().decode()
    assert hparams.step == 0 and '"depth": "l1"' in text and '"lr": 0.1' in text


def test_jsonl_lines_hold_exact_values(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    w = writers.JsonlWriter(path)
    w.write_scalars(1, {"a": 0.1, "b": np.float32(0.5), "c": np.array([3])})
    # Flushed per line: readable before close, as after a kill.
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "a": 0.1, "b": 0.5, "c": 3.0}
    w.write_scalars(2, {"nan": float("nan"), "inf": np.inf})
    w.write_images(2, {"x": np.zeros((2, 2, 3))})
    w.write_texts(2, {"t": "ignored"})
    w.write_hparams({"lr": 0.1, "name": "ew"})
    w.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    second = json.loads(lines[1])
    assert second["step"] == 2 and math.isnan(second["nan"]) and second["inf"] == math.inf
    assert json.loads((tmp_path / "run" / "hparams.json").read_text()) == {"lr": 0.1, "name": "ew"}


def test_jsonl_appends_across_writers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        w = writers.JsonlWriter(path)
        w.write_scalars(step, {"x": step})
        w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_logging_writer_line(monkeypatch):
    lines = []
    monkeypatch.setattr(writers.logging, "info", lambda msg, *args: lines.append(msg % args))
    writers.LoggingWriter().write_scalars(12, {"loss": 0.123456, "lr": np.float32(3e-4)})
    assert lines == ["[12] loss=0.1235 lr=0.0003"]


def test_multi_writer_fans_out():
    a, b = _RecordingWriter(), _RecordingWriter()
    w = writers.MultiWriter([a, b])
    image = np.zeros((2, 2, 1))
    w.write_scalars(1, {"x": 1.0})
    w.write_images(1, {"im": image})
    w.write_texts(1, {"t": "s"})
    w.write_hparams({"h": 1})
    w.flush()
    w.close()
    expected = [("scalars", 1, {"x": 1.0}), ("images", 1, {"im": image}), ("texts", 1, {"t": "s"}),
                ("hparams", {"h": 1}), ("flush",), ("close",)]
    assert a.calls == b.calls == expected


def test_create_default_writer(tmp_path):
    w = writers.create_default_writer(tmp_path)
    w.write_scalars(5, {"eval/delta_m": -1.5})
    w.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "eval/delta_m": -1.5}
    assert _load_events(tmp_path / "tensorboard").Scalars("eval/delta_m")[0].value == -1.5
    only_log = writers.create_default_writer(tmp_path / "other", just_logging=True)
    only_log.write_scalars(5, {"x": 1.0})
    only_log.close()
    assert not (tmp_path / "other").exists()


def test_progress_reporter_steps_per_sec_eta_and_sections(monkeypatch):
    logged = []
    monkeypatch.setattr(writers.logging, "info", lambda msg, *args: logged.append(msg % args))
    clock, sink = _FakeClock(100.0), _RecordingWriter()
    reporter = writers.ProgressReporter(104, sink, every_steps=10, every_secs=None, time_fn=clock)
    assert not reporter(1)  # after the compiling step: only starts the clock
    for step in range(2, 11):  # 0.5 s per step
        clock.t += 0.5
        assert reporter(step) == (step == 10)
    # steps 1 -> 10 in 4.5 s: 2 steps/s; 94 steps left -> 47 s.
    assert logged == ["step 10/104, 2 steps/s, ETA 0:00:47"]
    assert sink.calls == [("scalars", 10, {"perf/steps_per_sec": 2.0})]
    with reporter.timed("eval"):
        clock.t += 5.0
    for step in range(11, 21):
        clock.t += 0.5
        reporter(step)
    # 10 steps in 10 s, half of it in eval; 84 steps left at 1 step/s.
    assert logged[-1] == "step 20/104, 1 steps/s, ETA 0:01:24"
    assert sink.calls[-1] == ("scalars", 20, {"perf/steps_per_sec": 1.0, "perf/time/eval": 0.5})
    clock.t += 42.0
    assert reporter(104)  # the last step reports, though no multiple of 10
    assert logged[-1] == "step 104/104, 2 steps/s, ETA 0:00:00"
    assert sink.calls[-1][2]["perf/time/eval"] == 0.0


def test_progress_reporter_every_secs_and_long_eta(monkeypatch):
    logged = []
    monkeypatch.setattr(writers.logging, "info", lambda msg, *args: logged.append(msg % args))
    clock = _FakeClock(0.0)
    reporter = writers.ProgressReporter(10_000, every_secs=60.0, time_fn=clock)
    reporter(0)
    clock.t = 30.0
    assert not reporter(1)
    clock.t = 60.0
    assert reporter(2)
    # 1/30 steps/s; 9998 steps left -> 299940 s = 83 h 19 min.
    assert logged == ["step 2/10000, 0.03333 steps/s, ETA 83:19:00"]
    assert not reporter(2)  # no new step, no report
