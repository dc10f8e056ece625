"""Whole models, one file per family, and their registry ``ARCHITECTURES``.

``config.model.architecture`` names a builder here (default ``'multitask'``). A builder is
``builder(model_cfg, tasks) -> model`` with ``tasks = {task: output channels}`` in task order;
it reads the keys of ``model_cfg`` it knows (and ignores the others), raises ``ValueError``
for bad values, builds its parts through the part registries (``ENCODERS``, ``DECODERS``,
``INTERACTIONS``) and returns a model that follows
:class:`~mtl_jax.models.interface.MultiTaskNet` (and any optional hooks it has, declared
there).

============================ ========================== ======================================
name                         file                       model
============================ ========================== ======================================
``multitask``                :mod:`.composed`           encoder → interaction/exchange →
                                                        decoders, each part by name
``adamt``                    :mod:`.adamt`              AdaMT-Net and its ablations
``xtasc``                    :mod:`.xtasc`              XTasC-Net and its baselines
``segnet_split``             :mod:`.segnet_baselines`   SegNet STL / Split standard|deep|wide
``segnet_dense``             :mod:`.segnet_baselines`   MTAN's Dense baseline
``segnet_cross_stitch``      :mod:`.segnet_baselines`   MTAN's Cross-stitch baseline
``segnet_padnet``            :mod:`.segnet_baselines`   PAD-Net on SegNet
``segnet_mtan``              :mod:`.segnet_mtan`        MTAN / STAN
``segnet_atinet``            :mod:`.segnet_atinet`      ATI-Net (staged training)
============================ ========================== ======================================

Adding an architecture is one file here (its parts registered by kind under ``encoders/``,
``decoders/``, ``interaction/``) plus one line in ``ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from mtl_jax.models.architectures.adamt import build_adamt
from mtl_jax.models.architectures.composed import build_multitask
from mtl_jax.models.architectures.segnet_atinet import build_atinet
from mtl_jax.models.architectures.segnet_baselines import (
    build_cross_stitch,
    build_dense,
    build_padnet,
    build_split,
)
from mtl_jax.models.architectures.segnet_mtan import build_mtan
from mtl_jax.models.architectures.xtasc import build_xtasc

Builder = Callable[[Mapping[str, Any], Mapping[str, int]], nn.Module]

#: name -> builder(model_cfg, {task: channels}); ``config.model.architecture`` picks one.
ARCHITECTURES: dict[str, Builder] = {
    "multitask": build_multitask,
    "adamt": build_adamt,
    "xtasc": build_xtasc,
    "segnet_split": build_split,
    "segnet_dense": build_dense,
    "segnet_cross_stitch": build_cross_stitch,
    "segnet_padnet": build_padnet,
    "segnet_mtan": build_mtan,
    "segnet_atinet": build_atinet,
}

__all__ = ["ARCHITECTURES", "Builder"]
