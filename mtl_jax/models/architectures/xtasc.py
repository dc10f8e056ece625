"""The architecture ``'xtasc'``: XTasC-Net (docs/models/xtasc.md) and its baselines.

ResNet encoder → one U-Net decoder per task (five blocks of 3 × (conv3×3 + BN + ReLU) at 128
channels, aligned-corner bilinear ×2, :class:`~mtl_jax.models.decoders.unet.UNetDecoder`) →
for XTasC-Net and Align-Net two task-transfer networks
(:class:`~mtl_jax.models.interaction.ttnet.TTNet`) seg → depth (log-softmax of the segmentation
logits in) and depth → seg (the raw depth in). The transferred predictions are returned in
``aux`` as ``'<target>/from/<source>'`` (``'depth/from/semseg'``, ``'semseg/from/depth'``), at
the input size; the train step's loss groups
(:class:`~mtl_jax.tasks.cross_task.XTasCLossGroups`, exposed as the model's ``loss_groups``)
supervise them, the eval step scores them against the ground truth and against the direct
prediction, and the prediction pictures show them.

``build_xtasc(model_cfg, {task: channels})`` reads these ``config.model`` keys:

* ``variant``: ``'xtasc'`` (default; consistency with the stop-gradient of the other task's
  prediction) | ``'align'`` (Align-Net: against the ground truth) | ``'mt'`` (Base MT-Net:
  λ = 0, no TTNets) | ``'st'`` (Base ST-Net: one task, no TTNets);
* ``lambda_seg`` / ``lambda_depth`` (λ₁ / λ₂, default 0.01; the paper's NYUv2 value is 1e-4),
  ``label_smoothing`` (ε of the transferred segmentation loss, default 0),
  ``consistency_ignore`` (``'zero'``, default: the consistency CE's pixels with an ignored
  ground-truth label count 0 and the sum is divided by all pixels, as the reference's Cityscapes
  script | ``'keep'``: every pixel counts, as its NYUv2 script;
  :mod:`~mtl_jax.tasks.cross_task`);
* ``seg_task`` / ``depth_task`` (default ``'semseg'`` / ``'depth'``);
* ``encoder`` (default ``'resnet34'``), ``encoder_kwargs``;
* ``decoder_kwargs`` (``UNetDecoder`` fields; defaults ``features=128, hidden_features=128,
  convs_per_block=3, align_corners=True``), ``ttnet_kwargs`` (``TTNet`` fields: ``features``,
  ``use_bn``);
* ``init``: ``'xavier_normal'`` (default: the reference initialises every decoder and TTNet conv
  with PyTorch's ``xavier_normal_``) | ``'torch_default'`` | any name in
  :data:`~mtl_jax.models.initializers.INITIALIZERS`;
* ``dtype``, ``param_dtype``, ``pixel_mean``, ``pixel_std`` (:mod:`~mtl_jax.models.options`).

Parameters: ``encoder``, ``decoders/<task>``, ``transfer/<source>_to_<target>``. ResNet-34,
Cityscapes 7 classes: 31,553,344 (encoder 21,284,672; seg decoder 3,250,688; depth decoder
3,249,920; TTNet seg → depth 1,885,568; depth → seg 1,882,496).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.initializers import INITIALIZERS
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.interface import Features
from mtl_jax.models.multitask import MultiTaskModel
from mtl_jax.models.options import as_dict, pixel_stats, precision
from mtl_jax.tasks.cross_task import XTasCLossGroups

#: ``model.variant`` (``configs/xtasc.py``'s ``model=``): XTasC-Net, Align-Net, Base MT-Net,
#: Base ST-Net.
VARIANTS = ("xtasc", "align", "mt", "st")


class _Transfers(nn.Module):
    """Container of the TTNets, named ``<source>_to_<target>`` (``transfer/<a>_to_<b>``)."""

    nets: tuple[tuple[str, nn.Module], ...]

    def setup(self) -> None:
        self.by_name = {name: net.clone(parent=self, name=name) for name, net in self.nets}

    def __call__(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        return self.by_name[name](x, train=train)


class XTasCNet(MultiTaskModel):
    """Encoder → per-task decoders (:class:`MultiTaskModel`) → TTNets on the predictions.

    Attributes (besides :class:`MultiTaskModel`'s):
      transfers: ``((source, target, TTNet), ...)``; empty for the baselines.
      loss_groups: the train step's hook -- ``loss_groups(losses, preds, aux, batch, tasks) ->
        losses`` regroups the task losses with the cross-task terms; ``None`` for the baselines.
    """

    transfers: tuple[tuple[str, str, nn.Module], ...] = ()
    loss_groups: Any = None

    def setup(self) -> None:
        super().setup()
        if self.transfers:
            self.transfer = _Transfers(
                tuple((f"{src}_to_{tgt}", net) for src, tgt, net in self.transfers),
                parent=self, name="transfer")

    def decode(self, features: Features, output_size: Sequence[int], train: bool
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Shared features → (predictions, aux with ``'<target>/from/<source>'``)."""
        preds, aux = super().decode(features, output_size, train)
        for src, tgt, _ in self.transfers:
            aux[f"{tgt}/from/{src}"] = self.transfer(f"{src}_to_{tgt}", preds[src], train)
        return preds, aux

    def decode_task(self, features: Features, output_size: Sequence[int], task: str,
                    train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.transfers:
            raise ValueError("decode_task needs separable heads; XTasC-Net's TTNets couple the "
                             "tasks")
        return super().decode_task(features, output_size, task, train)


def build_xtasc(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> XTasCNet:
    """XTasC-Net or one of its baselines for ``{task: channels}`` (module docstring)."""
    variant = model_cfg.get("variant", "xtasc") or "xtasc"
    if variant not in VARIANTS:
        raise ValueError(f"unknown xtasc variant {variant!r}; valid: {VARIANTS}")
    make_encoder = ENCODERS.lookup(model_cfg.get("encoder", "resnet34"), "pyramid", "encoder")
    init_name = model_cfg.get("init", "xavier_normal") or "xavier_normal"
    if init_name not in INITIALIZERS:
        raise ValueError(f"unknown xtasc init {init_name!r}; valid: {sorted(INITIALIZERS)}")
    seg = model_cfg.get("seg_task", "semseg") or "semseg"
    dep = model_cfg.get("depth_task", "depth") or "depth"
    if variant == "st" and len(tasks) != 1:
        raise ValueError(f"xtasc variant 'st' (Base ST-Net) trains one task, got {list(tasks)}")
    if variant in ("xtasc", "align") and not (seg in tasks and dep in tasks):
        raise ValueError(f"xtasc variant {variant!r} needs the tasks {seg!r} and {dep!r} "
                         f"(got {list(tasks)}); use variant 'mt' or 'st' otherwise")
    prec = precision(model_cfg)
    kernel_init = INITIALIZERS[init_name]

    encoder = make_encoder(**as_dict(model_cfg.get("encoder_kwargs", None)), **prec)
    dec_kwargs = dict(features=128, hidden_features=128, convs_per_block=3, align_corners=True,
                      kernel_init=kernel_init)
    dec_kwargs.update(as_dict(model_cfg.get("decoder_kwargs", None)))
    decoders = {task: DECODERS["unet"](out_channels=int(ch), **dec_kwargs, **prec)
                for task, ch in tasks.items()}
    transfers: tuple = ()
    loss_groups = None
    if variant in ("xtasc", "align"):
        ttnet = INTERACTIONS.lookup("ttnet", "transfer")
        tt_kwargs = dict(kernel_init=kernel_init)
        tt_kwargs.update(as_dict(model_cfg.get("ttnet_kwargs", None)))
        transfers = (
            (seg, dep, ttnet(out_channels=int(tasks[dep]), log_softmax_input=True, **tt_kwargs,
                             **prec)),
            (dep, seg, ttnet(out_channels=int(tasks[seg]), log_softmax_input=False,
                             **tt_kwargs, **prec)),
        )
        loss_groups = XTasCLossGroups(
            lambda_seg=float(model_cfg.get("lambda_seg", 0.01)),
            lambda_depth=float(model_cfg.get("lambda_depth", 0.01)),
            target="prediction" if variant == "xtasc" else "ground_truth",
            label_smoothing=float(model_cfg.get("label_smoothing", 0.0)),
            consistency_ignore=model_cfg.get("consistency_ignore", "zero") or "zero",
            seg=seg, depth=dep)
    return XTasCNet(encoder=encoder, decoders=decoders, transfers=transfers,
                    loss_groups=loss_groups, dtype=prec["dtype"], **pixel_stats(model_cfg))
