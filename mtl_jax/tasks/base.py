"""The ``Task`` interface and the helpers every task shares.

A task knows the size of its head, its loss, its metric statistics and their directions,
how augmentation must resize the batch keys it owns, and everything else the library needs
to know of it: its letter in config task sets, how its predictions and labels are drawn,
its trivial (constant) predictor, and what a domain discriminator sees of its output.
Adding a task is one file here plus one line in ``TASKS`` (``mtl_jax/tasks/__init__.py``).
Tasks are frozen dataclasses: hashable, so they can be closed over by ``jax.jit`` and used as
static arguments.

Conventions shared by all tasks:

- Losses and metrics are computed in float32, whatever the prediction dtype.
- A pixel is *valid* when its label is valid **and** its example is real
  (``batch['example_mask'] == 1``; a missing ``example_mask`` means every example is real).
- Losses are means over the valid pixels of the whole batch; a batch without any valid pixel
  gives a loss of exactly 0 with finite (zero) gradients.
- Metric statistics are sums and counts (never averages) held by a ``SumMetric``; ``merge``
  adds them, so the result over a split does not depend on how it was batched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

Batch = Mapping[str, Any]


def safe_div(num: jax.Array, den: jax.Array, default: float = 0.0) -> jax.Array:
    """``num / den`` where ``den > 0``, else ``default``; gradients stay finite when den == 0."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), default)


def example_mask(batch: Batch, batch_size: int) -> jax.Array:
    """``batch['example_mask']`` as float32 ``[B]`` (all ones when the key is absent)."""
    mask = batch.get("example_mask")
    if mask is None:
        return jnp.ones((batch_size,), jnp.float32)
    return jnp.asarray(mask, jnp.float32).reshape(batch_size)


def pixel_mask(batch: Batch, valid_BxHxW: jax.Array) -> jax.Array:
    """Bool ``[B,H,W]``: label-valid pixels of real examples."""
    mask_B = example_mask(batch, valid_BxHxW.shape[0]) > 0
    return valid_BxHxW & mask_B[:, None, None]


