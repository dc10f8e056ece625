"""The architecture ``'segnet_mtan'``: MTAN on SegNet (Liu et al., CVPR 2019) and STAN.

Shared SegNet (``encoder``: ``SegNet(outputs='all')``, Xavier-normal) → MTAN's task attention
(``mtan``: :class:`~mtl_jax.models.interaction.mtan.MTANAttention`, per task ``mtan/<task>``
plus the shared ``mtan/shared_enc*`` / ``shared_dec*`` convs) → heads ``decoders/<task>``
(:class:`~mtl_jax.models.decoders.segnet.SegNetHead`). STAN = the same with one task.
Parameters: NYUv2 3 tasks 13 classes 44,229,073 (SPEC §4.3).

Gradient-based weighting goes through the coupled path (one VJP per task loss through all
non-encoder parameters), since the attention path's 3×3 convs are shared across tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.decoders.segnet import SegNetHead
from mtl_jax.models.encoders.segnet import SegNet
from mtl_jax.models.interaction.mtan import MTANAttention
from mtl_jax.models.multitask import MultiTaskModel
from mtl_jax.models.segnet_common import common, widths_of


def mtan_parts(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MultiTaskModel kwargs, precision)`` of MTAN without the encoder's latent module."""
    prec, extra = common(model_cfg)
    widths = widths_of(model_cfg)
    return dict(
        interaction=MTANAttention(tuple(tasks), widths, name="mtan", **prec),
        decoders={t: SegNetHead(int(c), **prec) for t, c in tasks.items()},
        **extra), dict(prec, widths=widths)


def build_mtan(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """MTAN (or STAN with one task) for ``{task: channels}``; ``model_cfg``: ``width``, ..."""
    kwargs, prec = mtan_parts(model_cfg, tasks)
    return MultiTaskModel(encoder=SegNet(outputs="all", **prec), **kwargs)
