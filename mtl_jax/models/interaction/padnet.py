"""PAD-Net multi-modal distillation and the PAD-Net baseline's modules (docs/models/segnet.md,
docs/models/densemtl.md).

* :class:`PADNetDistillation` -- for each target task t:
  f̃_t = f_t + Σ_{a≠t} conv3×3(f_a) ⊙ sigmoid(conv3×3(f_a))  (bias-free convs, C → C), i.e.
  every other task sends its feature through a learned self-attention gate (PAD-Net's
  "attention-guided message passing", as in the MTL survey's code). Same call signature as
  :class:`~mtl_jax.models.interaction.mteb.MTEB`, so it replaces the mTEB in a staged decoder
  (the "3-ways PAD-Net" baseline) -- submodules ``<a>_to_<t>``.
* :class:`PADNetInteraction` -- the PAD-Net baseline of DenseMTL's tables (MTL survey layout):
  on the encoder's deepest feature, per task two Bottleneck blocks (2048 → 256 → 256, the first
  with a 1×1 conv + BN shortcut) give a task feature and, through a 1×1 conv with bias, an
  *initial prediction* (deep supervision: returned as the side output ``<task>/side/initial``);
  the task features are distilled by :class:`PADNetDistillation` and handed to the task heads.
* :class:`PADNetHead` -- the final per-task head: two Bottleneck blocks (256 → 256), a 1×1 conv
  with bias, bilinear upsampling to the output size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.encoders.resnet import Bottleneck
from mtl_jax.models.initializers import torch_default_kernel_init
from mtl_jax.models.layers import conv, resize_bilinear

Dtype = Any


class PADNetDistillation(nn.Module):
    """PAD-Net distillation over ``tasks`` (≥ 2) of same-shape features (module docstring)."""

    tasks: Sequence[str]
    use_bias: bool = False  # the SegNet PAD-Net / ATI-Net codes use biased convs
    kernel_init: Any = torch_default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], train: bool = False
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        del train  # no batch statistics
        tasks = tuple(self.tasks)
        if len(tasks) < 2:
            raise ValueError(f"PAD-Net distillation needs at least 2 tasks, got {tasks}")
        kw = dict(kernel_init=self.kernel_init, use_bias=self.use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        out = {}
        for t in tasks:
            f_t = features[t].astype(jnp.float32)
            for a in tasks:
                if a == t:
                    continue
                f_a = features[a].astype(self.dtype)
                c = features[t].shape[-1]
                msg = conv(c, 3, name=f"{a}_to_{t}_feat", **kw)(f_a).astype(jnp.float32)
                gate = nn.sigmoid(conv(c, 3, name=f"{a}_to_{t}_mask", **kw)(f_a)
                                  .astype(jnp.float32))
                f_t = f_t + msg * gate
            out[t] = f_t.astype(self.dtype)
        return out, {}


def _bottlenecks(x: jax.Array, width: int, train: bool, names: Sequence[str], dtype: Dtype,
                 param_dtype: Dtype) -> jax.Array:
    """Two Bottleneck blocks to ``width`` channels (planes = width / 4); the first gets a
    1×1 conv + BN shortcut when the channels change."""
    for index, name in enumerate(names):
        x = Bottleneck(width // 4, downsample=index == 0 and x.shape[-1] != width, name=name,
                       dtype=dtype, param_dtype=param_dtype)(x, train)
    return x


class PADNetInteraction(nn.Module):
    """PAD-Net's initial task heads + distillation (see the module docstring).

    Interaction contract of :class:`~mtl_jax.models.multitask.MultiTaskModel`:
    ``(features, train) -> ({task: [distilled feature]}, aux)`` with aux
    ``'<task>/side/initial'`` = the initial prediction at the encoder's resolution (the model
    resizes side outputs to the output size).

    Attributes:
      task_channels: ``((task, output channels), ...)`` in task order.
      width: channels of the task features (256).
      side_align_corners: how the model resizes the initial predictions to the output size
        (read by ``MultiTaskModel.decode``): ``True`` (default) as DenseMTL's PAD-Net baseline,
        whose losses resize them with ``align_corners=True``; the final predictions are
        resized with half-pixel centres, as its ``resize_input(..., False)``.
    """

    task_channels: Sequence[tuple[str, int]]
    width: int = 256
    side_align_corners: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool
                 ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deepest = features[-1].astype(self.dtype)
        task_feats, aux = {}, {}
        for task, channels in self.task_channels:
            f = _bottlenecks(deepest, self.width, train, (f"{task}_block0", f"{task}_block1"),
                             **kw)
            task_feats[task] = f
            aux[f"{task}/side/initial"] = conv(
                int(channels), 1, use_bias=True, kernel_init=torch_default_kernel_init,
                name=f"{task}_initial", **kw)(f).astype(jnp.float32)
        distilled, _ = PADNetDistillation(tuple(task_feats), name="distillation", **kw)(
            task_feats, train)
        return {t: [x] for t, x in distilled.items()}, aux


class PADNetHead(nn.Module):
    """PAD-Net's final task head; decoder contract ``(features, output_size, train) ->
    (prediction float32 [B, H, W, out_channels], {})`` reading ``features[-1]``."""

    out_channels: int = 1
    width: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], output_size: Sequence[int], train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = _bottlenecks(features[-1].astype(self.dtype), self.width, train,
                         ("block0", "block1"), self.dtype, self.param_dtype)
        logits = conv(self.out_channels, 1, use_bias=True, kernel_init=torch_default_kernel_init,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return resize_bilinear(logits.astype(jnp.float32), output_size), {}
