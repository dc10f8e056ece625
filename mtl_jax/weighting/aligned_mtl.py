"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import (
    GradientWeighting,
    WeightingOutput,
    check_choice,
    gram_matrix,
    gram_scale,
    unstack,
)

_TINY = 1e-30
_FLOAT32_EPS = float(jnp.finfo(jnp.float32).eps)
SCALE_MODES = ("min", "median", "rmse")


@dataclasses.dataclass(frozen=True)
class AlignedMTL(GradientWeighting):
    """"Independent Component Alignment for Multi-Task Learning", Senushkin et al., CVPR 2023
    (Aligned-MTL, Algorithm 1).

    Let the task gradients be the columns of ``G = [g_1 .. g_T]`` (our ``grads`` is
    ``G^T``), with thin SVD ``G = U S V^T`` of rank R (``S = diag(s_1 >= .. >= s_R > 0)``).
    The paper replaces ``G`` by the aligned system ``G' = s_R U V^T``: its singular values
    all equal the smallest one, ``s_R``, so its condition number is 1 (no dominating or
    conflicting components), and updates the shared parameters with ``G' w`` for pre-defined
    task weights ``w``. Algorithm 1 computes this from the T x T Gram matrix only:
    ``M = G^T G = V S^2 V^T`` (eigen-decomposition, eigenvalues ``lambda_i = s_i^2``), hence
    ``U = G V S^-1`` and ``G' = s_R G V S^-1 V^T = G B`` with
    ``B = sqrt(lambda_R) V diag(lambda^-1/2) V^T``. The update is ``G' w = G (B w)``, i.e.
    the coefficients over the task gradients are

        ``weights = B w = sqrt(lambda_R) V_R diag(lambda_R..1^-1/2) V_R^T w``,

    where only the R eigenvalues above ``rank_tol * lambda_max`` (and their eigenvectors)
    are used -- the pseudo-inverse square root, done by masking so shapes stay static --
    and ``lambda_R`` is the smallest of them. ``B`` is invariant to scaling ``M``, which is
    divided by its mean diagonal before ``eigh`` for float32 range. ``rank_tol`` defaults to
    ``T * eps(float32)``, the rule of the authors' code.

    ``scale_mode`` (the authors' ``ProcrustesSolver`` option) picks the common singular value
    of the aligned system, i.e. the ``lambda_R`` above: ``'min'`` (default, the paper) the
    smallest kept eigenvalue; ``'median'`` the median of the kept eigenvalues as
    ``torch.median`` takes it (the lower middle one for an even count); ``'rmse'`` their mean
    (so ``sqrt`` of it is the RMS singular value).

    ``task_weights`` (``{task: w_t}``, empty = 1 for every task) are the paper's pre-defined
    weights; with ones (the authors' code, which sums the aligned gradients) orthonormal
    gradients give weights 1, the plain sum. Decoders get their plain gradients
    (``decoder_weighting = 'ones'``, the authors' default ``scale_decoder_grad=False``).
    All-zero gradients (rank 0) give ``weights = w``.

    ``rep_grad`` is read by the train step (gradients w.r.t. the shared representation: the
    paper's Aligned-MTL-UB). Diagnostics: ``condition_number`` ``= s_1 / s_R`` of the
    original system (1 when rank 0) and ``rank`` R.
    """

    name: ClassVar[str] = "aligned_mtl"

    task_weights: tuple[tuple[str, float], ...] = ()
    rank_tol: float | None = None
    scale_mode: str = "min"

    def __post_init__(self):
        check_choice(self.name, "scale_mode", self.scale_mode, SCALE_MODES)
        if isinstance(self.task_weights, dict) or hasattr(self.task_weights, "items"):
            object.__setattr__(self, "task_weights", tuple(sorted(
                (str(k), float(v)) for k, v in self.task_weights.items())))
        if self.rank_tol is not None and not 0 <= self.rank_tol < 1:
            raise UserError(f"aligned_mtl: rank_tol must be in [0, 1); got {self.rank_tol}")

    def init(self, tasks: Sequence[str]):
        given = dict(self.task_weights)
        if given and (set(given) != set(tasks)):
            raise UserError(f"aligned_mtl: task_weights must name every task {list(tasks)} "
                            f"(or be empty); got {sorted(given)}")
        return {}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del rng, step, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        given = dict(self.task_weights)
        preset = jnp.asarray([given.get(t, 1.0) for t in tasks], jnp.float32)

        grads = self.task_grads(grads)
        gram = gram_matrix(grads)
        gram = gram / gram_scale(gram, _TINY)
        eigvals, eigvecs = jnp.linalg.eigh(gram)

        rel_tol = num_tasks * _FLOAT32_EPS if self.rank_tol is None else self.rank_tol
        lam_max = jnp.max(eigvals)
        keep = (eigvals > rel_tol * lam_max) & (eigvals > 0)
        rank = jnp.sum(keep)
        safe = jnp.where(keep, eigvals, 1.0)
        lam_min = jnp.min(jnp.where(keep, eigvals, jnp.inf))
        lam_min = jnp.where(rank > 0, lam_min, 1.0)
        if self.scale_mode == "median":
            # eigh sorts ascending and the kept eigenvalues are the top R: torch.median's
            # (lower) middle one is at ascending index T - R + (R - 1) // 2.
            index = jnp.clip(num_tasks - rank + (rank - 1) // 2, 0, num_tasks - 1)
            common = jnp.where(rank > 0, eigvals[index], 1.0)
        elif self.scale_mode == "rmse":
            common = jnp.where(rank > 0, jnp.sum(jnp.where(keep, eigvals, 0.0))
                               / jnp.maximum(rank, 1), 1.0)
        else:
            common = lam_min
        factors = jnp.where(keep, jnp.sqrt(common / safe), 0.0)
        align = (eigvecs * factors) @ eigvecs.T  # B = sqrt(common) V diag(lam^-1/2) V^T

        weights = jnp.where(rank > 0, align @ preset, preset)
        cond = jnp.where(rank > 0, jnp.sqrt(jnp.where(rank > 0, lam_max, 1.0) / lam_min), 1.0)
        diagnostics = {"condition_number": cond.astype(jnp.float32),
                       "rank": rank.astype(jnp.float32)}
        return WeightingOutput(unstack(tasks, weights), state, diagnostics)
