"""Multi-task architectures: one shared encoder, an optional interaction module, one decoder per
task.

* Single-task learning (STL) = one ``MultiTaskModel`` with one task, trained on its own; a
  single-task baseline is one such model per task (``SingleTaskModel`` is an alias).
* Hard-sharing MTL = ``MultiTaskModel`` with several tasks and ``interaction=None``.
* Interaction modules (xTAM/mTEB, PAD-Net distillation, ...) plug in between encoder and
  decoders.

Parameter tree: ``encoder``, ``decoders/<task>``, and the
interaction module under its own name (``interaction`` unless it was constructed with an
explicit ``name=``, e.g. ``name='exchange'``, which is kept). Gradient-based weighting selects
parts by these paths, and can run the two halves separately::

    feats = model.apply(variables, image, train=False, method=model.encode)
    preds, aux = model.apply(variables, feats, (H, W), train=False, method=model.decode)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.interface import Features, side_align_corners
from mtl_jax.models.layers import resize_bilinear

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _TaskDecoders(nn.Module):
    """Container whose children are the task decoders, named by task (``decoders/<task>``)."""

    decoders: tuple[tuple[str, nn.Module], ...]

    def setup(self) -> None:
        # Clone each template under its task name so the parameter path is decoders/<task>.
        self.heads = {task: dec.clone(parent=self, name=task) for task, dec in self.decoders}

    def __call__(
        self,
        task_features: Mapping[str, Features],
        output_size: tuple[int, int],
        train: bool,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        preds, aux = {}, {}
        for task, _ in self.decoders:
            pred, task_aux = self.heads[task](task_features[task], output_size, train=train)
            preds[task] = pred.astype(jnp.float32)
            aux.update({f"{task}/{key}": value for key, value in task_aux.items()})
        return preds, aux

    def decode_one(self, task: str, features: Features, output_size: tuple[int, int],
                   train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        pred, task_aux = self.heads[task](features, output_size, train=train)
        return pred.astype(jnp.float32), {f"{task}/{k}": v for k, v in task_aux.items()}


class MultiTaskModel(nn.Module):
    """Shared encoder → optional interaction → one decoder per task.

    Attributes:
      encoder: maps a standardised ``[B, H, W, 3]`` image to a list of feature maps.
      decoders: ``{task: decoder}`` (insertion order = task order), each called as
        ``decoder(features, (H, W), train) -> (pred_BxHxWxC, aux)``.
      interaction: ``None``, or a module called as ``interaction(features, train) ->
        (task_features, aux)`` where ``task_features`` is either one shared feature list or a
        ``{task: feature list}`` dict.
      pixel_mean, pixel_std: per-channel standardisation applied inside the model to images in
        [0, 1] (ImageNet statistics by default).
      dtype: computation dtype of the standardised image handed to the encoder.
    """

    encoder: nn.Module
    decoders: Mapping[str, nn.Module]
    interaction: nn.Module | None = None
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD
    dtype: Dtype = jnp.float32

    # Keep explicit names of adopted submodules (e.g. an interaction module named 'exchange').
    preserve_adopted_names = True

    def setup(self) -> None:
        if not self.decoders:
            raise ValueError("MultiTaskModel needs at least one task decoder")
        self.task_decoders = _TaskDecoders(
            tuple(self.decoders.items()), parent=self, name="decoders"
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names in decoder order."""
        return tuple(self.decoders.keys())

    def encode(self, image_BxHxWx3: jax.Array, train: bool) -> Features:
        """Images float32 in [0, 1], ``[B, H, W, 3]`` → shared feature list (encoder order)."""
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        x_BxHxWx3 = ((image_BxHxWx3.astype(jnp.float32) - mean) / std).astype(self.dtype)
        return list(self.encoder(x_BxHxWx3, train=train))

    def decode(
        self, features: Features, output_size: Sequence[int], train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Shared features → (``{task: [B, H, W, C_task]}`` float32 at ``output_size``, aux).

        Aux keys are namespaced: ``'<task>/<key>'`` for decoder outputs, ``'<module>/<key>'`` for
        the interaction module's. Side outputs -- extra predictions of a task that its loss
        also supervises -- are ``'<task>/side/<name>'`` (from a decoder's ``'side/<name>'`` or
        an interaction's ``'<task>/side/<name>'``), float32 at ``output_size`` (at their own
        resolution from a decoder that does not resize them, ``three_ways`` with
        ``resize_sides=False``).
        """
        output_size = (int(output_size[0]), int(output_size[1]))
        aux: dict[str, jax.Array] = {}
        task_features: Mapping[str, Features] = {task: features for task in self.tasks}
        if self.interaction is not None:
            shared_or_per_task, inter_aux = self.interaction(features, train=train)
            if isinstance(shared_or_per_task, Mapping):
                task_features = shared_or_per_task
            else:
                task_features = {task: shared_or_per_task for task in self.tasks}
            # The reference's resize convention for the module's side outputs (PAD-Net's).
            align = side_align_corners(self.interaction)
            for key, value in inter_aux.items():
                if is_side_output(key, self.tasks):  # '<task>/side/<name>': a prediction
                    aux[key] = resize_bilinear(value.astype(jnp.float32), output_size,
                                               align_corners=align)
                else:
                    aux[f"{self.interaction.name}/{key}"] = value
        preds, dec_aux = self.task_decoders(task_features, output_size, train=train)
        aux.update(dec_aux)
        return preds, aux

    def decode_task(
        self, features: Features, output_size: Sequence[int], task: str, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One task's decoder alone (models without an interaction module): its prediction
        ``[B, H, W, C_task]`` float32 and aux. Lets the train step take one VJP per decoder."""
        if self.interaction is not None:
            raise ValueError("decode_task needs separable decoders; this model has an "
                             "interaction module that mixes the tasks")
        output_size = (int(output_size[0]), int(output_size[1]))
        return self.task_decoders.decode_one(task, features, output_size, train=train)

    def __call__(
        self, image_BxHxWx3: jax.Array, train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Images ``[B, H, W, 3]`` in [0, 1] → (``{task: [B, H, W, C_task]}`` float32, aux)."""
        features = self.encode(image_BxHxWx3, train=train)
        return self.decode(features, image_BxHxWx3.shape[1:3], train=train)


def is_side_output(key: str, tasks: Sequence[str]) -> bool:
    """Whether aux ``key`` is a side output, ``'<task>/side/<name>'`` (side outputs are
    extra predictions of a task, at the output size, that its loss also supervises)."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] in tasks and parts[1] == "side"


def side_outputs(aux: Mapping[str, jax.Array], task: str) -> dict[str, jax.Array]:
    """``{name: prediction}`` of ``task``'s side outputs in ``aux`` (sorted by name)."""
    prefix = f"{task}/side/"
    return {k[len(prefix):]: aux[k] for k in sorted(aux) if k.startswith(prefix)}


def attention_masks(aux: Mapping[str, jax.Array], tasks: Sequence[str]) -> dict[str, jax.Array]:
    """``{'<task>/<block>': mask}`` for the attention masks in ``aux`` (keys
    ``'<task>/attention/<block>'``, ``[B, h, w, C]`` in [0, 1], e.g. AdaMT-Net's decoders),
    sorted by key."""
    out = {}
    for key in sorted(aux):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in tasks and parts[1] == "attention":
            out[f"{parts[0]}/{parts[2]}"] = aux[key]
    return out


def transferred_outputs(aux: Mapping[str, jax.Array], task: str) -> dict[str, jax.Array]:
    """``{source: prediction}`` of ``task`` transferred from other tasks' predictions (aux
    ``'<task>/from/<source>'``, XTasC-Net's TTNets; in ``task``'s output space, sorted)."""
    prefix = f"{task}/from/"
    return {k[len(prefix):]: aux[k] for k in sorted(aux)
            if k.startswith(prefix) and "/" not in k[len(prefix):]}


SingleTaskModel = MultiTaskModel
"""STL baseline: a ``MultiTaskModel`` with exactly one task, one model per task."""
