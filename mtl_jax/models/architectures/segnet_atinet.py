"""The architecture ``'segnet_atinet'``: ATI-Net = MTAN + latent distillation.

:mod:`~mtl_jax.models.architectures.segnet_mtan` whose SegNet runs
:class:`~mtl_jax.models.interaction.atinet.LatentDistillation` (``INTERACTIONS`` ``'atinet'``,
slot ``'bottleneck'``; parameters ``encoder/latent``) on the
pooled bottleneck; its output (the mean of the tasks' re-encoded distilled features)
**replaces** the bottleneck entering the shared decoder, as the paper describes (the released
code discards it). Parameters: NYUv2 3 tasks 13 classes 45,716,497.

Staged training (:mod:`mtl_jax.staging`): ``config.model.stage_switch`` (default 0.5) is the
fraction of ``num_train_steps`` after which the distillation path switches on; before it the
bottleneck goes straight to the decoder (:meth:`ATINet.stage_one`). At the switch the
task-specific attention modules ``mtan/<task>`` and the heads ``decoders/<task>`` are
re-initialised (:meth:`ATINet.stage_reset_prefixes`). ``stage_switch=0`` trains with the
distillation on from the start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.architectures.segnet_mtan import mtan_parts
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.multitask import MultiTaskModel


class ATINet(MultiTaskModel):
    """MTAN with ATI-Net's latent distillation inside its SegNet (module docstring).

    Staging protocol (read by :mod:`mtl_jax.staging`): ``stage_switch`` (fraction of the run),
    ``stage_one()`` (the same model and parameters, distillation bypassed) and
    ``stage_reset_prefixes()`` (parameter paths re-initialised at the switch).
    """

    stage_switch: float = 0.5

    def stage_one(self) -> ATINet:
        return self.clone(encoder=self.encoder.clone(use_latent=False))

    def stage_reset_prefixes(self) -> tuple[str, ...]:
        return (*(f"mtan/{t}" for t in self.decoders), "decoders")


def build_atinet(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> ATINet:
    """ATI-Net for ``{task: channels}`` (≥ 2 tasks); ``model_cfg``: ``width``,
    ``stage_switch``, ..."""
    if len(tasks) < 2:
        raise ValueError("segnet_atinet distils between tasks: it needs at least 2 tasks")
    switch = float(model_cfg.get("stage_switch", 0.5))
    if not 0.0 <= switch < 1.0:
        raise ValueError(f"model.stage_switch must be in [0, 1), got {switch}")
    kwargs, prec = mtan_parts(model_cfg, tasks)
    latent = INTERACTIONS.lookup("atinet", "bottleneck")(
        tuple(tasks), prec["widths"], dtype=prec["dtype"], param_dtype=prec["param_dtype"],
        name="latent")
    return ATINet(encoder=ENCODERS["segnet"](outputs="all", latent=latent, **prec),
                  stage_switch=switch, **kwargs)
