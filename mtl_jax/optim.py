"""Optimisers and learning-rate schedules from a config (optax).

Config (``config.optimizer``)::

    name='adam' | 'adamw' | 'sgd'
    learning_rate=1e-4          # base (peak) learning rate
    b1=0.9, b2=0.999, eps=1e-8, momentum=0.9 (sgd)
    weight_decay=0.0            # adamw: decoupled; sgd: L2 added to the gradient (torch)
    schedule='constant' | 'step' | 'cosine' | 'poly'
    warmup_steps=0
    decay_steps=(...)           # 'step': boundaries (absolute steps)
    decay_factor=0.1            # 'step': multiply at every boundary
    min_lr_ratio=0.0            # 'cosine': final lr = ratio * base
    power=0.9                   # 'poly': lr = base * (1 - step / total) ** power
    part_lr_multipliers={'encoder': 0.1}   # per top-level parameter part; others 1.0
    grad_clip_norm=None | float # global-norm clipping of the combined gradient

Per-part learning rates use ``optax.multi_transform`` over the top-level keys of the
parameter tree (``encoder``, ``decoders``, ``exchange``, ...), so the "encoder vs. the rest"
split of the papers is ``part_lr_multipliers={'encoder': r}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from mtl_jax.errors import UserError

#: ``config.optimizer.name`` and ``.schedule`` choices (checked by :mod:`mtl_jax.config_schema`).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine", "poly")


def make_schedule(cfg: Mapping[str, Any], total_steps: int, base_lr: float) -> optax.Schedule:
    """The learning-rate schedule (a function of the step) for one parameter part."""
    name = cfg.get("schedule", "constant")
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    if name == "constant":
        main = optax.constant_schedule(base_lr)
    elif name == "step":
        boundaries = [int(b) - warmup for b in (cfg.get("decay_steps", ()) or ())]
        factor = float(cfg.get("decay_factor", 0.1))
        main = optax.piecewise_constant_schedule(base_lr, {b: factor for b in boundaries if b > 0})
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base_lr, max(1, total_steps - warmup),
                                           alpha=float(cfg.get("min_lr_ratio", 0.0)))
    elif name == "poly":
        main = optax.polynomial_schedule(base_lr, 0.0, float(cfg.get("power", 0.9)),
                                         max(1, total_steps - warmup))
    else:
        raise UserError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])
    return main


def _base_optimizer(cfg: Mapping[str, Any], lr: optax.Schedule) -> optax.GradientTransformation:
    name = cfg.get("name", "adam")
    if name == "adam":
        return optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                          eps=cfg.get("eps", 1e-8))
    if name == "adamw":
        return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                           eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 1e-4))
    if name == "sgd":
        sgd = optax.sgd(lr, momentum=cfg.get("momentum", 0.9))
        decay = float(cfg.get("weight_decay", 0.0) or 0.0)
        # torch.optim.SGD's weight_decay: wd·param added to the gradient before momentum.
        return optax.chain(optax.add_decayed_weights(decay), sgd) if decay else sgd
    raise UserError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int,
                   params: Any | None = None) -> optax.GradientTransformation:
    """Optimiser with clipping, schedule and optional per-part learning-rate multipliers.

    ``params`` (or its shape tree) is needed only when ``part_lr_multipliers`` is set, to
    check that the named parts exist.
    """
    base_lr = float(cfg.get("learning_rate", 1e-3))
    mults = dict(cfg.get("part_lr_multipliers", None) or {})
    clip = cfg.get("grad_clip_norm", None)
    chain = [optax.clip_by_global_norm(float(clip))] if clip else []
    if not mults:
        chain.append(_base_optimizer(cfg, make_schedule(cfg, total_steps, base_lr)))
        return optax.chain(*chain)
    if params is not None:
        missing = set(mults) - set(params)
        if missing:
            raise UserError(f"part_lr_multipliers names parts {sorted(missing)} that the model "
                            f"does not have; its parts are {sorted(params)}")
    groups = {part: _base_optimizer(cfg, make_schedule(cfg, total_steps, base_lr * float(m)))
              for part, m in mults.items()}
    groups["__rest__"] = _base_optimizer(cfg, make_schedule(cfg, total_steps, base_lr))

    def labels(tree):
        return {part: jax.tree.map(lambda _, p=part: p if p in mults else "__rest__", sub)
                for part, sub in tree.items()}

    chain.append(optax.multi_transform(groups, labels))
    return optax.chain(*chain)


def learning_rates(cfg: Mapping[str, Any], total_steps: int, step: int) -> dict[str, float]:
    """Learning rate of every part at ``step`` (for logging)."""
    base_lr = float(cfg.get("learning_rate", 1e-3))
    out = {"base": float(make_schedule(cfg, total_steps, base_lr)(step))}
    for part, m in dict(cfg.get("part_lr_multipliers", None) or {}).items():
        out[part] = float(make_schedule(cfg, total_steps, base_lr * float(m))(step))
    return out
