"""The interface of a loss-weighting / gradient-combination strategy.

Everything runs inside the one jitted, sharded train step. A strategy is a frozen dataclass
(hashable; closed over by ``jax.jit``) whose hyper-parameters are its fields:

* ``requires`` (class attribute) says what the step computes for it:

  - ``'losses'``: the per-task losses only (``ew``, ``fixed``, ``uw``, ``dwa``, ``rlw``,
    ``famo``). The step differentiates ``sum_t w_t * L_t`` once.
  - ``'decoder_grads'``: also ``decoder_grads = {task: gradient of L_t w.r.t. the parameters
    of decoder t}`` (``grad_magnitude``). The step runs the encoder once, one VJP per decoder
    (which yields both the decoder gradient and the cotangent of L_t at the shared features),
    weights the cotangents and pulls one combined cotangent back through the encoder.
  - ``'task_grads'``: also ``grads``, a float32 matrix ``[T, N]`` whose row t is the gradient
    of L_t w.r.t. the shared parameters (flattened; optionally only those under
    ``grad_param_prefix``), or w.r.t. the shared representation (the encoder's output
    features, flattened) when the strategy's ``rep_grad`` field is True (much cheaper).
    ``pcgrad``, ``mgda``, ``cagrad``, ``imtl``, ``nash_mtl``, ``aligned_mtl``, ``upgrad``,
    ``gradnorm``.

* ``init(tasks) -> state``: a pytree of arrays (possibly ``{}``) kept in
  ``TrainState.weighting_state`` and checkpointed with it (learnable weights, loss histories,
  solver warm starts, optimiser states of the strategy's own parameters).

* ``__call__(losses, state, step, *, rng, grads=None, decoder_grads=None) -> WeightingOutput``
  with ``losses`` a dict ``{task: float32 scalar}`` in task order (row order of ``grads``),
  ``step`` an int32 scalar, ``rng`` a PRNG key for this step. It returns per-task weights
  ``w_t`` (float32 scalars) with the meaning: **the shared parameters are updated with the
  gradient ``sum_t w_t * g_t``**. Every gradient-surgery method in this package (PCGrad,
  MGDA, CAGrad, IMTL, Nash-MTL, Aligned-MTL, UPGrad) returns a vector in the span of the task
  gradients, so it is expressed by such coefficients; the step forms the combination once, by
  linearity (one pull-back of the combined cotangent, or one weighted sum of the per-task
  gradients it already has). Weights are constants for differentiation (the step stops
  gradients through them). Everything must be jit-compatible: fixed iteration counts, no
  Python control flow on traced values.

* ``decoder_weighting`` (class attribute): ``'weights'`` -- decoder t is trained with
  ``w_t * grad L_t`` (loss-weighting methods); ``'ones'`` -- with the plain ``grad L_t``
  (gradient-surgery methods, whose coefficients only make sense for the shared part).
  A strategy may instead return ``decoder_weights`` (``{task: scalar}``) in its output,
  which then train decoder t with ``decoder_weights[t] * grad L_t``.

* Directions outside the span of the current gradients (per-coordinate masks or trimming,
  moving averages of past gradients): a ``'task_grads'`` strategy may return
  ``shared_grad``, a float32 vector ``[N]`` in the layout of the rows of ``grads``; the
  step then updates the shared part with it instead of ``sum_t w_t g_t`` (with ``rep_grad``
  it is pulled back through the encoder) and the weights only label the step (logged, and
  ``loss/total = sum_t w_t L_t``). Such methods (``graddrop``, ``trimmed_mean``, ``moco``,
  ``db_mtl``) need the full gradients, so grad_param_prefix does not apply to them.

* ``needs_grad_dim`` (class attribute): when True, ``init(tasks, grad_dim=N)`` receives the
  number of shared parameters (the row length of ``grads`` without ``rep_grad``), for
  states that keep per-task gradient histories ``[T, N]`` (``moco``, ``db_mtl``,
  ``excess_mtl``). ``supports_rep_grad`` (class attribute): False for those, whose history
  of representation gradients (other examples at every step) would mean nothing.

The step logs every weight as ``train/weight/<task>`` and every diagnostic ``d`` as
``train/weighting/<d>``, every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.errors import UserError

PyTree = Any


@flax.struct.dataclass
class WeightingOutput:
    """What a strategy returns inside the step (a pytree)."""

    weights: dict[str, jax.Array]
    state: PyTree
    diagnostics: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
    #: Optional: the shared update ``[N]`` (layout of the rows of ``grads``); see above.
    shared_grad: jax.Array | None = None
    #: Optional: per-task decoder weights, overriding ``decoder_weighting``.
    decoder_weights: dict[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Weighting:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    requires: ClassVar[str] = "losses"
    decoder_weighting: ClassVar[str] = "weights"
    needs_grad_dim: ClassVar[bool] = False
    supports_rep_grad: ClassVar[bool] = True

    def init(self, tasks: Sequence[str]) -> PyTree:
        del tasks
        return {}

    def __call__(self, losses: Mapping[str, jax.Array], state: PyTree, step: jax.Array, *,
                 rng: jax.Array | None = None, grads: jax.Array | None = None,
                 decoder_grads: Mapping[str, PyTree] | None = None) -> WeightingOutput:
        raise NotImplementedError

    def task_grads(self, grads: jax.Array | None) -> jax.Array:
        """The ``[T, N]`` per-task gradient matrix a ``'task_grads'`` strategy was given, as
        float32; ValueError when the caller passed none."""
        if grads is None:
            raise ValueError(f"{self.name} needs the per-task gradients "
                             "(requires='task_grads')")
        return jnp.asarray(grads, jnp.float32)


def check_choice(weighting: str, option: str, value: Any, choices: Sequence[Any]) -> None:
    """UserError naming the option, its choices and the value when ``value`` is not one of
    ``choices``."""
    if value not in choices:
        raise UserError(f"weighting {weighting!r}: {option} must be one of {tuple(choices)}, "
                        f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class GradientWeighting(Weighting):
    """Base of the ``'task_grads'`` strategies (gradient surgery and the like).

    ``rep_grad`` (field) is read by the train step: the rows of ``grads`` are then gradients
    w.r.t. the shared representation instead of the shared parameters. Decoders get their
    plain gradients unless a subclass says ``decoder_weighting = 'weights'``.
    """

    requires: ClassVar[str] = "task_grads"
    decoder_weighting: ClassVar[str] = "ones"

    rep_grad: bool = False


@dataclasses.dataclass(frozen=True)
class OwnOptimizerWeighting(Weighting):
    """Base of the strategies that train their own per-task parameters with ``optax.adam`` or
    ``optax.sgd`` (one step per call from an analytic gradient): the subclass declares the
    fields ``learning_rate`` and ``optimizer`` (``'adam'`` or ``'sgd'``)."""

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adam", "sgd")

    def __post_init__(self):
        check_choice(self.name, "optimizer", self.optimizer, self.OPTIMIZERS)

    def _tx(self) -> optax.GradientTransformation:
        if self.optimizer == "adam":
            return optax.adam(self.learning_rate)
        return optax.sgd(self.learning_rate)

    def step_params(self, params: jax.Array, grad: jax.Array,
                    opt_state: PyTree) -> tuple[jax.Array, PyTree]:
        """``(params after one optimiser step on grad, new optimiser state)``."""
        updates, opt_state = self._tx().update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def stack_losses(losses: Mapping[str, jax.Array]) -> jax.Array:
    """``{task: scalar}`` -> float32 ``[T]`` in task order."""
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in losses.values()])


def unstack(tasks: Sequence[str], values: jax.Array) -> dict[str, jax.Array]:
    """float32 ``[T]`` -> ``{task: scalar}``."""
    return {t: values[i].astype(jnp.float32) for i, t in enumerate(tasks)}


def gram_matrix(grads: jax.Array) -> jax.Array:
    """``G Gᵀ`` (float32 ``[T, T]``, full precision) of per-task gradient rows ``[T, N]``.

    The surgery solvers work on this matrix only, so ``N`` (millions) never enters them.
    """
    g = jnp.asarray(grads, jnp.float32)
    return jnp.dot(g, g.T, precision=jax.lax.Precision.HIGHEST)


def gram_scale(gram: jax.Array, floor: float = 0.0) -> jax.Array:
    """``trace(gram) / T`` (the mean squared gradient norm) where it is above ``floor``, else
    1: the factor that normalises a Gram matrix to O(1) entries."""
    scale = jnp.trace(gram) / gram.shape[0]
    return jnp.where(scale > floor, scale, 1.0)


def gram_norms(gram: jax.Array) -> jax.Array:
    """``[T]`` norms of the gradients whose Gram matrix is ``gram``."""
    return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))


def combination_norm(gram: jax.Array, coeffs: jax.Array) -> jax.Array:
    """``||sum_t coeffs_t g_t||`` from the Gram matrix of the ``g_t``."""
    return jnp.sqrt(jnp.maximum(coeffs @ gram @ coeffs, 0.0))


def off_diagonal_mean(matrix: jax.Array) -> jax.Array:
    """Mean of the ``T (T - 1)`` off-diagonal entries of a ``[T, T]`` matrix (0 for T = 1)."""
    num = matrix.shape[0]
    off_diagonal = ~jnp.eye(num, dtype=bool)
    return jnp.sum(jnp.where(off_diagonal, matrix, 0)) / max(num * (num - 1), 1)


def task_permutations(rng: jax.Array | None, step: jax.Array, num_tasks: int) -> jax.Array:
    """int ``[T, T]``: row i is a random order of the T tasks for task i (PCGrad's and
    GradVac's visiting orders), drawn from ``rng`` (a key derived from ``step`` when None)."""
    if rng is None:
        rng = jax.random.fold_in(jax.random.key(0), step)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(
        jax.random.split(rng, num_tasks))


# The [T, N] layout of per-task gradients, shared by the train step and the strategies.

def flat_rows(per_task: PyTree) -> jax.Array:
    """Pytree whose leaves have a leading task axis ``T`` -> float32 ``[T, N]``."""
    leaves = jax.tree.leaves(per_task)
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves],
                           axis=1)


