"""DenseMTL (Lopes et al., astra-vision/DenseMTL): the authors' ``OursAtt`` state_dict onto our
``encoder`` + ``three_ways`` decoders + mTEB exchange blocks (configs/densemtl.py).

Source names (the released code; ``t`` a task, ``s`` another task, ``k`` an exchange stage):

* ``backbone.encoder.*``: the torchvision ResNet (``ResnetEncoder``; ``fc.*`` dropped) →
  ``encoder``; a plain ``backbone.*`` ResNet is accepted too;
* ``heads.<t>.decoder.<n>``: the Monodepth2-style ``DecoderHead`` ("padnet+", 3-ways) with
  ``intermediate_aspp`` whose ``ModuleList`` holds, in order, for stage i = 4..0
  ``('upconv', i, 0)``, ``('skip_proj', i)`` (an ``Identity`` for i > 0: no arrays) and
  ``('upconv', i, 1)``, then one side conv per active scale: n = 0 ASPP
  (``convs.0`` 1×1, ``convs.1-3`` atrous ``ASPPConv``, ``convs.4`` ``ASPPPooling``,
  ``project``; each ``.0``/``.1`` or ``.1``/``.2`` conv/BN) → ``aspp/branch0..3, pool,
  project``; n = 2, 3, 5, 6, 8, 9, 11, 12, 13 ``block.0.conv`` (reflect-pad conv + ELU) →
  ``upconv_<i>_<j>``; n = 14, 15, ... → ``out_<scale>`` in ``active_scales`` order
  (option, default ``0,1`` as every released config);
* ``m.<t>.<k>``: the exchange block of target t at stage k (ablation ``['SxTAM', 'SA',
  'add']``): ``extract_<s>.0`` → ``exchange_stage<k>/<s>_to_<t>/extract``; ``SA_<s>.conv`` /
  ``SA_<s>.attention.0`` → ``self_feat`` / ``self_mask``; ``SxTAM_<s>.conv_b|conv_c|conv_d``
  (``.0`` conv, ``.1`` BN) → ``query`` / ``key`` / ``value``; ``SxTAM_<s>.alpha``
  ``[1, C, 1, 1]`` → ``alpha`` ``[C]``; ``proj_<s>`` → ``project``; ``post`` → ``fuse_<t>``;
* ``params.<t>.0.*`` / ``params.<t>.1.*``: the same modules again (a ``ModuleDict`` the
  reference keeps for per-task parameter groups); checked equal to ``heads.<t>.*`` / ``m.<t>.*``
  and skipped.

**Task order of the fusion.** ``post`` of target t reads the concatenation of the directional
features of the other tasks in the order the reference iterates the Python *set*
``{s for s in tasks if s != t}`` -- for strings that order depends on the interpreter's hash
seed (``PYTHONHASHSEED``), so it is not in the checkpoint. Our ``fuse_<t>`` concatenates the
other tasks in the model's task order (``config.task_order``, :func:`mtl_jax.experiment.
task_order`). The converter permutes the input channel blocks of ``post`` from the reference's
order to ours:

* ``tasks=semseg,depth,normals``: the model's task order. ``mtl-jax convert-weights
  --config=CONFIG`` passes the config's; without either, the order of ``heads.*`` in the file
  (the reference config's, e.g. semseg, depth, normals -- configs/densemtl.py's too). With an
  exchange block and 3 or more tasks the order used is written to the file
  (``meta/task_order``) and loading it into a model of another order is refused
  (``converters.check_task_order``): the shapes agree, so strict loading alone would not
  notice a permutation;
* ``set_order=depth,normals,semseg``: the order the reference's sets iterated (each target's
  set in the induced order). Needed with 3 or more tasks (with 2 there is only one source);
  find it by running ``print([s for s in {'semseg', 'depth', 'normals'} if s != 'semseg'])``
  under the same ``PYTHONHASHSEED`` as the training run (the run logs its ``Task pairs`` set
  too), or try the orders and keep the one that evaluates best.

**Self-supervised depth checkpoints** (``configs/cityscapes/monodepth/``, setup
``ours-cxatt_monodepth``: the reference's ``MultiSetup`` of ``main`` = ``OursAtt`` and
``monodepth`` = its pose network plug-in). Their names carry the prefixes ``main.`` (the model
above, converted as above) and ``monodepth.pose_net.``:

* ``monodepth.pose_net.encoder.encoder.*``: Monodepth2's ``ResnetEncoder`` (ResNet-18 with a
  6-channel ``conv1``; no ``fc``) → ``pose_net/{params,batch_stats}/encoder/...``;
* ``monodepth.pose_net.decoder.net.0..3``: ``PoseDecoder``'s squeeze and pose convs →
  ``pose_net/params/decoder/{squeeze,pose_0,pose_1,pose_2}``
  (:class:`~mtl_jax.models.architectures.posenet.PoseNetwork`);
* ``monodepth.imnet_encoder.*`` (only with the reference's ``feature_dist``: a frozen ImageNet
  copy for a loss this setting does not use) is dropped.

The pose network's arrays stay a separate subtree of the file, ``pose_net/...``: loading the
file into the segmentation model (``config.model.init_from``) skips it, and the SDE run loads
it into the pose network (``converters.load_variables(path, part='pose_net')``). The
disparity head (``is_regression: True``) has 3×3 side convs (``decoder.<n>.conv``, after a
reflection pad) → ``out_<scale>`` with a 3×3 kernel (``ThreeWaysDecoder(regression=True)``).
The side convs of each head follow its ``active_scales``: the option ``active_scales`` is
``0,1`` (every head; the default of the plain checkpoints) or per task
``semseg:0,2;disp:0,1,2,3`` (the default of the self-supervised depth checkpoints, the
released config's); a head whose number of side convs differs is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.models.converters.torch_names import TASK_ORDER_KEY, TorchStateDict

#: ('upconv', stage, j) -> index in DecoderHead.decoder (ASPP at index 0 is handled apart).
DECODER_INDEX = {(4, 1): 2, (3, 0): 3, (3, 1): 5, (2, 0): 6, (2, 1): 8, (1, 0): 9, (1, 1): 11,
                 (0, 0): 12, (0, 1): 13}
FIRST_SIDE_INDEX = 14
#: Prefixes of a self-supervised depth checkpoint (the reference's MultiSetup).
MAIN_PREFIX, POSE_PREFIX = "main.", "monodepth.pose_net."
IGNORED_SDE_PREFIX = "monodepth.imnet_encoder."
#: Side scales of each head in the released self-supervised depth config.
SDE_ACTIVE_SCALES = {"semseg": (0, 2), "disp": (0, 1, 2, 3)}
#: The pose decoder's ``net.<i>`` -> our names.
POSE_DECODER = ("squeeze", "pose_0", "pose_1", "pose_2")


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _drop_duplicates(sd: Mapping[str, np.ndarray]) -> list[str]:
    """The ``params.<t>.<0|1>.*`` aliases, checked equal to their ``heads``/``m`` originals."""
    aliases = []
    for name, value in sd.items():
        m = re.fullmatch(r"params\.([^.]+)\.([01])\.(.+)", name)
        if not m:
            continue
        original = f"{'heads' if m.group(2) == '0' else 'm'}.{m.group(1)}.{m.group(3)}"
        if original not in sd or not np.array_equal(sd[original], value):
            raise UserError(f"DenseMTL state_dict: {name!r} should repeat {original!r} "
                            "(the reference's per-task parameter groups) but does not")
        aliases.append(name)
    return aliases


def _aspp(sd: TorchStateDict, src: str, dst: str) -> None:
    sd.conv(f"{src}.convs.0.0", f"{dst}/branch0/conv")
    sd.bn(f"{src}.convs.0.1", f"{dst}/branch0/bn")
    n = 1
    while sd.has(f"{src}.convs.{n}.0.weight"):  # ASPPConv: 0 conv, 1 BN
        sd.conv(f"{src}.convs.{n}.0", f"{dst}/branch{n}/conv")
        sd.bn(f"{src}.convs.{n}.1", f"{dst}/branch{n}/bn")
        n += 1
    sd.conv(f"{src}.convs.{n}.1", f"{dst}/pool/conv")  # ASPPPooling: 0 pool, 1 conv, 2 BN
    sd.bn(f"{src}.convs.{n}.2", f"{dst}/pool/bn")
    sd.conv(f"{src}.project.0", f"{dst}/project/conv")
    sd.bn(f"{src}.project.1", f"{dst}/project/bn")


def _head(sd: TorchStateDict, task: str, active_scales: Sequence[int]) -> None:
    """Head ``task``'s ASPP, conv blocks and side convs (``active_scales`` in order)."""
    src, dst = f"heads.{task}.decoder", f"decoders/{task}"
    _aspp(sd, f"{src}.0", f"{dst}/aspp")
    for (stage, j), index in DECODER_INDEX.items():
        sd.conv(f"{src}.{index}.block.0.conv", f"{dst}/upconv_{stage}_{j}/conv")
    sides = _side_indices(sd, src)
    if len(sides) != len(active_scales):
        raise UserError(f"DenseMTL state_dict: heads.{task} has {len(sides)} side conv(s) "
                        f"({src}.{FIRST_SIDE_INDEX}..) but active_scales gives "
                        f"{list(active_scales)} for it; pass --option active_scales=... with "
                        "its scales (e.g. 0,1 or semseg:0,2;disp:0,1,2,3)")
    for index, scale in zip(sides, active_scales, strict=True):
        # is_regression heads: Conv3x3 = reflection pad + ``.conv``; others a plain Conv2d.
        name = f"{src}.{index}.conv" if sd.has(f"{src}.{index}.conv.weight") else f"{src}.{index}"
        sd.conv(name, f"{dst}/out_{scale}")


