"""The pose network of DenseMTL's self-supervised depth setting (Monodepth2's pose path).

The released config (``configs/cityscapes/monodepth/resnet101_ours_SD.yml``) runs
``pose_model_input: pairs`` with frame ids ``[0, -1, 1]``: one forward pass per neighbour, on
the two frames stacked along the channels *in temporal order* (``[frame -1, frame 0]`` and
``[frame 0, frame 1]``; :func:`pose_pair`). The network (``models/posenet.py``):

* encoder: a ResNet-18 (:mod:`~mtl_jax.models.encoders.resnet`, first conv on 6 channels; the
  classifier tail dropped as the reference's ``remove_resnet_tail_``: no avgpool, no fc) on
  ``(x - 0.45) / 0.225`` (Monodepth2's ``ResnetEncoder``), kaiming-normal (fan_out) convs;
* decoder: :class:`~mtl_jax.models.decoders.pose.PoseDecoder` on the deepest feature,
  2 motions predicted, the first one used.

``PoseNetwork(pair, train)`` returns the first motion's (axis-angle ``[B, 3]``, translation
``[B, 3]``), float32, as predicted: for a pair with the neighbour *before* the centre frame the
reference inverts the transformation it builds (``transformation_from_parameters(...,
invert=f_i < 0)``), which is the caller's part. Not a multi-task architecture (it is not in
``ARCHITECTURES``); the SDE run builds it with :func:`build_pose_network` from
``config.sde.pose``. Parameter tree: ``encoder`` (our ResNet names) and ``decoder``
(``squeeze``, ``pose_0``, ``pose_1``, ``pose_2``). ``mtl-jax convert-weights --from=densemtl``
maps the reference's ``monodepth.pose_net.*`` onto it (file keys ``pose_net/...``).

The reference starts the pose encoder from ImageNet (its ``pretrain`` option is set in the
released config; conv1's weights repeated for the 6 channels and halved); here it starts from
random weights unless converted weights are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.models.decoders.pose import PoseDecoder
from mtl_jax.models.encoders import ENCODERS, ResNet
from mtl_jax.models.options import as_dict, precision

#: Monodepth2's ResnetEncoder standardisation, on every input channel.
PIXEL_MEAN, PIXEL_STD = 0.45, 0.225
#: ``config.sde.pose`` keys and defaults (the paper's network).
POSE_DEFAULTS: Mapping[str, Any] = dict(encoder="resnet18", width=64, decoder_features=256,
                                        dtype="float32", param_dtype="float32")
POSE_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101")


class PoseNetwork(nn.Module):
    """Two stacked frames ``[B, H, W, 6]`` in [0, 1] → (axis-angle ``[B, 3]``, translation
    ``[B, 3]``) of the first predicted motion (module docstring)."""

    encoder: nn.Module
    decoder: PoseDecoder

    def __call__(self, pair_BxHxWx6: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        if pair_BxHxWx6.ndim != 4 or pair_BxHxWx6.shape[-1] != 6:
            raise ValueError(f"PoseNetwork takes two RGB frames stacked on the channels "
                             f"[B, H, W, 6], got shape {tuple(pair_BxHxWx6.shape)}")
        x = (pair_BxHxWx6.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD
        features = self.encoder(x.astype(self.encoder.dtype), train)
        axisangle, translation = self.decoder(features[-1])
        return axisangle[:, 0], translation[:, 0]


def pose_pair(centre_BxHxWx3: jax.Array, neighbour_BxHxWx3: jax.Array, frame_id: int
              ) -> jax.Array:
    """The pose network's input for neighbour ``frame_id`` (-1 or +1): the two frames
    concatenated on the channels in temporal order (``[neighbour, centre]`` for a negative id,
    ``[centre, neighbour]`` for a positive one), as the reference."""
    if frame_id == 0:
        raise ValueError("pose_pair: frame_id 0 is the centre frame; give a neighbour (-1, +1)")
    frames = (neighbour_BxHxWx3, centre_BxHxWx3) if frame_id < 0 else (
        centre_BxHxWx3, neighbour_BxHxWx3)
    return jnp.concatenate(frames, axis=-1)


def pose_config(config: Any) -> dict[str, Any]:
    """``config.sde.pose`` over :data:`POSE_DEFAULTS` (``UserError`` for an unknown key or
    encoder, or a width below 1)."""
    sde = as_dict(config.get("sde", None)) if hasattr(config, "get") else {}
    given = as_dict(sde.get("pose", None))
    unknown = sorted(set(given) - set(POSE_DEFAULTS))
    if unknown:
        raise UserError(f"config.sde.pose has unknown keys {unknown}; valid: "
                        f"{sorted(POSE_DEFAULTS)}")
    cfg = {**POSE_DEFAULTS, **given}
    if cfg["encoder"] not in POSE_ENCODERS:
        raise UserError(f"config.sde.pose.encoder={cfg['encoder']!r}: must be one of "
                        f"{list(POSE_ENCODERS)} (e.g. --config.sde.pose.encoder=resnet18)")
    for key in ("width", "decoder_features"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise UserError(f"config.sde.pose.{key}={cfg[key]!r}: must be an integer >= 1 "
                            f"(e.g. --config.sde.pose.{key}={POSE_DEFAULTS[key]})")
    return cfg


def build_pose_network(config: Any) -> PoseNetwork:
    """The pose network of a run config with ``config.sde.pose`` (keys of
    :data:`POSE_DEFAULTS`: ``encoder`` 'resnet18', ``width`` 64 (the paper), ``decoder_features``
    256, ``dtype`` / ``param_dtype`` 'float32'; a config without ``sde.pose`` gets them all)."""
    cfg = pose_config(config)
    prec = precision(cfg)
    encoder = ENCODERS.lookup(cfg["encoder"], "pyramid", "pose encoder")(
        width=int(cfg["width"]), **prec)
    assert isinstance(encoder, ResNet)
    decoder = PoseDecoder(num_frames=2, features=int(cfg["decoder_features"]), **prec)
    return PoseNetwork(encoder=encoder, decoder=decoder)


def init_pose_network(network: PoseNetwork, rng: jax.Array, input_size: tuple[int, int]
                      ) -> dict[str, Any]:
    """Variables (``params``, ``batch_stats``) of ``network`` for frames of ``input_size``."""
    h, w = input_size
    return dict(network.init(rng, jnp.zeros((1, h, w, 6), jnp.float32), train=False))
