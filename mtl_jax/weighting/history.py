"""Shared pieces of the strategies that keep per-task gradient histories ``[T, N]`` in their
state (``moco``, ``db_mtl``, ``excess_mtl``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting


def check_no_rep_grad(name: str, rep_grad: bool) -> None:
    """A history of representation gradients mixes other examples at every step: refused
    (as in LibMTL)."""
    if rep_grad:
        raise UserError(f"weighting {name!r} keeps a history of per-task gradients of the shared "
                        "parameters and does not support rep_grad=True; drop rep_grad")


def history_zeros(name: str, num_tasks: int, grad_dim: int) -> jax.Array:
    """float32 zeros ``[T, grad_dim]``; UserError when the step did not say ``grad_dim``."""
    if int(grad_dim) <= 0:
        raise UserError(f"weighting {name!r} needs grad_dim (the number of shared parameters) "
                        "at init; the train step passes it (init_state)")
    return jnp.zeros((num_tasks, int(grad_dim)), jnp.float32)


def check_width(name: str, history: jax.Array, grads: jax.Array) -> None:
    """Static check that this step's gradient rows match the stored history."""
    if history.shape != grads.shape:
        raise ValueError(f"weighting {name!r}: gradient rows {grads.shape} do not match the "
                         f"state's history {history.shape}")


def row_norms(rows: jax.Array) -> jax.Array:
    """Euclidean norm of every row of ``[T, N]``, float32 ``[T]``."""
    return jnp.sqrt(jnp.sum(jnp.square(rows), axis=1))


@dataclasses.dataclass(frozen=True)
class GradientHistory(GradientWeighting):
    """Base of the strategies with a ``[T, N]`` history of per-task gradients of the shared
    parameters in their state: ``init`` gets ``grad_dim``; ``rep_grad`` is refused."""

    needs_grad_dim: ClassVar[bool] = True
    supports_rep_grad: ClassVar[bool] = False

    def __post_init__(self):
        check_no_rep_grad(self.name, self.rep_grad)

    def read_history(self, state: Mapping[str, Any], key: str,
                     grads: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(grads, history)``: this step's float32 gradient rows and the state's history
        ``state[key]``, checked to have the same shape."""
        grads = self.task_grads(grads)
        history = jnp.asarray(state[key], jnp.float32)
        check_width(self.name, history, grads)
        return grads, history


def next_count(state: Mapping[str, Any]) -> jax.Array:
    """int32: the state's call counter plus one (this call's number, from 1)."""
    return jnp.asarray(state["count"], jnp.int32) + 1
