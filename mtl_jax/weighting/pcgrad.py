"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    gram_matrix,
    off_diagonal_mean,
    task_permutations,
    unstack,
)


@dataclasses.dataclass(frozen=True)
class PCGrad(GradientWeighting):
    """"Gradient Surgery for Multi-Task Learning", Yu et al., NeurIPS 2020, Algorithm 1.

    For every task i, start from ``g_i' = g_i`` and visit the other tasks j in a random order
    (a fresh permutation per i, drawn from this step's ``rng``); whenever ``g_i' . g_j < 0``
    replace ``g_i'`` by its projection onto the normal plane of the *original* ``g_j``:
    ``g_i' <- g_i' - (g_i' . g_j / ||g_j||^2) g_j``. The shared update is ``sum_i g_i'``
    (a sum, as in the paper, not a mean). The order in which the tasks i are processed does
    not matter, since each ``g_i'`` only reads the original gradients.

    Everything is done in coefficient space: ``g_i' = sum_k C[i, k] g_k`` with ``C = I`` at
    the start, so every dot product is read from the T x T Gram matrix ``grads @ grads.T``;
    the returned weights are the column sums ``w_k = sum_i C[i, k]``. A zero gradient is
    never projected on (nor projected), so all-zero input gives weights 1.

    ``rep_grad`` is read by the train step (gradients w.r.t. the shared representation instead
    of the shared parameters); the strategy itself ignores it. When ``rng`` is None a key is
    derived from ``step``.

    ``task_order`` fixes the visiting order for reproducibility (the paper and LibMTL draw a
    random one each step): ``()`` (default) random; ``'config'`` the tasks' own order (the
    order of ``losses``, i.e. of ``config.tasks``); a sequence of every task name (or the same
    as a comma-separated string), e.g. ``('depth', 'semseg', 'normals')``. Every task i then
    visits the others in that order. Diagnostic ``conflict_fraction``: the fraction of ordered
    task pairs whose original gradients conflict (negative dot product).
    """

    name: ClassVar[str] = "pcgrad"

    task_order: tuple[str, ...] | str = ()

    def __post_init__(self):
        order = self.task_order
        if isinstance(order, str) and order != "config":
            order = tuple(t.strip() for t in order.split(",") if t.strip())
        elif not isinstance(order, str):
            order = tuple(str(t) for t in order)
        object.__setattr__(self, "task_order", order)

    def _fixed_order(self, tasks: list[str]) -> list[int] | None:
        """Indices of the fixed visiting order, or None for a random one."""
        if self.task_order == "config":
            return list(range(len(tasks)))
        if not self.task_order:
            return None
        if sorted(self.task_order) != sorted(tasks):
            raise UserError(f"pcgrad: task_order {list(self.task_order)} must name every task "
                            f"{tasks} exactly once (or be 'config' / empty)")
        return [tasks.index(t) for t in self.task_order]

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del decoder_grads
        tasks = list(losses)
        grads = self.task_grads(grads)
        num_tasks = grads.shape[0]
        gram = gram_matrix(grads)
        sq_norms = jnp.diagonal(gram)
        safe_sq_norms = jnp.where(sq_norms > 0, sq_norms, 1.0)

        fixed = self._fixed_order(tasks)
        if fixed is None:
            orders = task_permutations(rng, step, num_tasks)
        else:
            orders = jnp.tile(jnp.asarray(fixed, jnp.int32)[None, :], (num_tasks, 1))

        def project_one(i, order_i):
            coeffs = jax.nn.one_hot(i, num_tasks, dtype=jnp.float32)
            for pos in range(num_tasks):  # T is static and small: unrolled.
                j = order_i[pos]
                dot = coeffs @ gram[:, j]
                conflict = (j != i) & (dot < 0)
                shift = jnp.where(conflict, dot / safe_sq_norms[j], 0.0)
                coeffs = coeffs - shift * jax.nn.one_hot(j, num_tasks, dtype=jnp.float32)
            return coeffs

        coeffs = jax.vmap(project_one)(jnp.arange(num_tasks), orders)  # [T(i), T(k)]
        weights = coeffs.sum(axis=0)

        fraction = off_diagonal_mean(gram < 0).astype(jnp.float32)
        return WeightingOutput(unstack(tasks, weights), state, {"conflict_fraction": fraction})
