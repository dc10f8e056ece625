"""The model interface, declared once: what the steps, the staging and the loops may call.

Every architecture in :data:`~mtl_jax.models.architectures.ARCHITECTURES` returns a
:class:`MultiTaskNet` (all of them are :class:`~mtl_jax.models.multitask.MultiTaskModel`
subclasses). Besides it, a model *may* have the optional hooks below; code outside the models
reads them only through the accessors here (:func:`loss_groups_of`, :func:`is_staged`), never
by probing attribute names, so every hook a model can have is listed on this page.

Optional hooks of a model:

* :class:`HasLossGroups` -- ``loss_groups``: the train step regroups the task losses with
  cross-task terms (XTasC-Net), ``None`` when there are none;
* :class:`Staged` -- ``stage_switch``, ``stage_one()``, ``stage_reset_prefixes()``: a model that
  changes at one step of the run (ATI-Net; :mod:`mtl_jax.staging`).

Optional hooks of the parts a model is made of:

* on an interaction module (``MultiTaskModel.interaction``): :class:`SideAligned` --
  ``side_align_corners``, how its side outputs are resized to the output size (PAD-Net's);
* on a decoder: :class:`StagedDecoder` -- ``stage_order``, ``side_scales``, ``stage``,
  ``side``, ``resize_side``: a decoder run stage by stage, with exchange blocks between stages
  (:class:`~mtl_jax.models.exchange.ExchangeMultiTaskModel`).

``tests/test_model_interface.py`` builds every registered architecture and checks it against
these declarations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax

Features = list[jax.Array]
Outputs = tuple[dict[str, jax.Array], dict[str, jax.Array]]


@runtime_checkable
class MultiTaskNet(Protocol):
    """The calls every model has (shapes: images ``[B, H, W, 3]`` float32 in [0, 1])."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names in task order (the order of ``preds`` and of ``decoders/<task>``)."""
        ...

    def __call__(self, image_BxHxWx3: jax.Array, train: bool) -> Outputs:
        """Images → (``{task: [B, H, W, C_task]}`` float32 at the input size, aux)."""
        ...

    def encode(self, image_BxHxWx3: jax.Array, train: bool) -> Features:
        """The shared part (parameters under ``encoder``): images → feature list."""
        ...

    def decode(self, features: Features, output_size: Sequence[int], train: bool) -> Outputs:
        """Everything after :meth:`encode`: features → (predictions, aux)."""
        ...

    def decode_task(self, features: Features, output_size: Sequence[int], task: str,
                    train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One task's head alone (prediction, aux); raises ``ValueError`` when the heads are
        not separable (gradient-based weighting then takes one VJP per task loss through all
        non-encoder parameters)."""
        ...


class LossGroups(Protocol):
    """``loss_groups(losses, preds, aux, batch, tasks) -> losses``: the task losses the
    weighting sees, regrouped with terms that need several tasks' predictions
    (:class:`~mtl_jax.tasks.cross_task.XTasCLossGroups`)."""

    def __call__(self, losses: Mapping[str, jax.Array], preds: Mapping[str, jax.Array],
                 aux: Mapping[str, jax.Array], batch: Mapping[str, Any],
                 tasks: Mapping[str, Any]) -> dict[str, jax.Array]:
        ...


@runtime_checkable
class HasLossGroups(Protocol):
    """Optional model hook: cross-task loss terms (``None``: the plain task losses). A model
    with loss groups trains through the coupled gradient path (one VJP per task loss)."""

    loss_groups: LossGroups | None


@runtime_checkable
class Staged(Protocol):
    """Optional model hook: staged training (:mod:`mtl_jax.staging`; ATI-Net).

    ``stage_switch`` is the fraction of ``num_train_steps`` after which the full model runs;
    the run is staged only when it lies in (0, 1).
    """

    stage_switch: float

    def stage_one(self) -> MultiTaskNet:
        """The model run before the switch: it runs on the full model's variables (it may
        leave some unused, e.g. ATI-Net's latent distillation) and gives the same outputs."""
        ...

    def stage_reset_prefixes(self) -> tuple[str, ...]:
        """Parameter paths (``'mtan/semseg'``, ``'decoders'``) re-initialised at the switch."""
        ...


@runtime_checkable
class SideAligned(Protocol):
    """Optional interaction-module hook: its side outputs (aux ``'<task>/side/<name>'``) are
    resized to the output size with aligned corners when True (default False)."""

    side_align_corners: bool


@runtime_checkable
class StagedDecoder(Protocol):
    """Optional decoder hook: the decoder runs stage by stage (DenseMTL's 3-ways decoder).

    ``stage_order`` lists the stages from the deepest; ``side_scales`` the stages whose side
    output is also returned.
    """

    stage_order: Sequence[int]
    side_scales: Sequence[int]

    def stage(self, stage: int, x: jax.Array | None, features: Features, train: bool
              ) -> jax.Array:
        """Run ``stage`` on the previous stage's output ``x`` (``None`` at the first)."""
        ...

    def side(self, scale: int, x: jax.Array) -> jax.Array:
        """The side prediction of stage ``scale`` from its output ``x`` (0: the prediction)."""
        ...

    def resize_side(self, y_BxhxwxC: jax.Array, output_size: Sequence[int]) -> jax.Array:
        """A side prediction resized to the output size."""
        ...


def loss_groups_of(model: Any) -> LossGroups | None:
    """The model's :class:`HasLossGroups` hook, ``None`` when it has none."""
    return model.loss_groups if isinstance(model, HasLossGroups) else None


def is_staged(model: Any) -> bool:
    """Whether ``model`` is :class:`Staged` with a switch inside the run."""
    return isinstance(model, Staged) and 0.0 < float(model.stage_switch) < 1.0


def side_align_corners(interaction: Any) -> bool:
    """The interaction module's :class:`SideAligned` hook (False when it has none)."""
    return bool(interaction.side_align_corners) if isinstance(interaction, SideAligned) \
        else False


def is_staged_decoder(decoder: Any) -> bool:
    """Whether a decoder (module or class) is a :class:`StagedDecoder`."""
    return all(hasattr(decoder, name) for name in ("stage_order", "stage", "side",
                                                   "resize_side"))
