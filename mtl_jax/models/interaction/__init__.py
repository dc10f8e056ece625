"""Modules through which tasks exchange information.

* :class:`XTAM` -- DenseMTL's directional cross-task attention (source → target);
* :class:`MTEB` -- DenseMTL's multi-task exchange block (one xTAM per ordered task pair);
* :class:`PADNetDistillation` -- PAD-Net's multi-modal distillation (same call as ``MTEB``);
* :class:`PADNetInteraction` -- the PAD-Net baseline's initial heads + distillation;
* :class:`TTNet` -- XTasC-Net's task-transfer network (one task's prediction → another's).
"""

from mtl_jax.models.interaction.mteb import MTEB
from mtl_jax.models.interaction.padnet import PADNetDistillation, PADNetHead, PADNetInteraction
from mtl_jax.models.interaction.ttnet import TTNet
from mtl_jax.models.interaction.xtam import XTAM

__all__ = ["MTEB", "XTAM", "PADNetDistillation", "PADNetHead", "PADNetInteraction", "TTNet"]
