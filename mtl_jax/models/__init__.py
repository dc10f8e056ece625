"""Models: encoders, decoders, interaction modules and the architectures composing them.

Registries (name → constructor): ``ARCHITECTURES`` (whole models, ``config.model.architecture``),
``ENCODERS``, ``DECODERS``. ``build_model(model_cfg, tasks)`` builds the model a
``config.model`` dict describes; ``count_params`` reports parameter counts per part.
"""

from mtl_jax.models.build import ARCHITECTURES, build_model
from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS, encoder_out_channels
from mtl_jax.models.exchange import ExchangeMultiTaskModel
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
    "ExchangeMultiTaskModel",
    "MultiTaskModel",
    "SingleTaskModel",
    "attention_masks",
    "build_model",
    "count_params",
    "encoder_out_channels",
    "format_param_table",
    "side_outputs",
]
