"""Multi-task models whose task decoders exchange information between decoder stages.

``ExchangeMultiTaskModel`` runs staged decoders (decoders exposing ``stage_order``,
``stage(i, x, features, train)`` and ``side(k, x)``, e.g.
:class:`~mtl_jax.models.decoders.three_ways.ThreeWaysDecoder`) stage by stage, all tasks in
lock step, and after each stage listed in ``exchanges`` replaces the task features by the
output of that stage's exchange block (:class:`~mtl_jax.models.interaction.mteb.MTEB`,
:class:`~mtl_jax.models.interaction.padnet.PADNetDistillation`, or any module with the call
``block({task: x}, train) -> ({task: x}, aux)``). DenseMTL = ResNet-101 (OS16) + one
ThreeWaysDecoder per task + one mTEB at stage 1.

Side outputs: after stage k, for k in a decoder's ``side_scales``, the decoder's side output k
of the *pre-exchange* feature is returned as aux ``'<task>/side/<k>'`` (bilinearly resized to
the output size by the decoder's ``resize_side``: aligned corners, as DenseMTL's losses; left at
stage k's resolution by a decoder with ``resize_sides=False``, and so is its prediction): the
half-resolution prediction that DenseMTL supervises before the exchange
(its released code reports it as the final result; we report scale 0). The prediction is
side output 0 of the last stage.

Parameter tree: ``encoder``, ``decoders/<task>``, ``exchange_stage<k>`` per exchange block.
Without exchange blocks this is the plain multi-task baseline (MTL) with the same decoders,
and :meth:`decode_task` runs one decoder alone (gradient-based loss weighting needs that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.interface import Features, is_staged_decoder
from mtl_jax.models.multitask import MultiTaskModel


class ExchangeMultiTaskModel(MultiTaskModel):
    """Shared encoder → staged task decoders with exchange blocks between stages.

    Attributes (besides ``MultiTaskModel``'s; ``interaction`` must stay ``None``):
      exchanges: ``((stage, block), ...)``: an exchange block after each listed stage.
    """

    exchanges: Sequence[tuple[int, nn.Module]] = ()

    def setup(self) -> None:
        super().setup()
        if self.interaction is not None:
            raise ValueError("ExchangeMultiTaskModel takes exchange blocks, not an interaction")
        first = next(iter(self.decoders.values()))
        order = tuple(first.stage_order) if is_staged_decoder(first) else ()
        if not order:
            raise ValueError(f"exchange blocks need staged decoders (with stage_order/stage/"
                             f"side); {type(first).__name__} is not one")
        for stage, _ in self.exchanges:
            if stage not in order:
                raise ValueError(f"exchange stage {stage} is not a decoder stage {order}")
        self.blocks = {int(stage): block.clone(parent=self, name=f"exchange_stage{stage}")
                       for stage, block in self.exchanges}

    def _run(self, features: Features, output_size: Sequence[int], tasks: Sequence[str],
             train: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        heads = self.task_decoders.heads
        size = (int(output_size[0]), int(output_size[1]))
        xs: dict[str, Any] = {t: None for t in tasks}
        aux: dict[str, jax.Array] = {}
        order = next(iter(self.decoders.values())).stage_order
        for stage in order:
            xs = {t: heads[t].stage(stage, xs[t], features, train) for t in tasks}
            for t in tasks:
                if stage in heads[t].side_scales:
                    aux[f"{t}/side/{stage}"] = heads[t].resize_side(heads[t].side(stage, xs[t]),
                                                                    size)
            if stage in self.blocks:
                xs, block_aux = self.blocks[stage](xs, train)
                aux.update({f"exchange_stage{stage}/{k}": v for k, v in block_aux.items()})
        preds = {t: heads[t].resize_side(heads[t].side(0, xs[t]), size).astype(jnp.float32)
                 for t in tasks}
        return preds, aux

    def decode(self, features: Features, output_size: Sequence[int], train: bool
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Shared features → (``{task: [B, H, W, C_task]}`` float32, aux with side outputs)."""
        return self._run(features, output_size, self.tasks, train)

    def decode_task(self, features: Features, output_size: Sequence[int], task: str,
                    train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One task's decoder alone (only without exchange blocks)."""
        if self.blocks:
            raise ValueError("decode_task needs separable decoders; this model has exchange "
                             "blocks that mix the tasks")
        preds, aux = self._run(features, output_size, (task,), train)
        return preds[task], aux


#: DenseMTL's (channels, downscale) of an exchange block at each decoder stage;
#: the channels come from the decoder, the downscale s from this table by default.
STAGE_DOWNSCALE: Mapping[int, int] = {4: 1, 3: 1, 2: 2, 1: 4, 0: 8}
