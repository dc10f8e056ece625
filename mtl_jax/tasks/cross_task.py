"""XTasC-Net's cross-task loss groups (docs/models/xtasc.md).

With ``ŷ_seg``, ``ŷ_depth`` the direct predictions, ``T_s→d`` / ``T_d→s`` the task-transfer
networks (their outputs are the model's aux ``'depth/from/semseg'`` / ``'semseg/from/depth'``)
and ``sg`` the stop-gradient, the two losses the weighting strategy sees are::

    semseg group = (1 − λ₁)·CE(ŷ_seg, y_seg; ignore) + λ₁·L1ₘ(T_s→d(ŷ_seg), sg(ŷ_depth))
    depth group  = (1 − λ₂)·L1ₘ(ŷ_depth, y_depth)   + λ₂·CE_ls(T_d→s(ŷ_depth), argmax sg(ŷ_seg))

(XTasC-Net, ``target='prediction'``: cross-task consistency). Align-Net
(``target='ground_truth'``) compares the transferred predictions with the ground truth instead:
``L1ₘ(T_s→d(ŷ_seg), y_depth)`` and ``CE_ls(T_d→s(ŷ_depth), y_seg)``.

* ``L1ₘ(p, g)`` (:func:`masked_l1_per_image`) = per image ``Σ|p − g|·m / Σm``, then the mean
  over the images with ``Σm > 0``; ``m`` = the valid pixels of the depth ground truth (> 0) in
  every term (as the reference, whose consistency term also uses the ground-truth depth mask).
  Depth values are compared in the depth task's regression space (``output_scale`` × head
  output vs. the encoded target, :mod:`~mtl_jax.tasks.depth`).
* ``CE_ls(z, c)`` (:func:`label_smoothing_ce`) = cross-entropy of logits ``z`` against the
  smoothed one-hot of ``c`` (``1 − ε`` on ``c``, ``ε / (C − 1)`` elsewhere). For the
  consistency target (``c`` = argmax of the prediction, defined everywhere) it is normalised
  as the reference's ``LabelSmoothingLoss`` with the segmentation mask its Cityscapes script
  passes: the pixels whose ground truth is ignored contribute 0 and the sum is divided by
  **all** pixels of the real examples (``consistency_ignore='zero'``, the default), i.e.
  ``Σ_valid ce / n_all``; ``consistency_ignore='keep'`` counts every pixel (``Σ_all ce /
  n_all``: the reference's NYUv2 script, which passes no mask, and this library before).
  Align-Net averages over the non-ignored pixels (``Σ_valid ce / n_valid``, the reference's
  ``CrossEntropyLoss(ignore_index)``).
* ``CE`` and the direct depth loss are the tasks' own losses (``losses[task]`` as the step
  computed them; XTasC configures depth with ``loss='l1_per_image'``, i.e. ``L1ₘ``).

A group holds the terms whose gradient reaches that task's decoder (the consistency term of
``T_s→d`` trains the segmentation decoder through ``ŷ_seg``). This is the released code's
grouping with its uncertainty weights and with GradNorm (``XTaskLoss`` with a balance method:
the depth ("image") loss holds the CE of ``T_d→s(ŷ_depth)``, the segmentation ("label") loss the
L1 of ``T_s→d(ŷ_seg)``); only its unweighted branch groups by output space, where the sum of the
two losses, and so the gradient, is the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.tasks.base import Batch, pixel_mask, safe_div
from mtl_jax.tasks.depth import encode_depth

TARGETS = ("prediction", "ground_truth")
#: How the consistency CE treats the pixels whose ground-truth label is ignored (module doc).
CONSISTENCY_IGNORE = ("zero", "keep")


def masked_l1_per_image(pred_BxHxW: jax.Array, target_BxHxW: jax.Array,
                        mask_BxHxW: jax.Array) -> jax.Array:
    """Per-image ``Σ|p − g|·m / Σm``, averaged over the images with at least one pixel in the
    mask (0 when none has); float32 scalar. Masked-out pixels never reach the gradient."""
    mask = mask_BxHxW.astype(bool)
    diff = jnp.where(mask, jnp.abs(pred_BxHxW.astype(jnp.float32)
                                   - target_BxHxW.astype(jnp.float32)), 0.0)
    per_image = safe_div(diff.sum(axis=(1, 2)), mask.sum(axis=(1, 2)).astype(jnp.float32))
    has_pixels = mask.any(axis=(1, 2)).astype(jnp.float32)
    return safe_div(jnp.sum(per_image), jnp.sum(has_pixels))


def label_smoothing_ce(logits_BxHxWxC: jax.Array, labels_BxHxW: jax.Array,
                       mask_BxHxW: jax.Array, smoothing: float = 0.0,
                       count_BxHxW: jax.Array | None = None) -> jax.Array:
    """Cross-entropy against the smoothed one-hot targets (``1 − ε`` on the label, ``ε / (C −
    1)`` on every other class), summed over the masked pixels and divided by the number of
    pixels in ``count_BxHxW`` (default: the mask itself, i.e. the mean over the masked pixels;
    0 when the count is 0); float32 scalar. Labels outside ``[0, C)`` must be masked out (they
    are clipped before the lookup)."""
    logp = jax.nn.log_softmax(logits_BxHxWxC.astype(jnp.float32), axis=-1)
    num_classes = logp.shape[-1]
    labels = jnp.clip(labels_BxHxW.astype(jnp.int32), 0, num_classes - 1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    if smoothing:
        off = smoothing / max(num_classes - 1, 1)
        # Σ_c q_c (−log p_c) with q = off everywhere except 1 − ε on the label.
        ce = (1.0 - smoothing - off) * nll + off * (-jnp.sum(logp, axis=-1))
    else:
        ce = nll
    mask = mask_BxHxW.astype(bool)
    count = mask if count_BxHxW is None else count_BxHxW.astype(bool)
    return safe_div(jnp.sum(jnp.where(mask, ce, 0.0)),
                    jnp.sum(count).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class XTasCLossGroups:
    """The two loss groups (module docstring), as the train step's per-task losses.

    ``__call__(losses, preds, aux, batch, tasks) -> losses`` takes the tasks' own losses
    (``{task: scalar}``) and returns them with the ``seg`` and ``depth`` entries replaced by
    their groups; other tasks pass through. ``tasks`` maps names to task objects
    (:class:`~mtl_jax.tasks.semseg.SemSeg`, :class:`~mtl_jax.tasks.depth.Depth`).

    Fields: ``lambda_seg`` (λ₁, semseg group), ``lambda_depth`` (λ₂, depth group), ``target``
    (``'prediction'``: XTasC-Net, ``'ground_truth'``: Align-Net), ``label_smoothing`` (ε of
    ``CE_ls``), ``consistency_ignore`` (``'zero'``: the consistency CE's ground-truth-ignored
    pixels count 0 over all pixels, as the reference on Cityscapes; ``'keep'``: every pixel
    counts; module docstring), ``seg`` / ``depth`` (task names).
    """

    lambda_seg: float = 0.01
    lambda_depth: float = 0.01
    target: str = "prediction"
    label_smoothing: float = 0.0
    consistency_ignore: str = "zero"
    seg: str = "semseg"
    depth: str = "depth"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UserError(f"XTasC loss target must be one of {TARGETS}, got {self.target!r}")
        if self.consistency_ignore not in CONSISTENCY_IGNORE:
            raise UserError(f"XTasC consistency_ignore must be one of {CONSISTENCY_IGNORE}, "
                            f"got {self.consistency_ignore!r}")
        for name in ("lambda_seg", "lambda_depth", "label_smoothing"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise UserError(f"XTasC {name} must be in [0, 1], got {value}")

    def cross_terms(self, preds: Mapping[str, jax.Array], aux: Mapping[str, jax.Array],
                    batch: Batch, tasks: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``{'depth/from/semseg': L1ₘ term, 'semseg/from/depth': CE_ls term}`` (unweighted)."""
        seg, dep = self.seg, self.depth
        missing = [t for t in (seg, dep) if t not in tasks or t not in preds]
        keys = (f"{dep}/from/{seg}", f"{seg}/from/{dep}")
        missing += [k for k in keys if k not in aux]
        if missing:
            raise UserError(f"XTasC loss groups need the tasks {seg!r} and {dep!r} and the "
                            f"model's transferred predictions {keys}; missing: {missing}")
        depth_task, seg_task = tasks[dep], tasks[seg]
        scale = float(getattr(depth_task, "output_scale", 1.0))
        gt_BxHxW = jnp.asarray(batch[depth_task.label_key], jnp.float32)[..., 0]
        m_depth = pixel_mask(batch, gt_BxHxW > 0)
        transferred_depth = scale * aux[keys[0]][..., 0].astype(jnp.float32)
        if self.target == "prediction":
            depth_target = scale * jax.lax.stop_gradient(preds[dep][..., 0].astype(jnp.float32))
        else:
            depth_target = encode_depth(jnp.where(m_depth, gt_BxHxW, 1.0),
                                        getattr(depth_task, "encoding", "none"))
        l1 = masked_l1_per_image(transferred_depth, depth_target, m_depth)

        raw = jnp.asarray(batch[seg_task.label_key], jnp.int32)
        labelled = (raw >= 0) & (raw < preds[seg].shape[-1])
        labelled &= raw != getattr(seg_task, "ignore_index", -1)
        m_labelled = pixel_mask(batch, labelled)
        if self.target == "prediction":
            labels = jnp.argmax(jax.lax.stop_gradient(preds[seg]), axis=-1)
            m_all = pixel_mask(batch, jnp.ones(labels.shape, bool))
            m_seg = m_labelled if self.consistency_ignore == "zero" else m_all
            ce = label_smoothing_ce(aux[keys[1]], labels, m_seg, self.label_smoothing,
                                    count_BxHxW=m_all)
        else:
            ce = label_smoothing_ce(aux[keys[1]], raw, m_labelled, self.label_smoothing)
        return {keys[0]: l1, keys[1]: ce}

    def __call__(self, losses: Mapping[str, jax.Array], preds: Mapping[str, jax.Array],
                 aux: Mapping[str, jax.Array], batch: Batch, tasks: Mapping[str, Any]
                 ) -> dict[str, jax.Array]:
        terms = self.cross_terms(preds, aux, batch, tasks)
        seg, dep = self.seg, self.depth
        out = dict(losses)
        out[seg] = ((1.0 - self.lambda_seg) * losses[seg]
                    + self.lambda_seg * terms[f"{dep}/from/{seg}"])
        out[dep] = ((1.0 - self.lambda_depth) * losses[dep]
                    + self.lambda_depth * terms[f"{seg}/from/{dep}"])
        return out
