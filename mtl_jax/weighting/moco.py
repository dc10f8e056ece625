"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtl_jax.weighting import history
from mtl_jax.weighting.base import WeightingOutput, stack_losses, unstack


@dataclasses.dataclass(frozen=True)
class MoCo(history.GradientHistory):
    """"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
    Fernando et al., ICLR 2023 (MoCo), in LibMTL's form.

    State: tracking gradients ``y [T, N]`` (0 at the start), weights ``lambda [T]`` (1/T),
    call counter ``k``. Each call (``k`` counts from 1), with ``g_t`` the gradient of
    ``L_t`` w.r.t. the shared parameters:

    * ``h_t = g_t / (||g_t|| + 1e-8) * L_t`` (LibMTL's normalisation by the loss);
    * ``y <- y - (beta / k^beta_sigma) (y - h)``;
    * ``lambda <- softmax(lambda - (gamma / k^gamma_sigma) (y y^T + rho I) lambda)``;
    * shared update ``y^T lambda`` (returned as ``shared_grad``: ``y`` holds past gradients,
      so the direction is no combination of this step's).

    Defaults as LibMTL: ``beta`` 0.5, ``beta_sigma`` 0.5, ``gamma`` 0.1, ``gamma_sigma``
    0.5, ``rho`` 0. The weights are ``lambda``; decoders get their plain gradients
    (``decoder_weighting = 'ones'``). ``y`` costs ``T x`` the shared parameters in the
    state (checkpointed). No ``rep_grad`` (UserError), as in LibMTL.
    """

    name: ClassVar[str] = "moco"

    beta: float = 0.5
    beta_sigma: float = 0.5
    gamma: float = 0.1
    gamma_sigma: float = 0.5
    rho: float = 0.0

    def init(self, tasks: Sequence[str], grad_dim: int = 0):
        num = len(tasks)
        return {"y": history.history_zeros(self.name, num, grad_dim),
                "lambda": jnp.full((num,), 1.0 / num, jnp.float32),
                "count": jnp.zeros((), jnp.int32)}

    def __call__(self, losses, state, step, *, rng=None, grads=None,
                 decoder_grads=None) -> WeightingOutput:
        del step, rng, decoder_grads
        tasks = list(losses)
        num_tasks = len(tasks)
        grads, y = self.read_history(state, "y", grads)
        count = history.next_count(state)
        k = count.astype(jnp.float32)
        values = stack_losses(losses)
        scaled = grads / (history.row_norms(grads) + 1e-8)[:, None] * values[:, None]
        y = y - (self.beta / k ** self.beta_sigma) * (y - scaled)
        lam = jnp.asarray(state["lambda"], jnp.float32)
        gram_y = jnp.dot(y, y.T, precision=jax.lax.Precision.HIGHEST)
        lam = jax.nn.softmax(lam - (self.gamma / k ** self.gamma_sigma)
                             * ((gram_y + self.rho * jnp.eye(num_tasks)) @ lam))
        shared = jnp.dot(lam, y, precision=jax.lax.Precision.HIGHEST)
        new_state = {"y": y, "lambda": lam, "count": count}
        return WeightingOutput(unstack(tasks, lam), new_state, shared_grad=shared)
