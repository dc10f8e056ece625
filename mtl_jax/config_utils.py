"""Helpers for experiment configs (``configs/*.py``): typed argument strings and checks.

A config file's ``get_config(arg)`` receives the text after the colon of
``--config=configs/x.py:arg``; arguments combine with commas, e.g.
``configs/quickstart.py:smoke,weighting=dwa``. :func:`parse_arg` turns that text into a
``ConfigDict`` typed after the defaults the config declares (a bare name sets a boolean to
``True``), and rejects names the config does not know, listing those it does.
"""

from __future__ import annotations

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


#: letter -> task name, from each task's ``letter`` (``Task.letter``)
TASK_LETTERS = {cls.letter: name for name, cls in TASKS.items()}


def task_set(letters: str) -> tuple[str, ...]:
    """``'sdn'`` -> ``('semseg', 'depth', 'normals')`` (the papers' S-D-N-E notation)."""
    known = {cls.letter: name for name, cls in TASKS.items()}  # tasks registered since import
    unknown = [c for c in letters if c not in known]
    if unknown or not letters:
        raise UserError(f"task set {letters!r}: use letters from {known}")
    return tuple(known[c] for c in letters)
