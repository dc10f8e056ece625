"""Pictures of predictions next to ground truth (NumPy; used by the trainer and notebooks)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mtl_jax.data import visualize

#: batch key of each task's target
_LABEL_KEY = {"semseg": "semseg", "depth": "depth", "normals": "normals", "edges": "edges",
              "reconstruction": "image"}


#: prefix of the attention-mask entries of ``predict_step``'s output
ATTENTION_PREFIX = "attention/"


def mask_picture(mask_HxW: np.ndarray) -> np.ndarray:
    """An attention mask ``[H, W]`` in [0, 1] as uint8 grey RGB ``[H, W, 3]`` (1 = white)."""
    m = np.clip(np.nan_to_num(np.asarray(mask_HxW, np.float64)), 0.0, 1.0)
    return np.repeat((m * 255.0).round().astype(np.uint8)[..., None], 3, axis=-1)


def prediction_grid(batch: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray],
                    max_examples: int = 4) -> np.ndarray:
    """uint8 RGB grid: one row per example; columns ``image``, then ``<task> gt`` and
    ``<task> pred`` for every task, one column per transferred prediction
    ``'<task>/from/<source>'`` (XTasC-Net), then one ``att <task>/<block>`` column per attention
    mask (``preds`` keys ``'attention/<task>/<block>'``, ``[B, H, W]`` in [0, 1], drawn grey:
    white = 1, as AdaMT-Net's Figure 6). ``preds`` are post-processed (class ids, unit normals,
    edge probabilities, metric depth). Depth prediction and ground truth share one colour
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
    rows = []
    for i in range(n):
        row = [visualize.to_uint8_image(batch["image"][i])]
        for name, pred in preds.items():
            task = name.split("/", 1)[0]
            transferred = "/from/" in name
            key = _LABEL_KEY.get(task, task)
            gt = batch.get(key)
            if task == "depth" and gt is not None:
                valid = gt[i] > 0
                lo, hi = (np.percentile(gt[i][valid], [1, 99]) if valid.any() else (0.0, 1.0))
                if not transferred:
                    row.append(visualize.colorize_depth(gt[i], lo, hi))
                shown = np.maximum(pred[i], 1e-6)  # invalid (<= 0) predictions still drawn
                row.append(visualize.colorize_depth(shown, lo, hi))
                continue
            field = "image" if task == "reconstruction" else task
            blank = np.zeros_like(row[0])
            if not transferred:
                row.append(visualize.colorize(field, gt[i]) if gt is not None else blank)
            row.append(visualize.colorize(field, pred[i]))
        row += [mask_picture(mask[i]) for mask in masks.values()]
        rows.append(row)
    return visualize.grid(rows, titles=titles)
