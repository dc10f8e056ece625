"""Pictures of predictions next to ground truth (NumPy; used by the trainer and notebooks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mtl_jax.data import visualize
from mtl_jax.tasks import TASKS, Task

#: prefix of the attention-mask entries of ``predict_step``'s output
ATTENTION_PREFIX = "attention/"


def mask_picture(mask_HxW: np.ndarray) -> np.ndarray:
    """An attention mask ``[H, W]`` in [0, 1] as uint8 grey RGB ``[H, W, 3]`` (1 = white)."""
    m = np.clip(np.nan_to_num(np.asarray(mask_HxW, np.float64)), 0.0, 1.0)
    return np.repeat((m * 255.0).round().astype(np.uint8)[..., None], 3, axis=-1)


def prediction_grid(batch: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray],
                    max_examples: int = 4, tasks: Mapping[str, Task | type[Task]] | None = None
                    ) -> np.ndarray:
    """uint8 RGB grid: one row per example; columns ``image``, then ``<task> gt`` and
    ``<task> pred`` for every task, one column per transferred prediction
    ``'<task>/from/<source>'`` (XTasC-Net), then one ``att <task>/<block>`` column per attention
    mask (``preds`` keys ``'attention/<task>/<block>'``, ``[B, H, W]`` in [0, 1], drawn grey:
    white = 1, as AdaMT-Net's Figure 6). ``preds`` are post-processed (class ids, unit normals,
    edge probabilities, metric depth). Each task draws its own label and prediction
    (``Task.label_picture`` / ``prediction_picture``; ``tasks``: the run's, by default the
    registry's classes): depth prediction and ground truth share one colour
    range (the ground truth's)."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    preds = {k: np.asarray(v) for k, v in preds.items()}
    masks = {k[len(ATTENTION_PREFIX):]: preds.pop(k) for k in sorted(preds)
             if k.startswith(ATTENTION_PREFIX)}
    mask = batch.get("example_mask")
    n = len(batch["image"]) if mask is None else int(np.sum(mask > 0))
    n = max(1, min(n, max_examples))
    titles = ["image"]
    for name in preds:
        # '<task>/from/<source>': a prediction transferred from another task (XTasC-Net),
        # drawn like <task>'s prediction, next to it, without repeating the ground truth.
        titles += [name] if "/from/" in name else [f"{name} gt", f"{name} pred"]
    titles += [f"att {key}" for key in masks]
    tasks = {**{name.split("/", 1)[0]: TASKS[name.split("/", 1)[0]] for name in preds},
             **(tasks or {})}
    rows = []
    for i in range(n):
        row = [visualize.to_uint8_image(batch["image"][i])]
        for name, pred in preds.items():
            task = tasks[name.split("/", 1)[0]]
            gt = batch.get(task.label_key)
            label = None if gt is None else gt[i]
            if "/from/" not in name:
                row.append(np.zeros_like(row[0]) if label is None
                           else task.label_picture(label))
            row.append(task.prediction_picture(pred[i], label))
        row += [mask_picture(mask[i]) for mask in masks.values()]
        rows.append(row)
    return visualize.grid(rows, titles=titles)


def example_grid(examples: Sequence[Mapping[str, np.ndarray]],
                 fields: Sequence[str] = ("image", "semseg", "depth", "normals", "edges")
                 ) -> np.ndarray:
    """One row per dataset example, one column per field present: the image, and each label
    drawn by the task whose label it is (``Task.label_picture``)."""
    by_label = {cls.label_key: cls for cls in TASKS.values() if cls.label_key != "image"}
    fields = [f for f in fields if f in examples[0] and (f == "image" or f in by_label)]
    rows = [[visualize.to_uint8_image(ex[f]) if f == "image" else by_label[f].label_picture(ex[f])
             for f in fields] for ex in examples]
    return visualize.grid(rows, titles=list(fields))
