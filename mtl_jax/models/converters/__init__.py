"""Weights from the authors' PyTorch codes, mapped onto our parameter trees.

A converter reads a PyTorch ``state_dict`` saved as an ``.npz`` of ``{name: array}`` (PyTorch
names and layouts: conv weights OIHW, linear weights ``[out, in]``; save one with
``np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})``) and returns our
variables as a flat ``{'params/<path>': array, 'batch_stats/<path>': array}`` dict, with every
source array used exactly once (:class:`~mtl_jax.models.converters.torch_names.TorchStateDict`
enforces it). ``mtl-jax convert-weights --from=NAME SRC.npz DST.npz`` writes that dict; a run
starts from it with ``config.model.init_from=DST.npz`` (every leaf checked against the model:
names and shapes), and ``mtl-jax eval`` evaluates it when the workdir has no checkpoint yet.
A network trained beside the model (DenseMTL's pose network) is a subtree ``pose_net/...`` of
the same file (:data:`PARTS`; ``load_variables(path, part='pose_net')``).

Registry: ``CONVERTERS = {name: function(state_dict, **options) -> flat variables}``; adding a
converter is one file here plus one line.

**Task order.** Where the converted layout depends on the model's task order (DenseMTL's fusion
convs concatenate the other tasks' features in that order), the converter takes it as the option
``tasks`` (``mtl-jax convert-weights --config=CONFIG`` passes the config's
``experiment.task_order``) and records it in the file as ``meta/task_order``; loading the file
into a model whose task order differs is refused (:func:`check_task_order`), since the shapes
agree and strict loading alone would permute channels silently.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.models.converters.densemtl import convert_densemtl
from mtl_jax.models.converters.mtan import convert_mtan_segnet
from mtl_jax.models.converters.torch_names import TASK_ORDER_KEY
from mtl_jax.models.converters.xtask_mt import convert_xtask_mt

PyTree = Any
#: Converters whose option ``tasks`` is the model's task order (``convert-weights --config``).
TAKES_TASK_ORDER = ("densemtl",)
Converter = Callable[..., dict[str, np.ndarray]]
#: Subtrees of a converted file that belong to another network than the model (written as
#: ``<part>/params/...``, ``<part>/batch_stats/...``): DenseMTL's pose network.
PARTS = ("pose_net",)

CONVERTERS: dict[str, Converter] = {
    "densemtl": convert_densemtl,  # astra-vision/DenseMTL (ResNet-101, 3-ways heads, mTEB)
    "mtan": convert_mtan_segnet,  # lorenmt/mtan's SegNet (MTAN, NYUv2)
    "xtask_mt": convert_xtask_mt,  # akarimoon/xtask_mt's XTaskTSNet
}


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """All arrays of a local ``.npz`` file; ``UserError`` naming ``what`` when it is missing,
    unreadable, a single ``.npy`` array or empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{what} {path!r} is not a readable .npz file: {e}") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"{what} {path!r} is a single .npy array, not an .npz of named arrays")
    with loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    if not arrays:
        raise UserError(f"{what} {path!r} holds no arrays")
    return arrays


def convert_file(name: str, src: str | os.PathLike, dst: str | os.PathLike,
                 task_order: Sequence[str] | None = None, **options: Any) -> int:
    """Convert the state_dict ``.npz`` at ``src`` with converter ``name`` and write our flat
    variables to ``dst`` (``.npz``). ``task_order``: the model's (``experiment.task_order`` of
    its config), for the converters of ``TAKES_TASK_ORDER``. Returns the number of arrays
    written."""
    if name not in CONVERTERS:
        raise UserError(f"unknown converter --from={name!r}; available: {sorted(CONVERTERS)}")
    if task_order is not None:
        if name not in TAKES_TASK_ORDER:
            raise UserError(f"--from={name}: its output does not depend on the task order "
                            "(names carry the tasks); drop --config")
        order = ",".join(task_order)
        given = options.get("tasks")
        if given is not None and [t.strip() for t in str(given).split(",")] != list(task_order):
            raise UserError(f"--option tasks={given} differs from the config's task order "
                            f"{order}; give one of them")
        options["tasks"] = order
    state_dict = read_npz(src, "PyTorch state_dict file")
    flat = CONVERTERS[name](state_dict, **options)
    np.savez(os.fspath(dst), **flat)
    return len(flat)