def unflatten_row(row: jax.Array, per_task: PyTree) -> PyTree:
    """Inverse of :func:`flat_rows` for one row: float32 ``[N]`` -> a pytree shaped like one
    task's slice of ``per_task`` (leaves ``x.shape[1:]``, their dtypes)."""
    leaves, treedef = jax.tree.flatten(per_task)
    out, start = [], 0
    for x in leaves:
        size = int(np.prod(x.shape[1:]))
        out.append(row[start:start + size].reshape(x.shape[1:]).astype(x.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def decoder_weights_of(weighting: Weighting, wout: WeightingOutput, w: Mapping[str, Any]
                       ) -> Mapping[str, Any]:
    """Per-task decoder weights: the output's ``decoder_weights`` when given, else ``w`` or 1
    by the strategy's ``decoder_weighting``."""
    if wout.decoder_weights is not None:
        return jax.lax.stop_gradient(wout.decoder_weights)
    return w if weighting.decoder_weighting == "weights" else {t: 1.0 for t in w}


def select_prefix(tree: PyTree, prefix: str) -> PyTree:
    """The sub-tree of ``tree`` whose '/'-joined path starts with ``prefix``."""
    if not prefix:
        return tree
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    chosen = {k: v for k, v in flat.items() if k.startswith(prefix)}
    if not chosen:
        raise ValueError(f"grad_param_prefix {prefix!r} matches no shared parameter; e.g. "
                         f"{sorted(flat)[-3:]}")
    return chosen