def _side_indices(sd: TorchStateDict, src: str) -> list[int]:
    """Indices of the head's side convs in its ``ModuleList`` (from ``FIRST_SIDE_INDEX`` on)."""
    found = {int(m.group(1)) for k in sd.arrays
             if (m := re.fullmatch(re.escape(src) + r"\.(\d+)\.(?:conv\.)?weight", k))}
    return sorted(i for i in found if i >= FIRST_SIDE_INDEX)


def _exchange(sd: TorchStateDict, stage: int, tasks: Sequence[str],
              set_order: Sequence[str]) -> None:
    dst_block = f"exchange_stage{stage}"
    for t in tasks:
        src = f"m.{t}.{stage}"
        others = [s for s in tasks if s != t]
        for s in others:
            dst = f"{dst_block}/{s}_to_{t}"
            sd.conv(f"{src}.extract_{s}.0", f"{dst}/extract")
            sd.conv(f"{src}.SA_{s}.conv", f"{dst}/self_feat")
            sd.conv(f"{src}.SA_{s}.attention.0", f"{dst}/self_mask")
            for ref, ours in (("conv_b", "query"), ("conv_c", "key"), ("conv_d", "value")):
                sd.conv(f"{src}.SxTAM_{s}.{ref}.0", f"{dst}/{ours}/conv")
                sd.bn(f"{src}.SxTAM_{s}.{ref}.1", f"{dst}/{ours}/bn")
            alpha = sd.take(f"{src}.SxTAM_{s}.alpha", 4)
            sd.put(f"params/{dst}/alpha", alpha.reshape(-1))
            sd.conv(f"{src}.proj_{s}.0", f"{dst}/project/conv")
            sd.bn(f"{src}.proj_{s}.1", f"{dst}/project/bn")
        # post: input channel blocks in the reference's set order -> our task order.
        ref_order = [s for s in set_order if s != t]
        weight = sd.take(f"{src}.post.0.weight", 4)
        c = weight.shape[1] // len(others)
        if c * len(others) != weight.shape[1]:
            raise UserError(f"DenseMTL state_dict: {src}.post.0.weight has {weight.shape[1]} "
                            f"input channels, not a multiple of {len(others)} sources")
        blocks = [weight[:, ref_order.index(s) * c:(ref_order.index(s) + 1) * c]
                  for s in others]
        sd.put(f"params/{dst_block}/fuse_{t}/conv/kernel",
               np.transpose(np.concatenate(blocks, axis=1), (2, 3, 1, 0)))
        sd.bn(f"{src}.post.1", f"{dst_block}/fuse_{t}/bn")