@flax.struct.dataclass
class SumMetric(clu_metrics.Metric):
    """A ``clu`` metric whose fields are all sums or counts.

    Subclasses declare their fields (arrays) and ``field_specs`` (field name -> (shape, dtype))
    so that ``empty()`` can build zeros, and implement ``compute() -> dict[str, scalar]``.
    ``merge`` adds field-wise, which makes it associative and valid under ``jax.jit``.
    Counts are int32 (exact up to 2**31 pixels), sums float32.
    """

    field_specs: ClassVar[Mapping[str, tuple[tuple[int, ...], Any]]] = {}

    def merge(self, other: SumMetric) -> SumMetric:
        if type(self) is not type(other):
            raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
        return jax.tree.map(jnp.add, self, other)

    @classmethod
    def empty(cls) -> SumMetric:
        return cls(**{k: jnp.zeros(shape, dtype) for k, (shape, dtype) in cls.field_specs.items()})

    def compute(self) -> dict[str, jax.Array]:  # pragma: no cover - abstract
        raise NotImplementedError


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Float32 sum of ``values`` where ``mask`` (NaN/inf outside the mask do not leak in)."""
    values = jnp.asarray(values, jnp.float32)
    return jnp.sum(jnp.where(mask, values, 0.0))


def constant_logits(channels: int, index: int) -> np.ndarray:
    """float32 ``[channels]`` logits that pick class ``index`` with certainty (±10)."""
    logits = np.full(channels, -10.0, np.float32)
    logits[int(index)] = 10.0
    return logits


def count(mask: jax.Array) -> jax.Array:
    """Int32 number of true entries of ``mask``."""
    return jnp.sum(mask, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class of a dense prediction task.

    Class attributes (data, not code):
      name: registry name, also the key of the prediction dict and of the metric namespace.
      letter: the task's letter in config task sets (``tasks=sdn``).
      label_key: batch key holding the task's target.
      resize_methods: batch key -> 'nearest' | 'linear', for every batch key the task owns.
      directions: metric name -> True when higher is better (subclasses with options may
        override it by a property).
    """

    name: ClassVar[str] = ""
    letter: ClassVar[str] = ""
    label_key: ClassVar[str] = ""
    #: whether :meth:`loss` is a function of the prediction and the batch's labels; a task
    #: learnt otherwise (``disp``: from video, by the self-supervised run) says False and its
    #: ``loss`` refuses with one line
    label_loss: ClassVar[bool] = True
    #: channels of :meth:`discriminator_input` when they differ from the head's (``None``)
    discriminator_channels: ClassVar[int | None] = None
    resize_methods: ClassVar[Mapping[str, str]] = {}
    directions: ClassVar[Mapping[str, bool]] = {}
    metric_cls: ClassVar[type[SumMetric]] = SumMetric

    @property
    def channels(self) -> int:
        """Number of output channels of the task's head."""
        raise NotImplementedError

    def loss(self, pred: jax.Array, batch: Batch) -> jax.Array:
        """Float32 scalar loss of ``pred`` (the raw head output) against ``batch``."""
        raise NotImplementedError

    def postprocess(self, pred: jax.Array) -> jax.Array:
        """Prediction as metrics and pictures use it (float32)."""
        return jnp.asarray(pred, jnp.float32)

    def metrics(self, pred: jax.Array, batch: Batch) -> SumMetric:
        """Metric statistics (sums/counts) of one batch; merge them across batches."""
        raise NotImplementedError

    def empty_metrics(self) -> SumMetric:
        """Zero statistics: the neutral element of ``merge``."""
        return self.metric_cls.empty()

    def check_labels(self, batch: Batch) -> None:
        """Host-side sanity check of the task's labels; raises ValueError on bad values."""
        del batch

    @classmethod
    def label_picture(cls, label: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` of one example's label (``batch[label_key][i]``)."""
        return cls.prediction_picture(label)

    @classmethod
    def prediction_picture(cls, pred: np.ndarray, label: np.ndarray | None = None
                           ) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` of one example's post-processed prediction; ``label``
        (its ground truth, if known) sets the colour range where the task has one (depth)."""
        raise NotImplementedError

    def trivial_prediction(self, examples: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """The trivial predictor: a constant raw head output ``[channels]`` (float32) fitted on
        decoded training ``examples``, to be scored with the task's own metrics."""
        raise NotImplementedError

    @classmethod
    def discriminator_input(cls, raw: jax.Array) -> jax.Array:
        """What a domain discriminator (UDA) sees of the raw output ``[B, H, W, channels]``:
        float32 ``[B, H, W, C]`` (``C``: ``discriminator_channels``, or the head's channels),
        comparable across domains. Tasks without it cannot take part in UDA."""
        raise NotImplementedError(f"task {cls.name!r} has no discriminator input")

    def count_bad_labels(self, batch: Batch) -> jax.Array | None:
        """Int32 number of label pixels of real examples outside the task's label range (and
        not the ignore value), which the loss and metrics leave out; ``None`` for tasks whose
        labels have no range. Jit-compatible: the train and eval steps report it so that no
        out-of-range label goes unnoticed (docs/reliability.md)."""
        del batch
        return None


@flax.struct.dataclass
class LabelErrorCount(SumMetric):
    """Number of out-of-range label pixels (eval metric dict key ``'bad_labels/<task>'``)."""

    count: jax.Array
    field_specs: ClassVar = {"count": ((), jnp.int32)}

    def compute(self) -> dict[str, jax.Array]:
        return {"count": self.count}


def bad_label_counts(tasks: Mapping[str, Task], batch: Batch) -> dict[str, jax.Array]:
    """``{task: int32 count}`` of :meth:`Task.count_bad_labels` for the tasks that have one."""
    counts = {name: task.count_bad_labels(batch) for name, task in tasks.items()}
    return {name: n for name, n in counts.items() if n is not None}


def check_label_values(name: str, labels: Any, num_classes: int, ignore_index: int = -1) -> None:
    """Raise ValueError naming the values of ``labels`` outside ``[0, num_classes)`` and not
    equal to ``ignore_index`` (host-side, numpy)."""
    values = np.unique(np.asarray(labels))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise ValueError(
            f"{name} labels must lie in [0, {num_classes}) or equal the ignore index "
            f"{ignore_index}; found {shown}"
        )
