"""Models: the architectures (``architectures/``), the parts they are built from
(``encoders/``, ``decoders/``, ``interaction/``) and the building blocks of those parts.

Registries (:class:`~mtl_jax.models.registry.Registry`, name → constructor): ``ARCHITECTURES``
(whole models, ``config.model.architecture``), ``ENCODERS``, ``DECODERS``, ``INTERACTIONS``.
``build_model(model_cfg, tasks)`` builds the model a ``config.model`` dict describes; the
model interface and its optional hooks are declared in :mod:`~mtl_jax.models.interface`;
``count_params`` reports parameter counts per part.

Layout: ``architectures/`` (one file per model family), ``encoders/``, ``decoders/``,
``interaction/`` (parts, one registry each), ``cpu_grads/`` (CPU gradient kernels),
``converters/`` (reference checkpoints → our trees); at this level the model classes
(``multitask.py``, ``exchange.py``), the interface, the building blocks (``layers.py``,
``pooling.py``, ``attention.py``, ``initializers.py``), config reading (``options.py``),
parameter counts (``params.py``), pretrained encoders (``pretrained.py``) and
``inspection.py`` (attention maps for notebooks).
"""

from mtl_jax.models.architectures import ARCHITECTURES
from mtl_jax.models.build import build_model
from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS, encoder_out_channels
from mtl_jax.models.exchange import ExchangeMultiTaskModel
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.interface import MultiTaskNet
from mtl_jax.models.multitask import (
    MultiTaskModel,
    SingleTaskModel,
    attention_masks,
    side_outputs,
)
from mtl_jax.models.params import count_params, format_param_table

__all__ = [
    "ARCHITECTURES",
    "DECODERS",
    "ENCODERS",
    "INTERACTIONS",
    "ExchangeMultiTaskModel",
    "MultiTaskModel",
    "MultiTaskNet",
    "SingleTaskModel",
    "attention_masks",
    "build_model",
    "count_params",
    "encoder_out_channels",
    "format_param_table",
    "side_outputs",
]
