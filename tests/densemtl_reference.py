"""The state_dict names and shapes of the authors' DenseMTL code (astra-vision/DenseMTL),
written by hand from its modules and filled with random arrays (a helper of the converter
tests, not a test module).

The names come from the reference's module trees: torchvision's ResNet (the backbone and the
pose encoder), vendor/monodepth2/decoder.py DecoderHead with vendor/mtlpt/aspp.py ASPP (the
task heads), models/ours_xatt.py OursAtt (the exchange block and its per-task parameter
groups). They are never derived from ``mtl_jax``'s converter mapping, which the tests check
against them. Arrays are in PyTorch layouts (convolutions OIHW).
"""

from typing import NamedTuple

import numpy as np


class StateDict:
    """Random float32 arrays under the reference's names, in ``.sd`` in the order written.

    ``variances``: how BatchNorm running variances are drawn, ``"half_normal"`` (|N(0, 1)| +
    0.5) or ``"uniform"`` (U(0.5, 1.5)); ``batches_tracked``: the value of every
    ``num_batches_tracked``."""

    def __init__(self, seed, variances="half_normal", batches_tracked=5):
        if variances not in ("half_normal", "uniform"):
            raise ValueError(f"variances={variances!r}: use 'half_normal' or 'uniform'")
        self.rng = np.random.default_rng(seed)
        self.sd = {}
        self.variances = variances
        self.batches_tracked = batches_tracked

    def arr(self, name, *shape):
        self.sd[name] = self.rng.standard_normal(shape).astype(np.float32)

    def conv(self, name, o, i, k, bias=False):
        """nn.Conv2d(i, o, k): ``name.weight`` [o, i, k, k] (and ``name.bias`` [o])."""
        self.arr(f"{name}.weight", o, i, k, k)
        if bias:
            self.arr(f"{name}.bias", o)

    def bn(self, name, c):
        """nn.BatchNorm2d(c): affine parameters, running statistics and the batch count."""
        for leaf in ("weight", "bias", "running_mean"):
            self.arr(f"{name}.{leaf}", c)
        if self.variances == "half_normal":
            var = np.abs(self.rng.standard_normal(c)).astype(np.float32) + 0.5
        else:
            var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.sd[f"{name}.running_var"] = var
        self.sd[f"{name}.num_batches_tracked"] = np.array(self.batches_tracked, np.int64)


def resnet18(f, prefix, widths, in_channels=3, fc=0):
    """torchvision's ResNet-18 (two BasicBlocks a stage) at ``widths`` = (stem, layer1..4)
    under ``prefix``; with ``fc`` classes its ``fc`` Linear, without, as after the
    reference's remove_resnet_tail_."""
    f.conv(prefix + "conv1", widths[0], in_channels, 7)
    f.bn(prefix + "bn1", widths[0])
    cin = widths[0]
    for stage, c in enumerate(widths[1:], start=1):
        for b in range(2):
            q = f"{prefix}layer{stage}.{b}."
            f.conv(q + "conv1", c, cin if b == 0 else c, 3)
            f.bn(q + "bn1", c)
            f.conv(q + "conv2", c, c, 3)
            f.bn(q + "bn2", c)
            if b == 0 and cin != c:
                f.conv(q + "downsample.0", c, cin, 1)
                f.bn(q + "downsample.1", c)
        cin = c
    if fc:
        f.arr(prefix + "fc.weight", fc, widths[-1])
        f.arr(prefix + "fc.bias", fc)


class Head(NamedTuple):
    """One task's DecoderHead: ``out`` channels, its ``active_scales`` (the side convs, in
    that order) and ``regression`` (is_regression: each side a Conv3x3 = ReflectionPad +
    ``.conv`` 3x3, else a plain 1x1 Conv2d)."""

    out: int
    scales: tuple
    regression: bool = False


