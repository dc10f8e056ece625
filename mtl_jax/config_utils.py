"""Helpers for experiment configs (``configs/*.py``): typed argument strings and checks.

A config file's ``get_config(arg)`` receives the text after the colon of
``--config=configs/x.py:arg``; arguments combine with commas, e.g.
``configs/quickstart.py:smoke,weighting=dwa``. :func:`parse_arg` turns that text into a
``ConfigDict`` typed after the defaults the config declares (a bare name sets a boolean to
``True``), and rejects names the config does not know, listing those it does.
:func:`load_config` reads a config file as ``--config`` does: the one loader of the library,
its configs (a config built on another), predict, the notebooks and the tests.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from mtl_jax.errors import UserError
from mtl_jax.tasks import TASKS


def _convert(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"config argument {name!r} is a flag; got {text!r} (use {name} or "
                        f"{name}=false)")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError as e:
        raise UserError(f"config argument {name!r} must be a {type(default).__name__}, "
                        f"got {text!r}") from e
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse ``'a=1,flag,b=x'`` into a ConfigDict typed after ``defaults``.

    Raises ``UserError`` for an unknown name (listing the known ones) or a value of the
    wrong type.
    """
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise UserError(f"unknown config argument {name!r}; this config takes: "
                            + ", ".join(f"{k} (default {v!r})" for k, v in defaults.items()))
        if not eq:
            if not isinstance(defaults[name], bool):
                raise UserError(f"config argument {name!r} needs a value: {name}=...")
            out[name] = True
        else:
            out[name] = _convert(name, value.strip(), defaults[name])
    return ml_collections.ConfigDict(out)




def task_set(letters: str) -> tuple[str, ...]:
    """``'sdn'`` -> ``('semseg', 'depth', 'normals')`` (the papers' S-D-N-E notation)."""
    known = {cls.letter: name for name, cls in TASKS.items()}  # each task's ``Task.letter``
    unknown = [c for c in letters if c not in known]
    if unknown or not letters:
        raise UserError(f"task set {letters!r}: use letters from {known}")
    return tuple(known[c] for c in letters)


def load_config_module(path: str, *, relative_to: str | None = None) -> Any:
    """The module of config file ``path`` (its ``get_config`` and constants); ``relative_to``
    (a file, e.g. a config's ``__file__``) resolves a relative path from that file's folder.
    A missing file is a :class:`UserError` naming it."""
    if relative_to is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    name = "_mtl_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config(arg) function")
    return module


def load_config(spec: str, arg: str | None = None, *,
                relative_to: str | None = None) -> ml_collections.ConfigDict:
    """``configs/x.py[:args]`` → the file's ``get_config(args)``, as ``--config`` reads it
    (``arg``, if given, replaces the text after the colon; ``relative_to`` as in
    :func:`load_config_module`)."""
    path, colon, spec_arg = spec.partition(":")
    module = load_config_module(path, relative_to=relative_to)
    return module.get_config(arg if arg is not None else (spec_arg if colon else None))
