"""Weights from the authors' PyTorch codes, mapped onto our parameter trees.

A converter reads a PyTorch ``state_dict`` saved as an ``.npz`` of ``{name: array}`` (PyTorch
names and layouts: conv weights OIHW, linear weights ``[out, in]``; save one with
``np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})``) and returns our
variables as a flat ``{'params/<path>': array, 'batch_stats/<path>': array}`` dict, with every
source array used exactly once (:class:`~mtl_jax.models.converters.torch_names.TorchStateDict`
enforces it). ``mtl-jax convert-weights --from=NAME SRC.npz DST.npz`` writes that dict; a run
starts from it with ``config.model.init_from=DST.npz`` (every leaf checked against the model:
names and shapes), and ``mtl-jax eval`` evaluates it when the workdir has no checkpoint yet.

Registry: ``CONVERTERS = {name: function(state_dict, **options) -> flat variables}``; adding a
converter is one file here plus one line.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.models.converters.densemtl import convert_densemtl
from mtl_jax.models.converters.mtan import convert_mtan_segnet
from mtl_jax.models.converters.xtask_mt import convert_xtask_mt

PyTree = Any
Converter = Callable[..., dict[str, np.ndarray]]

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
                 **options: Any) -> int:
    """Convert the state_dict ``.npz`` at ``src`` with converter ``name`` and write our flat
    variables to ``dst`` (``.npz``). Returns the number of arrays written."""
    if name not in CONVERTERS:
        raise UserError(f"unknown converter --from={name!r}; available: {sorted(CONVERTERS)}")
    state_dict = read_npz(src, "PyTorch state_dict file")
    flat = CONVERTERS[name](state_dict, **options)
    np.savez(os.fspath(dst), **flat)
    return len(flat)


def load_variables(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A converted file (``convert_file``'s output): flat ``{'params/...': array, ...}``."""
    flat = read_npz(path, "converted weights file (config.model.init_from)")
    bad = [k for k in flat if k.split("/", 1)[0] not in ("params", "batch_stats")]
    if bad:
        raise UserError(f"converted weights file {os.fspath(path)!r} has keys outside "
                        f"params/ and batch_stats/ (e.g. {bad[0]!r}); write it with "
                        "mtl-jax convert-weights --from=NAME SRC.npz DST.npz")
    return flat


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
    extra = sorted(set(flat) - seen)
    if missing or shapes or extra:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing from the file", missing), ("with other shapes", shapes),
                  ("in the file but not in the model", extra)) if v]
        raise UserError("converted weights do not fit the model (same architecture, task set, "
                        "classes and widths as the converted checkpoint?): " + "; ".join(parts))
    return out[0], out[1]

__all__ = ["CONVERTERS", "apply_variables", "convert_file", "load_variables", "read_npz"]
