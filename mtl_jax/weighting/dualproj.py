"""DualProj: the mean gradient projected onto the dual cone of the task gradients (TorchJD;
Gradient Episodic Memory, Lopez-Paz & Ranzato, NeurIPS 2017, eq. 11)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from mtl_jax.errors import UserError
from mtl_jax.weighting.base import GradientWeighting, WeightingOutput, gram_matrix, unstack
from mtl_jax.weighting.upgrad import project_weights


@dataclasses.dataclass(frozen=True)
class DualProj(GradientWeighting):
    """TorchJD's ``DualProj``: the mean of the task gradients ``J^T u`` (``u = 1/T``)
    projected onto the dual cone ``{x : J x >= 0}`` (the directions that conflict with no
    task), the problem of GEM's eq. 11.

    As for UPGrad (same paper's Proposition): the projection is ``J^T v`` with
    ``v = argmin_{v >= u} v^T J J^T v``, solved exactly on the T x T Gram matrix by the
    active-set method of :func:`mtl_jax.weighting.upgrad.project_weights` (``iterations``
    steps, ridge ``reg_eps`` relative to the mean squared gradient norm; TorchJD uses
    ``reg_eps`` = 1e-4 relative to the trace). The weights are ``v``: with no conflict
    ``v = u``. ``decoder_weighting = 'ones'``; ``rep_grad`` is read by the train step.
    Diagnostic ``kkt_residual`` (relative units, ~1e-6 when solved).
    """

    name: ClassVar[str] = "dualproj"

    iterations: int = 32
    reg_eps: float = 1e-4

    def __post_init__(self):
        if int(self.iterations) < 1 or self.reg_eps < 0:
            raise UserError(f"weighting 'dualproj': need iterations >= 1 (got "
                            f"{self.iterations}) and reg_eps >= 0 (got {self.reg_eps})")

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        gram = gram_matrix(self.task_grads(grads))
        mean = jnp.full((1, num_tasks), 1.0 / num_tasks, jnp.float32)
        coeffs, kkt = project_weights(gram, mean, iterations=int(self.iterations),
                                      reg_eps=self.reg_eps)
        return WeightingOutput(unstack(tasks, coeffs[0]), state, {"kkt_residual": kkt})
