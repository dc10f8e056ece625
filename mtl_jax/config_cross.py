"""The rules of the config schema (:mod:`mtl_jax.config_schema`) that relate several keys, or
a key and the devices: :data:`CROSS`, checked in order after every key's own rule. Each rule
returns an error message of one line or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# ``devices`` is (devices of the mesh, processes) or None when unknown.


@dataclasses.dataclass(frozen=True)
class Cross:
    keys: str
    rule: str
    check: Callable[[dict, tuple[int, int] | None], str | None]


def _get(flat: dict, key: str, default: Any = None) -> Any:
    return flat.get(key, default)


def _batch_vs_devices(flat: dict, devices: tuple[int, int] | None) -> str | None:
    if devices is None:
        return None
    n_dev, n_proc = devices
    for key in ("batch_size", "eval_batch_size"):
        value = _get(flat, key) or flat["batch_size"]
        for n, what in ((n_dev, "devices of the data-parallel mesh"), (n_proc, "processes")):
            if value % n:
                return (f"config.{key}={value} is not divisible by the {n} {what} "
                        f"(config.num_devices={_get(flat, 'num_devices', -1)}); set "
                        f"config.{key} to a multiple of {n} or config.num_devices to a "
                        f"divisor of {value}")
    return None


def _uda_batch(flat: dict, devices: tuple[int, int] | None) -> str | None:
    if not any(k.startswith("uda.") for k in flat):
        return None
    bs = flat["batch_size"]
    n_dev = devices[0] if devices else 1
    if bs % 2 or (bs // 2) % n_dev:
        return (f"config.batch_size={bs}: a domain-adaptation batch is half source, half "
                f"target: it must be even and each half divisible by the {n_dev} devices "
                f"(e.g. --config.batch_size={2 * n_dev * max(1, bs // (2 * n_dev))})")
    return None


def _num_devices(flat: dict, devices: tuple[int, int] | None) -> str | None:
    n = _get(flat, "num_devices", -1)
    if devices is None or n == -1:
        return None
    import jax

    visible = len(jax.devices())
    if n > visible:
        return (f"config.num_devices={n} but only {visible} devices are visible "
                f"(e.g. --config.num_devices={visible}, or -1 for all)")
    return None


def _schedule(flat: dict, devices: tuple[int, int] | None) -> str | None:
    del devices
    total = flat["num_train_steps"]
    for prefix in ("optimizer", "uda.optimizer"):
        warmup = _get(flat, f"{prefix}.warmup_steps", 0) or 0
        if warmup >= total:
            return (f"config.{prefix}.warmup_steps={warmup} must be below "
                    f"config.num_train_steps={total} (the learning rate would never reach its "
                    f"base value), e.g. --config.{prefix}.warmup_steps={total // 10}")
        if _get(flat, f"{prefix}.schedule", "constant") != "step":
            continue
        bounds = list(_get(flat, f"{prefix}.decay_steps", ()) or ())
        bad = [b for b in bounds if not warmup < b < total]
        if bad or bounds != sorted(set(bounds)):
            return (f"config.{prefix}.decay_steps={tuple(bounds)} with "
                    f"config.num_train_steps={total}"
                    + (f" and warmup_steps={warmup}" if warmup else "")
                    + ": the decay boundaries must increase strictly and lie within the run, "
                    f"between {warmup} and {total} (exclusive), or they are ignored, e.g. "
                    f"--config.{prefix}.decay_steps=({max(warmup + 1, int(total * 0.75))},)")
    return None


def _stage_switch(flat: dict, devices: tuple[int, int] | None) -> str | None:
    del devices
    frac = _get(flat, "model.stage_switch", 0.0) or 0.0
    if not frac:
        return None
    total = flat["num_train_steps"]
    switch = int(frac * total)
    if not 1 <= switch < total:
        return (f"config.model.stage_switch={frac} with config.num_train_steps={total} puts the "
                f"stage switch at step {switch}, outside the run (steps 1..{total - 1}): "
                "one stage would never train; raise config.num_train_steps or set "
                "config.model.stage_switch=0 (no staging)")
    return None


#: The rules between keys, in the order they are checked.
CROSS: tuple[Cross, ...] = (
    Cross("num_devices", "at most the devices visible (-1: all of them)", _num_devices),
    Cross("batch_size, eval_batch_size, num_devices",
          "divisible by the devices of the data-parallel mesh and by the processes "
          "(train, eval)", _batch_vs_devices),
    Cross("batch_size, uda", "a domain-adaptation batch is even, each half divisible by the "
          "devices", _uda_batch),
    Cross("optimizer.warmup_steps, optimizer.decay_steps, num_train_steps (also uda.optimizer)",
          "warmup below num_train_steps; 'step' decay boundaries increase strictly and lie "
          "between warmup_steps and num_train_steps (exclusive)", _schedule),
    Cross("model.stage_switch, num_train_steps",
          "staged ATI-Net: the switch step int(stage_switch * num_train_steps) lies within "
          "1 .. num_train_steps - 1", _stage_switch),
)
