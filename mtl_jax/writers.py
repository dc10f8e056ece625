"""Metric writers with clu's ``MetricWriter`` interface, and a progress reporter, without TF.

(clu's own writers and ``clu.periodic_actions`` import TensorFlow, not installed at training
time.) Event files come from ``tensorboard``'s pure-Python writer. Writers take host values."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mtl_jax import paths
from mtl_jax.errors import writing


def _to_float(value: Any) -> float:
    return float(np.asarray(value).item())


def _hparams_json(hparams: Mapping[str, Any]) -> str:
    return json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)


def _png_images(images: Any) -> list[summary_pb2.Summary.Image]:
    """``[H,W,C]`` or ``[N,H,W,C]``, uint8 or float in [0, 1], C in {1, 3} -> N PNG protos."""
    x = np.asarray(images)
    x_NxHxWxC = x[None] if x.ndim == 3 else x
    if x_NxHxWxC.ndim != 4 or x_NxHxWxC.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [H,W,C] or [N,H,W,C] with C in {{1,3}}, got {x.shape}")
    if x.dtype != np.uint8:
        x_NxHxWxC = np.round(np.clip(x_NxHxWxC.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    protos = []
    for image in x_NxHxWxC:
        buffer = io.BytesIO()  # PIL wants [H,W] for one channel
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
        h, w, c = image.shape
        protos.append(summary_pb2.Summary.Image(height=h, width=w, colorspace=c,
                                                encoded_image_string=buffer.getvalue()))
    return protos


class MetricWriter:
    """The writer interface (clu's); each method does nothing unless a subclass overrides it.

    ``what`` names what a writer writes (``'the metrics log W/metrics.jsonl'``): an
    ``OSError`` of a writer in a :class:`MultiWriter` (disk full) becomes a
    :class:`~mtl_jax.errors.WriteError` naming it."""

    what = "the log"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """``{tag: number or size-1 array}``."""

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``{tag: [H,W,C] or [N,H,W,C]}``, uint8 or float in [0, 1], C in {1, 3}."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """``{tag: markdown text}``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Once per run; JSON-able values (others are written as ``str``)."""

    def write_resume(self, step: int) -> None:
        """A run resumes at ``step``: what was written for later steps is orphaned."""

    def flush(self) -> None:
        """Pushes what was written to disk."""

    def close(self) -> None:
        """Flushes and releases files."""


class TensorBoardWriter(MetricWriter):
    """One TensorBoard event file in ``logdir``, flushed on ``flush`` and every ``flush_secs``.

    Scalars are ``simple_value``s; images PNG ``Summary.Image``s (N > 1 images: tags ``<tag>/i``);
    texts string tensors for the text plugin (markdown); hparams JSON, text ``hparams``, step 0.

    A ``logdir`` on an object store (``gs://...``) cannot be appended to (gcsfs silently
    *replaces* an object opened for appending): the event file is written to a local temporary
    folder and uploaded whole to ``logdir`` on each ``flush``, on ``close`` and, when an event
    is added, if ``flush_secs`` have passed since the last upload.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 120.0):
        logdir = os.fspath(logdir)
        self.what = f"the TensorBoard log in {logdir}"
        self._remote = logdir if paths.is_url(logdir) else None
        self._spool = tempfile.mkdtemp(prefix="mtl_jax_tensorboard_") if self._remote else None
        with writing(self.what):
            self._writer = EventFileWriter(self._spool or logdir, flush_secs=flush_secs)
        self._flush_secs, self._uploaded = flush_secs, time.monotonic()

    def _upload(self) -> None:
        if self._remote is None:
            return
        self._uploaded = time.monotonic()
        for name in sorted(os.listdir(self._spool)):
            with open(os.path.join(self._spool, name), "rb") as f:
                paths.write_bytes(paths.join(self._remote, name), f.read())

    def _add(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=list(values)))
        self._writer.add_event(event)
        if self._remote is not None and time.monotonic() - self._uploaded >= self._flush_secs:
            self.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._add(step, [summary_pb2.Summary.Value(tag=tag, simple_value=_to_float(value))
                         for tag, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        values = []
        for tag, batch in images.items():
            protos = _png_images(batch)
            values += [summary_pb2.Summary.Value(tag=tag if len(protos) == 1 else f"{tag}/{i}",
                                                 image=proto) for i, proto in enumerate(protos)]
        self._add(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._add(step, [summary_pb2.Summary.Value(  # a scalar string tensor, shape []
            tag=tag, metadata=text_metadata.create_summary_metadata(tag, description=""),
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()]))
            for tag, text in texts.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.write_texts(0, {"hparams": f"```json\n{_hparams_json(hparams)}\n```"})

    def write_resume(self, step: int) -> None:
        """A ``SessionLog.START`` event at ``step``: TensorBoard then discards the events of
        steps >= ``step`` written before it (those of a killed run that were replayed)."""
        self._writer.add_event(event_pb2.Event(
            wall_time=time.time(), step=int(step),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        self._writer.close()
        try:
            self._upload()
        finally:
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
                self._spool = None


class JsonlWriter(MetricWriter):
    """Appends ``{"step": N, "<key>": float, ...}`` to file ``path`` per ``write_scalars``.

    Each line is flushed at once, so a killed run keeps all it wrote. NaN and infinities are the
    bare literals ``NaN``/``Infinity``/``-Infinity`` (Python's ``json`` default: ``json.loads``
    and pandas read them, strict parsers do not). Images and texts are ignored; ``write_hparams``
    (over)writes ``hparams.json`` next to ``path``. On an object store (``gs://...``, see
    :mod:`mtl_jax.paths`) each call rewrites the whole object: objects cannot be appended to."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.what = f"the metrics log {path}"
        self._url = paths.is_url(path)
        self._dir = paths.parent(path)
        if self._url:  # an object cannot be appended to: rewrite the whole file
            self._path = path
            self._lines = paths.read_text(path) if paths.exists(path) else ""
            self._file = None
            return
        with writing(self.what):
            os.makedirs(self._dir, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # closed in close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _to_float(v) for k, v in scalars.items()}}
        if self._url:
            self._lines += json.dumps(record) + "\n"
            paths.write_text(self._path, self._lines)
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        path = paths.join(self._dir, "hparams.json")
        with writing(f"the hyperparameters {path}"):
            paths.write_text(path, _hparams_json(hparams) + "\n")

    def close(self) -> None:  # every line is already flushed, so ``flush`` has nothing to do
        if self._file is not None:
            self._file.close()


class LoggingWriter(MetricWriter):
    """Logs through ``absl.logging.info``: one line ``[step] key=value ...`` per call (4 s.f.)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        body = " ".join(f"{k}={_to_float(v):.4g}" for k, v in scalars.items())
        logging.info("[%d] %s", step, body)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for tag, text in texts.items():
            logging.info("[%d] %s: %s", step, tag, text)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("hparams: %s", _hparams_json(hparams))


class MultiWriter(MetricWriter):
    """Forwards every call to each of ``writers``, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = tuple(writers)

    def _each(self, method: str, *args: Any) -> None:
        for writer in self._writers:
            with writing(writer.what):
                getattr(writer, method)(*args)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._each("write_scalars", step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._each("write_images", step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._each("write_texts", step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._each("write_hparams", hparams)

    def write_resume(self, step: int) -> None:
        self._each("write_resume", step)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Keep only the records of ``path`` (a ``metrics.jsonl``) with ``"step" <= step`` (none
    when ``step`` is 0) and lines that are not cut; returns how many were dropped.

    A run resuming from the checkpoint of ``step`` calls it before writing: the steps after
    that checkpoint are replayed, so their records from the interrupted run would repeat.
    The file is rewritten atomically (a new file renamed over it; an object written whole)."""
    path = os.fspath(path)
    if not paths.exists(path):
        return 0
    kept, dropped = [], 0
    for line in paths.read_text(path).splitlines(keepends=True):
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut by a kill
            continue
        if 0 < step and record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if dropped:
        paths.write_text(path, "".join(kept))
        logging.info("Dropped %d records of steps after %d from %s (they are replayed).",
                     dropped, step, path)
    return dropped


def create_default_writer(workdir: str | os.PathLike, *, just_logging: bool = False) -> MultiWriter:
    """TensorBoard (``workdir/tensorboard``), ``workdir/metrics.jsonl`` and the log; only the log
    with ``just_logging`` (every process but the first in a multi-host run)."""
    if just_logging:
        return MultiWriter([LoggingWriter()])
    return MultiWriter([TensorBoardWriter(paths.join(workdir, "tensorboard")),
                        JsonlWriter(paths.join(workdir, "metrics.jsonl")), LoggingWriter()])


def _format_duration(seconds: float) -> str:
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class ProgressReporter:
    """Logs ``step N/T, X steps/s, ETA h:mm:ss`` and writes ``perf/*`` scalars now and then.

    Call ``reporter(step)`` (a host int) after each step; between reports it only reads the
    clock. The first call starts the clock, so compilation before it is not counted. Reports come
    when ``step`` crosses a multiple of ``every_steps``, ``every_secs`` after the last report, and
    at ``num_train_steps``; steps/s is over the interval since the last one (timed sections
    included), the ETA assumes that rate. ``perf/time/<name>`` is the fraction of the interval
    spent in ``with reporter.timed(name):`` blocks ending in it (host time: block on device work).
    """

    def __init__(self, num_train_steps: int, writer: MetricWriter | None = None,
                 every_steps: int | None = None, every_secs: float | None = 60.0, *,
                 time_fn: Callable[[], float] = time.monotonic):
        self._num_train_steps, self._writer, self._time_fn = num_train_steps, writer, time_fn
        self._every_steps, self._every_secs = every_steps, every_secs
        self._last_step: int | None = None  # until the first call starts the clock
        self._last_time = 0.0
        self._section_secs: dict[str, float] = {}

    def __call__(self, step: int) -> bool:
        """Returns whether this call reported."""
        now, last_step = self._time_fn(), self._last_step
        if last_step is not None:
            elapsed = now - self._last_time
            every_steps, every_secs = self._every_steps, self._every_secs
            due = (step >= self._num_train_steps
                   or (every_secs is not None and elapsed >= every_secs)
                   or (bool(every_steps) and step // every_steps > last_step // every_steps))
            if not due or step <= last_step or elapsed <= 0:
                return False
            steps_per_sec = (step - last_step) / elapsed
            eta = (self._num_train_steps - step) / steps_per_sec
            logging.info("step %d/%d, %.4g steps/s, ETA %s", step, self._num_train_steps,
                         steps_per_sec, _format_duration(max(eta, 0.0)))
            if self._writer is not None:
                fractions = {f"perf/time/{k}": v / elapsed for k, v in self._section_secs.items()}
                self._writer.write_scalars(step, {"perf/steps_per_sec": steps_per_sec, **fractions})
        self._last_step, self._last_time = step, now  # (re)starts the interval
        self._section_secs = dict.fromkeys(self._section_secs, 0.0)
        return last_step is not None

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the host time spent inside the ``with`` block to section ``name``."""
        start = self._time_fn()
        try:
            yield
        finally:
            self._section_secs[name] = self._section_secs.get(name, 0.0) + self._time_fn() - start
