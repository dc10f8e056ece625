"""The composed architecture ``'multitask'``: shared encoder → optional interaction or exchange
blocks → one decoder per task, each part chosen by name from its registry.

``build_multitask(model_cfg, {task: channels})`` reads these ``config.model`` keys (all
optional):

* ``encoder`` (a name in ``ENCODERS``' slot ``'pyramid'``, default ``'resnet34'``),
  ``encoder_kwargs`` (e.g. ``width``, ``replace_stride_with_dilation``);
* ``decoder`` (a name in ``DECODERS``' slot ``'pyramid'``, default ``'unet'``),
  ``decoder_kwargs`` (e.g. ``features``; ``channels`` and ``side_scales`` for ``three_ways``);
* ``decoder_kwargs_by_task``: ``{task: {...}}`` merged over ``decoder_kwargs`` for that task's
  decoder (e.g. DenseMTL's self-supervised depth setting: ``{'semseg': {'side_scales': (2,)},
  'disp': {'side_scales': (1, 2, 3), 'regression': True, 'resize_sides': False}}``); a task
  the model does not have is an error;
* ``interaction``: ``None`` or ``{'name': 'padnet', 'width': 256}`` -- a module between encoder
  and decoders (``INTERACTIONS``' slot ``'pyramid'``;
  :class:`~mtl_jax.models.multitask.MultiTaskModel`);
* ``exchange``: ``None`` or ``{'name': 'mteb' | 'padnet', 'stages': (1,), ...}`` -- exchange
  blocks (``INTERACTIONS``' slot ``'exchange'``) between the stages of staged decoders
  (:class:`~mtl_jax.models.exchange.ExchangeMultiTaskModel`); other keys go to the block
  (mTEB: ``fusion``, ``attention``, ``attention_impl``, ``block_size``; ``downscale`` = one
  int for every stage, default from DenseMTL's stage table ``STAGE_DOWNSCALE``);
* ``dtype`` (``'float32'`` | ``'bfloat16'``), ``param_dtype``, ``pixel_mean``, ``pixel_std``
  (:mod:`~mtl_jax.models.options`).

Other keys are ignored. Unknown names raise ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtl_jax.models.decoders import DECODERS
from mtl_jax.models.encoders import ENCODERS
from mtl_jax.models.exchange import STAGE_DOWNSCALE, ExchangeMultiTaskModel
from mtl_jax.models.interaction import INTERACTIONS
from mtl_jax.models.interface import is_staged_decoder
from mtl_jax.models.multitask import MultiTaskModel
from mtl_jax.models.options import as_dict, pixel_stats, precision


def _exchange_blocks(spec: dict[str, Any], tasks: tuple[str, ...], prec: dict
                     ) -> tuple[tuple[int, Any], ...]:
    spec = dict(spec)
    cls = INTERACTIONS.lookup(spec.pop("name", "mteb"), "exchange", "exchange block")
    stages = spec.pop("stages", (1,))
    stages = (stages,) if isinstance(stages, int) else tuple(int(s) for s in stages)
    downscale = spec.pop("downscale", None)
    blocks = []
    for stage in stages:
        kwargs = dict(spec)
        if "downscale" in cls.__dataclass_fields__:
            kwargs["downscale"] = int(downscale) if downscale else STAGE_DOWNSCALE[stage]
        try:
            blocks.append((stage, cls(tasks=tasks, **kwargs, **prec)))
        except TypeError as e:
            raise ValueError(f"model.exchange: {e}") from e
    return tuple(blocks)


def build_multitask(model_cfg: Mapping[str, Any], tasks: Mapping[str, int]) -> MultiTaskModel:
    """The composed model ``model_cfg`` describes for ``{task: output channels}`` (module doc)."""
    decoder_name = model_cfg.get("decoder", "unet")
    make_encoder = ENCODERS.lookup(model_cfg.get("encoder", "resnet34"), "pyramid", "encoder")
    make_decoder = DECODERS.lookup(decoder_name, "pyramid", "decoder")
    prec = precision(model_cfg)
    dtype = prec["dtype"]

    encoder = make_encoder(**as_dict(model_cfg.get("encoder_kwargs", None)), **prec)
    decoder_kwargs = as_dict(model_cfg.get("decoder_kwargs", None))
    by_task = {t: as_dict(kw) for t, kw in
               as_dict(model_cfg.get("decoder_kwargs_by_task", None)).items()}
    unknown = sorted(set(by_task) - set(tasks))
    if unknown:
        raise ValueError(f"model.decoder_kwargs_by_task names {unknown}, not tasks of the model "
                         f"{list(tasks)}")
    decoders = {
        task: make_decoder(out_channels=int(channels),
                           **{**decoder_kwargs, **by_task.get(task, {})}, **prec)
        for task, channels in tasks.items()
    }
    extra: dict[str, Any] = pixel_stats(model_cfg)

    interaction = as_dict(model_cfg.get("interaction", None))
    exchange = as_dict(model_cfg.get("exchange", None))
    if interaction and exchange:
        raise ValueError("model.interaction and model.exchange are exclusive; set one to None")
    if interaction:
        name = interaction.pop("name", None)
        make = INTERACTIONS.lookup(name, "pyramid", "interaction")
        extra["interaction"] = make(task_channels=tuple((t, int(c)) for t, c in tasks.items()),
                                    name=name, **interaction, **prec)
    if exchange:
        if not is_staged_decoder(make_decoder):
            staged = [n for n in DECODERS.names("pyramid") if is_staged_decoder(DECODERS[n])]
            raise ValueError(f"model.exchange needs a staged decoder ({staged}), not "
                             f"{decoder_name!r}")
        blocks = _exchange_blocks(exchange, tuple(tasks), prec)
        return ExchangeMultiTaskModel(encoder=encoder, decoders=decoders, exchanges=blocks,
                                      dtype=dtype, **extra)
    return MultiTaskModel(encoder=encoder, decoders=decoders, dtype=dtype, **extra)
