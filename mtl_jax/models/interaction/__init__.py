"""Modules through which tasks exchange information, and their registry ``INTERACTIONS``.

Modules (one per file):

* :mod:`.xtam` -- :class:`XTAM`, DenseMTL's directional cross-task attention (source →
  target), the part of an mTEB;
* :mod:`.mteb` -- :class:`MTEB`, DenseMTL's multi-task exchange block (one xTAM per ordered
  task pair);
* :mod:`.padnet` -- :class:`PADNetDistillation` (PAD-Net's multi-modal distillation, same call
  as ``MTEB``), :class:`PADNetInteraction` (the PAD-Net baseline's initial heads +
  distillation), :class:`PADNetHead`;
* :mod:`.segnet_padnet` -- :class:`SegNetPADNet`, PAD-Net on MTAN's SegNet;
* :mod:`.mtan` -- :class:`MTANAttention`, MTAN's task attention over a shared SegNet;
* :mod:`.atinet` -- :class:`LatentDistillation`, ATI-Net's distillation on SegNet's
  bottleneck;
* :mod:`.cross_stitch` -- :class:`CrossStitchNetworks`, the Cross-stitch baseline's per-task
  networks and units;
* :mod:`.ttnet` -- :class:`TTNet`, XTasC-Net's task-transfer network (one task's prediction
  → another's).

``INTERACTIONS`` (a :class:`~mtl_jax.models.registry.Registry`) names them by slot -- where
they plug in and how they are called:

========== ====================================== =============================================
slot       names                                  call
========== ====================================== =============================================
pyramid    ``padnet``                             ``(pyramid features, train) -> ({task:
                                                  features}, aux)``, encoder → decoders
segnet     ``mtan``, ``segnet_padnet``,           ``(SegNet-family maps, train) -> ({task:
           ``cross_stitch``                       [feature]}, aux)``, encoder → decoders
exchange   ``mteb``, ``padnet``                   ``({task: x}, train) -> ({task: x}, aux)``,
                                                  between decoder stages
bottleneck ``atinet``                             ``(x, train) -> x`` on SegNet's pooled
                                                  bottleneck
transfer   ``ttnet``                              ``(prediction, train) -> prediction`` of
                                                  another task
========== ====================================== =============================================
"""

from mtl_jax.models.interaction.atinet import LatentDistillation
from mtl_jax.models.interaction.cross_stitch import CrossStitchNetworks
from mtl_jax.models.interaction.mtan import MTANAttention
from mtl_jax.models.interaction.mteb import MTEB
from mtl_jax.models.interaction.padnet import PADNetDistillation, PADNetHead, PADNetInteraction
from mtl_jax.models.interaction.segnet_padnet import SegNetPADNet
from mtl_jax.models.interaction.ttnet import TTNet
from mtl_jax.models.interaction.xtam import XTAM
from mtl_jax.models.registry import Registry

INTERACTIONS = Registry("interaction", {
    "pyramid": "(pyramid features, train) -> ({task: features}, aux)",
    "segnet": "(SegNet-family maps, train) -> ({task: [feature]}, aux)",
    "exchange": "({task: x}, train) -> ({task: x}, aux), between decoder stages",
    "bottleneck": "(x, train) -> x, on SegNet's pooled bottleneck",
    "transfer": "(prediction, train) -> another task's prediction",
})
INTERACTIONS.register("pyramid", "padnet", PADNetInteraction)
INTERACTIONS.register("segnet", "mtan", MTANAttention)
INTERACTIONS.register("segnet", "segnet_padnet", SegNetPADNet)
INTERACTIONS.register("segnet", "cross_stitch", CrossStitchNetworks)
INTERACTIONS.register("exchange", "mteb", MTEB)
INTERACTIONS.register("exchange", "padnet", PADNetDistillation)
INTERACTIONS.register("bottleneck", "atinet", LatentDistillation)
INTERACTIONS.register("transfer", "ttnet", TTNet)

__all__ = ["INTERACTIONS", "MTEB", "XTAM", "CrossStitchNetworks", "LatentDistillation",
           "MTANAttention", "PADNetDistillation", "PADNetHead", "PADNetInteraction",
           "SegNetPADNet", "TTNet"]