def _split_sde(state_dict: Mapping[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model arrays with ``main.`` stripped, pose network arrays with ``monodepth.pose_net.``
    stripped) of a self-supervised depth checkpoint; a plain checkpoint comes back whole with
    no pose arrays. Other names stay in the model part (unmapped: ``finish`` names them)."""
    if not any(k.startswith((MAIN_PREFIX, "monodepth.")) for k in state_dict):
        return dict(state_dict), {}
    model, pose = {}, {}
    for name, value in state_dict.items():
        if name.startswith(MAIN_PREFIX):
            model[name[len(MAIN_PREFIX):]] = value
        elif name.startswith(POSE_PREFIX):
            pose[name[len(POSE_PREFIX):]] = value
        elif not name.startswith(IGNORED_SDE_PREFIX):
            model[name] = value
    return model, pose


def _pose_net(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's ``PoseNetwork`` arrays (``monodepth.pose_net.`` stripped) → our
    ``pose_net/{params,batch_stats}/...`` keys (module docstring)."""
    sd = TorchStateDict(state, source=f"DenseMTL state_dict ({POSE_PREFIX}*)",
                        ignore_prefixes=("encoder.encoder.fc.",))
    sd.resnet("encoder.encoder.", "encoder")
    for index, name in enumerate(POSE_DECODER):
        sd.conv(f"decoder.net.{index}", f"decoder/{name}")
    return {f"pose_net/{key}": value for key, value in sd.finish().items()}


def _scales(active_scales: str | Sequence[int] | None, heads: Sequence[str], sde: bool
            ) -> dict[str, tuple[int, ...]]:
    """Side scales per head: ``0,1`` for every head, ``semseg:0,2;disp:0,1,2,3`` per task, or
    the default (``0,1``; :data:`SDE_ACTIVE_SCALES` for a self-supervised depth checkpoint)."""
    if active_scales is None:
        if not sde:
            return {t: (0, 1) for t in heads}
        missing = [t for t in heads if t not in SDE_ACTIVE_SCALES]
        if missing:
            raise UserError(f"densemtl converter: no default side scales for the heads "
                            f"{missing} of this self-supervised depth checkpoint; pass "
                            "--option active_scales=TASK:0,1;TASK:0,1,2,3")
        return {t: SDE_ACTIVE_SCALES[t] for t in heads}
    if not isinstance(active_scales, str):
        return {t: tuple(int(v) for v in active_scales) for t in heads}
    if ":" not in active_scales:
        return {t: tuple(int(v) for v in _names(active_scales)) for t in heads}
    per_task = {}
    for item in active_scales.split(";"):
        task, _, values = item.partition(":")
        per_task[task.strip()] = tuple(int(v) for v in _names(values))
    if sorted(per_task) != sorted(heads):
        raise UserError(f"densemtl converter: active_scales={active_scales!r} must give the "
                        f"scales of every head {list(heads)} (TASK:0,1;TASK:0,2)")
    return per_task


def convert_densemtl(state_dict: Mapping[str, np.ndarray], tasks: str | Sequence[str] | None = None,
                     set_order: str | Sequence[str] | None = None,
                     active_scales: str | Sequence[int] | None = None
                     ) -> dict[str, np.ndarray]:
    """The authors' DenseMTL state_dict → our flat variables (module docstring); every source
    array used exactly once. Options: ``tasks`` (our task order), ``set_order`` (the
    reference's set iteration order, needed with >= 3 tasks and an exchange block),
    ``active_scales`` (the heads' side scales in the reference config's order: ``0,1`` for
    every head or ``TASK:0,2;TASK:0,1,2,3``). A self-supervised depth checkpoint (``main.*`` +
    ``monodepth.pose_net.*``) also gives the pose network's ``pose_net/...`` arrays."""
    model_sd, pose_sd = _split_sde(state_dict)
    sde = bool(pose_sd) or any(k.startswith((MAIN_PREFIX, "monodepth.")) for k in state_dict)
    state_dict = model_sd
    heads = list(dict.fromkeys(k.split(".")[1] for k in state_dict if k.startswith("heads.")))
    if not heads:
        raise UserError("DenseMTL state_dict: no 'heads.<task>.*' arrays; is it a checkpoint "
                        "of the authors' DenseMTL model (OursAtt / MultiTask)?")
    order = _names(tasks) or heads
    if sorted(order) != sorted(heads):
        raise UserError(f"densemtl converter: tasks={order} must list the file's tasks {heads}")
    scales = _scales(active_scales, heads, sde)
    stages = sorted({int(k.split(".")[2]) for k in state_dict
                     if re.match(r"m\.[^.]+\.\d+\.", k)})
    given = _names(set_order)
    if stages and len(order) >= 3 and not given:
        raise UserError("densemtl converter: with 3 or more tasks the fusion order of the "
                        "reference depends on Python's set order; give it as "
                        "--option set_order=TASK,TASK,... (converters/densemtl.py explains how "
                        "to find it)")
    if given and sorted(given) != sorted(order):
        raise UserError(f"densemtl converter: set_order={given} must list the tasks {order}")
    set_order_ = given or order

    prefix = "backbone.encoder." if any(k.startswith("backbone.encoder.") for k in state_dict) \
        else "backbone."
    source = f"DenseMTL state_dict ({MAIN_PREFIX}* without the prefix)" if sde \
        else "DenseMTL state_dict"
    sd = TorchStateDict(state_dict, source=source, ignore_prefixes=(f"{prefix}fc.",))
    sd.used.update(_drop_duplicates(state_dict))
    sd.resnet(prefix, "encoder")
    for t in order:
        _head(sd, t, scales[t])
    for stage in stages:
        _exchange(sd, stage, order, set_order_)
    out = sd.finish()
    if pose_sd:
        out.update(_pose_net(pose_sd))
    if stages and len(order) >= 3:  # the fusion convs' input blocks follow this order
        out[TASK_ORDER_KEY] = np.array(order)
    return out