def decoder_head(f, prefix, head, dec, enc):
    """DecoderHead(intermediate_aspp=True) under ``prefix`` (``...heads.<t>.decoder.``), its
    nn.ModuleList in order: 0 ('upconv', 4, 0) = ASPP(enc[4], [6, 12, 18], True, dec[4]); 1
    skip_proj Identity; 2..13 the ConvBlocks (Sequential(Conv3x3(pad, conv), Identity, ELU));
    14.. the side convs of ``head`` (a Head) at ``dec[scale]`` input channels."""
    f.conv(prefix + "0.convs.0.0", dec[4], enc[4], 1)
    f.bn(prefix + "0.convs.0.1", dec[4])
    for n in (1, 2, 3):
        f.conv(prefix + f"0.convs.{n}.0", dec[4], enc[4], 3)
        f.bn(prefix + f"0.convs.{n}.1", dec[4])
    f.conv(prefix + "0.convs.4.1", dec[4], enc[4], 1)  # ASPPPooling: 0 is the pool
    f.bn(prefix + "0.convs.4.2", dec[4])
    f.conv(prefix + "0.project.0", dec[4], 5 * dec[4], 1)
    f.bn(prefix + "0.project.1", dec[4])
    f.conv(prefix + "2.block.0.conv", dec[4], dec[4] + enc[3], 3, bias=True)
    for stage, (i0, i1) in {3: (3, 5), 2: (6, 8), 1: (9, 11)}.items():
        f.conv(prefix + f"{i0}.block.0.conv", dec[stage], dec[stage + 1], 3, bias=True)
        f.conv(prefix + f"{i1}.block.0.conv", dec[stage], dec[stage] + enc[stage - 1], 3,
               bias=True)
    f.conv(prefix + "12.block.0.conv", dec[0], dec[1], 3, bias=True)
    f.conv(prefix + "13.block.0.conv", dec[0], dec[0], 3, bias=True)
    for index, scale in enumerate(head.scales, start=14):
        if head.regression:
            f.conv(prefix + f"{index}.conv", head.out, dec[scale], 3, bias=True)
        else:
            f.conv(prefix + f"{index}", head.out, dec[scale], 1, bias=True)


def exchange(f, prefix, sources, c):
    """One target's block of OursAtt.m at one stage (``...m.<t>.<stage>.``) with ablation
    [SA, SxTAM, add] at ``c`` channels: per source task (in ``sources``' order) extract, SA,
    SxTAM (conv_b/c/d, alpha), proj; then post = Project(len(sources) * c -> c)."""
    for s in sources:
        f.conv(prefix + f"extract_{s}.0", c, c, 3, bias=True)
        f.conv(prefix + f"SA_{s}.attention.0", c // 2, c, 3)
        f.conv(prefix + f"SA_{s}.conv", c // 2, c, 3)
        for x in ("conv_b", "conv_c", "conv_d"):
            f.conv(prefix + f"SxTAM_{s}.{x}.0", c, c, 1)
            f.bn(prefix + f"SxTAM_{s}.{x}.1", c)
        f.arr(prefix + f"SxTAM_{s}.alpha", 1, c, 1, 1)
        f.conv(prefix + f"proj_{s}.0", c, c + c // 2, 1)
        f.bn(prefix + f"proj_{s}.1", c)
    f.conv(prefix + "post.0", c, len(sources) * c, 1)
    f.bn(prefix + "post.1", c)


def ours_att(f, root, heads, enc, dec, stage=1, fc=0):
    """OursAtt(backbone=ResnetEncoder(18), heads={t: DecoderHead}, ablation=[SA, SxTAM, add],
    stages=[stage]) under ``root`` (``""`` or ``"main."``): the backbone (``fc``: see
    resnet18), ``heads.<t>.decoder.*`` for ``heads`` ({task: Head}, in the file's order),
    ``m.<t>.<stage>.*`` (each target's sources in that order), then the per-task parameter
    groups OursAtt.params = ModuleDict {t: [heads[t], m[t]]}, which repeat every array as
    ``params.<t>.0.*`` / ``params.<t>.1.*``."""
    resnet18(f, root + "backbone.encoder.", enc, fc=fc)
    for t, head in heads.items():
        decoder_head(f, f"{root}heads.{t}.decoder.", head, dec, enc)
    for t in heads:
        exchange(f, f"{root}m.{t}.{stage}.", [s for s in heads if s != t], dec[stage])
    for name in [n for n in f.sd if n.startswith(root)]:
        parts = name[len(root):].split(".")
        if parts[0] in ("heads", "m"):
            group = 0 if parts[0] == "heads" else 1
            f.sd[f"{root}params.{parts[1]}.{group}.{'.'.join(parts[2:])}"] = f.sd[name]
