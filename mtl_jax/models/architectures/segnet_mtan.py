"""The architecture ``'segnet_mtan'``: MTAN on SegNet (Liu et al., CVPR 2019) and STAN.

Shared SegNet (``encoder``: ``ENCODERS['segnet']`` with ``outputs='all'``, Xavier-normal) →
MTAN's task attention (``mtan``: ``INTERACTIONS`` ``'mtan'``,
:class:`~mtl_jax.models.interaction.mtan.MTANAttention`, per task ``mtan/<task>`` plus the
shared ``mtan/shared_enc*`` / ``shared_dec*`` convs) → heads ``decoders/<task>``
(``DECODERS['segnet']``, :class:`~mtl_jax.models.decoders.segnet.SegNetHead`). STAN = the
same with one task.
Parameters: NYUv2 3 tasks 13 classes 44,229,073 (docs/models/segnet.md).

Gradient-based weighting goes through the coupled path (one VJP per task loss through all
non-encoder parameters), since the attention path's 3×3 convs are shared across tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.architectures.segnet_options import common, widths_of
from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.multitask import MultiTaskModel


def mtan_parts(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MultiTaskModel kwargs, precision)`` of MTAN without the encoder's latent module."""
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg)
    return dict(
        interaction=INTERACTIONS.lookup("mtan", "segnet")(tuple(tasks), widths, name="mtan",
                                                           **prec),
        decoders={t: DECODERS["segnet"](int(c), **prec) for t, c in tasks.items()},
        **extra), dict(prec, widths=widths)


def build_mtan(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """MTAN (or STAN with one task) for ``{task: channels}``; ``model_cfg``: ``width``, ..."""
    kwargs, prec = mtan_parts(model_cfg, tasks)
    return MultiTaskModel(encoder=ENCODERS["segnet"](outputs="all", **prec), **kwargs)
