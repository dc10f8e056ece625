"""``--from=mtan``: a state_dict of lorenmt/mtan's ``SegNet`` (``im2im_pred/
model_segnet_mtan.py``, NYUv2 3 tasks) onto our ``segnet_mtan`` architecture.

Their names → ours (``c`` = conv3×3 + BN layer ``.0`` conv / ``.1`` BN → ``cba0/conv``,
``cba0/bn``; attention ``.0`` conv, ``.1`` BN, ``.3`` conv, ``.4`` BN → ``conv0``, ``bn0``,
``conv1``, ``bn1``):

* ``encoder_block.{i}`` → ``encoder/enc_block{i}``; ``conv_block_enc.{i}`` (i < 2) and
  ``conv_block_enc.{i}.{k}`` (i ≥ 2) → ``encoder/enc_conv{i}_{k}``; same for
  ``decoder_block.{k}`` / ``conv_block_dec.{k}[.{m}]`` → ``dec_block{k}`` / ``dec_conv{k}_{m}``;
* ``encoder_att.{t}.{j}`` / ``decoder_att.{t}.{k}`` → ``mtan/<task t>/att_enc_{j}`` /
  ``att_dec_{k}`` (their decoder list is indexed by level, as ours);
* ``encoder_block_att.{j}`` / ``decoder_block_att.{k}`` → ``mtan/shared_enc{j}`` /
  ``shared_dec{k}``;
* ``pred_task{t+1}.0`` / ``.1`` → ``decoders/<task t>/conv`` / ``out``.

``logsigma`` (their uncertainty-weighting scalars: weighting state, not a model parameter) is
ignored. ``tasks``: our names of their task 1, 2, 3 (default ``semseg,depth,normals``).
Widths and class counts come from the arrays; the model must be built with the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.models.converters.torch_names import TorchStateDict

MTAN_TASKS = ("semseg", "depth", "normals")


def _layer(sd: TorchStateDict, src: str, dst: str) -> None:
    sd.conv(f"{src}.0", f"{dst}/cba0/conv")
    sd.bn(f"{src}.1", f"{dst}/cba0/bn")


def _att(sd: TorchStateDict, src: str, dst: str) -> None:
    sd.conv(f"{src}.0", f"{dst}/conv0")
    sd.bn(f"{src}.1", f"{dst}/bn0")
    sd.conv(f"{src}.3", f"{dst}/conv1")
    sd.bn(f"{src}.4", f"{dst}/bn1")


def _block(sd: TorchStateDict, src: str, dst: str, level: int) -> None:
    if level < 2:
        _layer(sd, src, f"{dst}_0")
    else:
        for k in range(2):
            _layer(sd, f"{src}.{k}", f"{dst}_{k}")


def convert_mtan_segnet(state_dict: Mapping[str, np.ndarray], tasks: str | None = None
                        ) -> dict[str, np.ndarray]:
    """Their state_dict → our flat ``params/...`` and ``batch_stats/...`` (module doc)."""
    names = tuple(t.strip() for t in (tasks or ",".join(MTAN_TASKS)).split(",") if t.strip())
    if len(names) != 3:
        raise UserError(f"--from=mtan: option tasks names MTAN's 3 tasks in its order, got "
                        f"{names}")
    sd = TorchStateDict(state_dict, source="MTAN SegNet state_dict",
                        ignore_prefixes=("logsigma",))
    for i in range(5):
        _layer(sd, f"encoder_block.{i}", f"encoder/enc_block{i}")
        _block(sd, f"conv_block_enc.{i}", f"encoder/enc_conv{i}", i)
        _layer(sd, f"decoder_block.{i}", f"encoder/dec_block{i}")
        _block(sd, f"conv_block_dec.{i}", f"encoder/dec_conv{i}", i)
        _layer(sd, f"encoder_block_att.{i}", f"mtan/shared_enc{i}")
        _layer(sd, f"decoder_block_att.{i}", f"mtan/shared_dec{i}")
        for t, task in enumerate(names):
            _att(sd, f"encoder_att.{t}.{i}", f"mtan/{task}/att_enc_{i}")
            _att(sd, f"decoder_att.{t}.{i}", f"mtan/{task}/att_dec_{i}")
    for t, task in enumerate(names):
        sd.conv(f"pred_task{t + 1}.0", f"decoders/{task}/conv")
        sd.conv(f"pred_task{t + 1}.1", f"decoders/{task}/out")
    return sd.finish()
