"""``--from=xtask_mt``: a state_dict of akarimoon/xtask_mt's ``XTaskTSNet`` (XTasC-Net) onto
the ``'xtasc'`` architecture (:mod:`~mtl_jax.models.architectures.xtasc`).

Source names (PyTorch, ``model.state_dict()``) → ours:

* ``pretrained_encoder.layer0.{0,1}`` (torchvision ``conv1`` / ``bn1``),
  ``pretrained_encoder.layer1.1.*`` (``layer1``; index 0 is the max-pool),
  ``pretrained_encoder.layer{2,3,4}.*`` → ``encoder/...`` (torchvision ResNet names, mapped by
  :meth:`~mtl_jax.models.converters.torch_names.TorchStateDict.resnet`);
* ``decoder_segmt`` / ``decoder_depth``: ``conv{b}.conv{k}.0`` (conv3×3 with bias) and
  ``conv{b}.conv{k}.1`` (BatchNorm) for blocks b = 1..5 and convs k = 1..3 (1 with the
  reference's ``is_shallow=True``) → ``decoders/<seg|depth>/block{b}_conv{k}/{conv,bn}``;
  ``conv6.0`` (1×1, no bias) → ``decoders/<task>/head``;
* ``trans_s2d`` / ``trans_d2s`` (``TaskTransferNetWithSkipCN``): each ``{enc,dec}{i}`` (a
  ``TTDown`` / ``TTUp``) holds ``double_conv``, a Sequential of two ``SingleConvBlock`` whose
  ``conv`` Sequential is conv3×3 (with bias), then with the reference's ``batch_norm=True`` a
  BatchNorm, then ReLU. So ``{enc,dec}{i}.double_conv.{0,1}.conv.0`` (conv) →
  ``transfer/<seg>_to_<depth>`` / ``transfer/<depth>_to_<seg>`` ``{enc,dec}{i}_conv{1,2}``
  (``kernel``, ``bias``), or with BatchNorm ``.conv.0`` → ``{enc,dec}{i}_conv{k}/conv`` and
  ``.conv.1`` (``weight``, ``bias``, ``running_mean``, ``running_var``) →
  ``{enc,dec}{i}_conv{k}/bn`` (the model built with ``ttnet_kwargs.use_bn=True``);
  ``final_conv`` (1×1, no bias) → ``head``.

Options (``--option KEY=VALUE``): ``seg`` / ``depth``, our task names (default ``semseg`` /
``depth``). Every source array is used exactly once (``num_batches_tracked`` dropped); error
messages name the ResNet arrays by their torchvision names under ``encoder.``. The result loads
into ``config.model.architecture='xtasc'`` with the matching encoder, classes, widths and TTNet
BatchNorm (``configs/xtasc.py`` on Cityscapes/NYUv2); the load checks every name and shape.
TTNets saved by earlier commits of the reference (``double_conv.{0,2}``: a plain Sequential of
conv, ReLU, conv, ReLU, in a TTNet whose s→d net takes the raw logits, not their log-softmax)
are refused with an error: that network computes something other than ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.models.converters.torch_names import TorchStateDict

_ENCODER_RENAMES = (
    (re.compile(r"^pretrained_encoder\.layer0\.0\."), "encoder.conv1."),
    (re.compile(r"^pretrained_encoder\.layer0\.1\."), "encoder.bn1."),
    (re.compile(r"^pretrained_encoder\.layer1\.1\."), "encoder.layer1."),
    (re.compile(r"^pretrained_encoder\.layer([234])\."), r"encoder.layer\1."),
)


_TTNET_PARTS = ("enc1", "enc2", "enc3", "dec1", "dec2", "dec3")


def _rename_encoder(name: str) -> str:
    for pattern, repl in _ENCODER_RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def convert_xtask_mt(state_dict: Mapping[str, np.ndarray], seg: str = "semseg",
                     depth: str = "depth") -> dict[str, np.ndarray]:
    """XTaskTSNet state_dict → our flat ``params/...`` / ``batch_stats/...`` (module doc)."""
    renamed = {_rename_encoder(k): v for k, v in state_dict.items()}
    if len(renamed) != len(state_dict):
        raise UserError("xtask_mt: the state_dict has both reference and torchvision names "
                        "for the same encoder array")
    sd = TorchStateDict(renamed, source="xtask_mt state_dict")
    if not any(k.startswith("encoder.") for k in renamed):
        raise UserError("xtask_mt: no 'pretrained_encoder.*' arrays; is it a state_dict of "
                        "XTaskTSNet (model.state_dict(), saved as .npz)?")
    sd.resnet("encoder.", "encoder")
    for src, task in (("decoder_segmt", seg), ("decoder_depth", depth)):
        if not sd.has(f"{src}.conv6.0.weight"):
            raise UserError(f"xtask_mt: no {src}.conv6.0.weight; is it a state_dict of "
                            "XTaskTSNet?")
        convs = 3 if sd.has(f"{src}.conv1.conv2.0.weight") else 1
        for b in range(1, 6):
            for k in range(1, convs + 1):
                dst = f"decoders/{task}/block{b}_conv{k}"
                sd.conv(f"{src}.conv{b}.conv{k}.0", f"{dst}/conv")
                sd.bn(f"{src}.conv{b}.conv{k}.1", f"{dst}/bn")
        sd.conv(f"{src}.conv6.0", f"decoders/{task}/head")
    blocks = [(src, name, part, k)
              for src, name in (("trans_s2d", f"{seg}_to_{depth}"),
                                ("trans_d2s", f"{depth}_to_{seg}"))
              for part in _TTNET_PARTS for k in (1, 2)]
    if any(sd.has(f"{src}.{part}.double_conv.0.weight") for src, _, part, _ in blocks):
        raise UserError("xtask_mt: the TTNets are named '<part>.double_conv.{0,2}', an earlier "
                        "xtask_mt whose s->d TTNet takes the raw logits; only the current "
                        "layout '<part>.double_conv.{0,1}.conv.*' converts")
    with_bn = {sd.has(f"{src}.{part}.double_conv.{k - 1}.conv.1.weight")
               for src, _, part, k in blocks}
    if len(with_bn) > 1:
        raise UserError("xtask_mt: some TTNet convs have a BatchNorm ('double_conv.{i}.conv.1') "
                        "and others not; a checkpoint of XTaskTSNet has it in all or none")
    for src, name, part, k in blocks:
        block, dst = f"{src}.{part}.double_conv.{k - 1}.conv", f"transfer/{name}/{part}_conv{k}"
        if with_bn == {True}:
            sd.conv(f"{block}.0", f"{dst}/conv")
            sd.bn(f"{block}.1", f"{dst}/bn")
        else:
            sd.conv(f"{block}.0", dst)
    for src, name in (("trans_s2d", f"{seg}_to_{depth}"), ("trans_d2s", f"{depth}_to_{seg}")):
        sd.conv(f"{src}.final_conv", f"transfer/{name}/head")
    return sd.finish()