def load_variables(path: str | os.PathLike, part: str = "model") -> dict[str, np.ndarray]:
    """A converted file (``convert_file``'s output): flat ``{'params/...': array, ...}``.

    ``part='model'`` (default): the model's variables (and ``meta/task_order``); a subtree of
    another network in the file (:data:`PARTS`, e.g. the pose network ``pose_net/...`` of a
    self-supervised depth checkpoint) is left out. ``part='pose_net'``: that subtree, its
    prefix removed (``UserError`` when the file has none)."""
    if part != "model" and part not in PARTS:
        raise ValueError(f"load_variables: part must be 'model' or one of {PARTS}, not {part!r}")
    flat = read_npz(path, "converted weights file (config.model.init_from)")
    bad = [k for k in flat if k.split("/", 1)[0] not in ("params", "batch_stats", *PARTS)
           and k != TASK_ORDER_KEY]
    if bad:
        raise UserError(f"converted weights file {os.fspath(path)!r} has keys outside "
                        f"params/ and batch_stats/ (e.g. {bad[0]!r}); write it with "
                        "mtl-jax convert-weights --from=NAME SRC.npz DST.npz")
    if part == "model":
        return {k: v for k, v in flat.items() if k.split("/", 1)[0] not in PARTS}
    prefix = f"{part}/"
    sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not sub:
        raise UserError(f"converted weights file {os.fspath(path)!r} holds no {part} weights "
                        f"({prefix}...); convert a checkpoint that has them (e.g. a DenseMTL "
                        "self-supervised depth checkpoint with --from=densemtl)")
    return sub


def file_task_order(flat: Mapping[str, np.ndarray]) -> tuple[str, ...] | None:
    """The task order a converted file was written for (``meta/task_order``), or ``None``
    when its layout does not depend on it."""
    if TASK_ORDER_KEY not in flat:
        return None
    return tuple(str(t) for t in np.asarray(flat[TASK_ORDER_KEY]).reshape(-1))


def check_task_order(flat: Mapping[str, np.ndarray], model_order: Sequence[str],
                     path: str | os.PathLike = "converted weights") -> None:
    """``UserError`` when the file was converted for another task order than the model's."""
    file_order = file_task_order(flat)
    if file_order is None or tuple(file_order) == tuple(model_order):
        return
    raise UserError(
        f"{os.fspath(path)} was converted for the task order {','.join(file_order)} but the "
        f"model's (config.task_order) is {','.join(model_order)}: convert again with "
        f"--config=<this config> (or --option tasks={','.join(model_order)})")


def apply_variables(params: PyTree, batch_stats: PyTree, flat: Mapping[str, np.ndarray]
                    ) -> tuple[dict, dict]:
    """Replace every leaf of ``params`` and ``batch_stats`` by ``flat['<collection>/<path>']``.

    Strict: the file must hold exactly the model's leaves with the model's shapes; the error
    lists how many leaves are missing, extra or misshapen and names the first of each. Values
    come back as host numpy arrays in the model's dtypes. The targets may be
    ``jax.ShapeDtypeStruct`` trees (a check before any initialisation).
    """
    out = []
    seen: set[str] = set()
    missing, shapes = [], []
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        target = traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}
        new = {}
        for path, leaf in target.items():
            key = f"{collection}/{path}"
            if key not in flat:
                missing.append(f"{key} {tuple(leaf.shape)}")
                continue
            seen.add(key)
            value = np.asarray(flat[key])
            if tuple(value.shape) != tuple(leaf.shape):
                shapes.append(f"{key}: file {tuple(value.shape)}, model {tuple(leaf.shape)}")
                continue
            new[path] = value.astype(leaf.dtype)
        out.append(traverse_util.unflatten_dict(new, sep="/") if new else {})
    extra = sorted(set(flat) - seen - {TASK_ORDER_KEY})
    if missing or shapes or extra:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing from the file", missing), ("with other shapes", shapes),
                  ("in the file but not in the model", extra)) if v]
        raise UserError("converted weights do not fit the model (same architecture, task set, "
                        "classes and widths as the converted checkpoint?): " + "; ".join(parts))
    return out[0], out[1]

__all__ = ["CONVERTERS", "PARTS", "TAKES_TASK_ORDER", "TASK_ORDER_KEY", "apply_variables",
           "check_task_order", "convert_file", "file_task_order", "load_variables", "read_npz"]
