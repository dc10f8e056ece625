"""Which CPU kernels are on: the environment switches and a context manager.

Both are read when a model is **traced** (``jax.jit`` caches what it traced, so set them before
the first step, or use a new jitted function).

- ``MTL_JAX_CPU_KERNELS``: ``on`` (default), ``off`` (every kernel of :data:`KERNELS`: XLA's
  own gradients, plain ``relu(a + b)``, JAX's derivative of BatchNorm), or a comma-separated
  list of the kernels to switch off, e.g. ``max_pool,add_relu``.
- ``MTL_JAX_CPU_CONV_GRAD``: ``taps`` (default) or ``xla`` (switches off ``conv`` only; the
  older switch, kept).
- ``with disabled('max_pool', ...):`` (all kernels when no name is given) within one process,
  e.g. to compare both programs in one benchmark; ``xla_conv_gradients()`` is
  ``disabled('conv')``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from mtl_jax.errors import UserError

#: The switchable kernels (the table in :mod:`mtl_jax.models.cpu_grads`).
KERNELS = ("conv", "max_pool", "add_relu", "batch_norm")
CPU_KERNELS_ENV = "MTL_JAX_CPU_KERNELS"
CONV_GRAD_ENV = "MTL_JAX_CPU_CONV_GRAD"

_OFF: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "mtl_jax_cpu_kernels_off", default=frozenset())


class SwitchError(UserError, ValueError):
    """An environment switch of the CPU kernels has a value it does not know."""


def _check_names(names: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        raise SwitchError(f"{where}: unknown CPU kernel(s) {unknown}; the kernels are "
                          f"{', '.join(KERNELS)}")


def switched_off() -> frozenset[str]:
    """The kernels switched off now (environment and :func:`disabled` together)."""
    value = os.environ.get(CPU_KERNELS_ENV, "on").strip().lower()
    if value in ("", "on"):
        off: set[str] = set()
    elif value == "off":
        off = set(KERNELS)
    else:
        off = {name.strip() for name in value.split(",") if name.strip()}
        try:
            _check_names(off, f"{CPU_KERNELS_ENV}={value!r}")
        except SwitchError as e:
            raise SwitchError(f"{e}: use 'on' (default), 'off', or a comma-separated list of "
                              "kernels to switch off") from None
    mode = os.environ.get(CONV_GRAD_ENV, "taps").strip().lower()
    if mode not in ("taps", "xla"):
        raise SwitchError(f"{CONV_GRAD_ENV}={mode!r}: use 'taps' (default) or 'xla'")
    if mode == "xla":
        off.add("conv")
    return frozenset(off) | _OFF.get()


def enabled(kernel: str) -> bool:
    """Whether ``kernel`` (one of :data:`KERNELS`) is on."""
    _check_names({kernel}, "cpu_grads.enabled")
    return kernel not in switched_off()


@contextlib.contextmanager
def disabled(*kernels: str) -> Iterator[None]:
    """Within this context, the named kernels (all of :data:`KERNELS` if none is named) are off
    for whatever is traced."""
    names = frozenset(kernels) if kernels else frozenset(KERNELS)
    _check_names(names, "cpu_grads.disabled")
    token = _OFF.set(_OFF.get() | names)
    try:
        yield
    finally:
        _OFF.reset(token)


def xla_conv_gradients() -> contextlib.AbstractContextManager[None]:
    """Convolutions traced within this context keep XLA's own gradients on every backend
    (``disabled('conv')``; the process-wide switch is ``MTL_JAX_CPU_CONV_GRAD=xla``)."""
    return disabled("conv")
