"""Converted torchvision ImageNet weights for the ResNet encoders, from a local file.

Nothing is downloaded. The file format is a ``.npz`` whose keys are torchvision state_dict names
(``conv1.weight``, ``layer1.0.bn1.running_mean``, ``layer2.0.downsample.0.weight``, ...) and
whose values are the tensors as numpy arrays, in torch layout. ``convert_torch_checkpoint`` (or
``mtl-jax convert-weights SRC.pth DST.npz``) writes one from a torchvision ``.pth`` file; it is
the only function here that needs torch.

Name and layout mapping (``resnet.py`` keeps torchvision's names):

* ``layer{s}.{b}.X`` → ``layer{s}_{b}/X``; ``downsample.0`` → ``downsample_conv``,
  ``downsample.1`` → ``downsample_bn``;
* conv ``weight`` ``[O, I, kh, kw]`` → ``kernel`` ``[kh, kw, I, O]`` (HWIO);
* BatchNorm ``weight`` → ``scale``, ``bias`` → ``bias`` (``params``); ``running_mean`` →
  ``mean``, ``running_var`` → ``var`` (``batch_stats``); ``num_batches_tracked`` is ignored;
* ``fc.*`` (the classifier) is ignored: the encoders have no fc layer.

Usage: set ``config.model.encoder_init`` to the ``.npz`` path; ``build_experiment`` then checks
the file against the model and ``init_state`` starts from its encoder weights.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mtl_jax.errors import UserError

PyTree = Any

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IGNORED_LEAVES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.",)


def _module_path(parts: list[str], name: str) -> tuple[str, ...]:
    """Torch module names (``['layer1', '0', 'downsample', '0']``) → flax module path."""
    path: list[str] = []
    if parts and parts[0].startswith("layer"):
        if len(parts) < 2 or not parts[1].isdigit():
            raise UserError(f"torchvision key {name!r}: expected 'layer<s>.<block>.<module>'")
        path.append(f"{parts[0]}_{parts[1]}")
        parts = parts[2:]
    if parts[:1] == ["downsample"]:
        if len(parts) != 2 or parts[1] not in ("0", "1"):
            raise UserError(f"torchvision key {name!r}: expected 'downsample.0' or "
                            "'downsample.1'")
        path.append("downsample_conv" if parts[1] == "0" else "downsample_bn")
    elif len(parts) == 1:
        path.append(parts[0])
    else:
        raise UserError(f"torchvision key {name!r} is not a ResNet parameter")
    return tuple(path)


def resnet_from_torchvision(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """A torchvision ResNet state_dict (numpy arrays) → ``(params, batch_stats)`` of the encoder.

    The two trees are nested dicts with the layout of ``resnet18/34/50/101(...)``'s variables
    (no ``encoder`` prefix). ``fc.*`` and ``num_batches_tracked`` are dropped; an unknown name
    raises ``UserError``.
    """
    params: dict[tuple[str, ...], np.ndarray] = {}
    batch_stats: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in state_dict.items():
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_LEAVES):
            continue
        *modules, leaf = name.split(".")
        if not modules:
            raise UserError(f"torchvision key {name!r} is not a ResNet parameter")
        path = _module_path(modules, name)
        array = np.asarray(value)
        if "conv" in path[-1]:
            if leaf == "weight":
                if array.ndim != 4:
                    raise UserError(f"torchvision key {name!r}: a conv weight needs 4 dims "
                                    f"[O, I, kh, kw], got shape {array.shape}")
                params[path + ("kernel",)] = np.transpose(array, (2, 3, 1, 0))
            elif leaf == "bias":
                params[path + ("bias",)] = array
            else:
                raise UserError(f"torchvision key {name!r}: unknown conv leaf {leaf!r}")
        elif "bn" in path[-1]:
            if leaf not in _BN_LEAVES:
                raise UserError(f"torchvision key {name!r}: unknown BatchNorm leaf {leaf!r}")
            collection, flax_leaf = _BN_LEAVES[leaf]
            target = params if collection == "params" else batch_stats
            target[path + (flax_leaf,)] = array
        else:
            raise UserError(f"torchvision key {name!r} is not a ResNet parameter")
    return (traverse_util.unflatten_dict(params) if params else {},
            traverse_util.unflatten_dict(batch_stats) if batch_stats else {})


def torchvision_name(collection: str, path: tuple[str, ...]) -> str:
    """Inverse naming: ``('params', ('layer1_0', 'downsample_conv', 'kernel'))`` →
    ``'layer1.0.downsample.0.weight'`` (for error messages)."""
    names = []
    for part in path[:-1]:
        head, _, block = part.partition("_")
        if head.startswith("layer") and block.isdigit():
            names += [head, block]
        elif part in ("downsample_conv", "downsample_bn"):
            names += ["downsample", "0" if part == "downsample_conv" else "1"]
        else:
            names.append(part)
    leaf = path[-1] if path else ""
    inverse = {v: k for k, v in _BN_LEAVES.items()}
    torch_leaf = "weight" if leaf == "kernel" else inverse.get((collection, leaf), leaf)
    return ".".join(names + [torch_leaf])


def load_encoder_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a local ``.npz`` of torchvision state_dict names → ``(params, batch_stats)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"encoder weights file {path!r} does not exist (convert a torchvision "
                        "checkpoint with: mtl-jax convert-weights SRC.pth DST.npz)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"encoder weights file {path!r} is not a readable .npz file "
                        f"(convert a .pth with: mtl-jax convert-weights SRC.pth DST.npz): {e}"
                        ) from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"encoder weights file {path!r} is a single .npy array, not an .npz "
                        "of torchvision state_dict names")
    with loaded:
        state_dict = {k: loaded[k] for k in loaded.files}
    if not state_dict:
        raise UserError(f"encoder weights file {path!r} holds no arrays")
    return resnet_from_torchvision(state_dict)


def apply_encoder_weights(params: PyTree, batch_stats: PyTree, loaded: tuple[dict, dict], *,
                          strict: bool = True) -> tuple[dict, dict]:
    """Overlay ``loaded`` (from ``load_encoder_weights``) on a model's ``params['encoder']`` and
    ``batch_stats['encoder']``; everything else is returned unchanged.

    Every replaced leaf keeps the target's dtype (``param_dtype``) and comes back as a host
    numpy array. Shapes must match. With ``strict`` (default) the file must hold exactly the
    encoder's leaves; without, leaves missing from the file keep their initial values and extra
    ones are ignored. Errors name the first offending key (flax path and torchvision name) and
    both shapes. The targets may be ``jax.ShapeDtypeStruct`` (a check before any init).
    """
    out = []
    problems: list[str] = []
    for collection, tree, source in zip(("params", "batch_stats"), (params, batch_stats),
                                        loaded, strict=True):
        if "encoder" not in tree:
            raise UserError(f"the model has no {collection}['encoder'] to load weights into")
        target = traverse_util.flatten_dict(dict(tree["encoder"]))
        flat_source = traverse_util.flatten_dict(dict(source)) if source else {}
        merged = dict(target)
        for key, value in target.items():
            where = (f"{collection}/encoder/{'/'.join(key)} "
                     f"(torchvision {torchvision_name(collection, key)!r})")
            if key not in flat_source:
                if strict:
                    problems.append(f"{where} is in the model {tuple(value.shape)} but missing "
                                    "from the file")
                continue
            src = flat_source[key]
            if tuple(src.shape) != tuple(value.shape):
                problems.append(f"{where} has shape {tuple(src.shape)} in the file but "
                                f"{tuple(value.shape)} in the model")
                continue
            merged[key] = np.asarray(src, dtype=value.dtype)
        if strict:
            for key in flat_source:
                if key not in target:
                    problems.append(f"{collection}/encoder/{'/'.join(key)} (torchvision "
                                    f"{torchvision_name(collection, key)!r}) is in the file but "
                                    "not in the model")
        new_tree = dict(tree)
        new_tree["encoder"] = traverse_util.unflatten_dict(merged)
        out.append(new_tree)
    if problems:
        raise UserError(f"encoder weights do not fit the model ({len(problems)} problem(s); is "
                        f"it the same ResNet depth and width?): first: {problems[0]}")
    return out[0], out[1]


def convert_torch_checkpoint(src_pth: str | os.PathLike, dst_npz: str | os.PathLike) -> int:
    """Write the ``.npz`` of ``{name: tensor.numpy()}`` of a torchvision ``.pth`` state_dict.

    Needs torch (imported here only). Returns the number of arrays written.
    """
    try:
        import torch
    except ImportError:
        raise UserError("converting a .pth file needs torch: pip install torch "
                        "(CPU build: pip install torch --index-url "
                        "https://download.pytorch.org/whl/cpu)") from None
    state_dict = torch.load(os.fspath(src_pth), map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    arrays = {k: v.detach().cpu().numpy() for k, v in state_dict.items()
              if hasattr(v, "numpy")}
    np.savez(os.fspath(dst_npz), **arrays)
    return len(arrays)
