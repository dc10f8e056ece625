"""Staged training (ATI-Net): a model that changes at one step of the run, with a reset.

A model is *staged* (:class:`~mtl_jax.models.interface.Staged`, :func:`is_staged`) when it
has ``stage_switch`` (a fraction in (0, 1) of
``num_train_steps``), ``stage_one()`` (the same parameter tree, run differently before the
switch, e.g. ATI-Net without its latent distillation) and ``stage_reset_prefixes()``
(parameter paths such as ``'mtan/semseg'`` or ``'decoders'`` to re-initialise at the switch).
``switch = int(stage_switch · num_train_steps)``.

A state whose ``step`` is ``s`` has done ``s`` steps. Steps taken from a state with
``s < switch`` run the stage-1 model; the step taken from ``s == switch`` first applies the
reset and then runs the full (stage-2) model, as do all later ones. Evaluation of a state uses
stage 2 iff ``s > switch``. Both stages are compiled once (two jitted steps chosen on the
host: nothing recompiles per step). Resuming works from any checkpoint: a state saved at
``s <= switch`` is reset when it reaches ``switch``; one saved after it (already reset) is not
reset again.

The reset (:func:`make_reset`, jitted) draws fresh values for exactly the parameters and
batch statistics under the prefixes (the model's initialisers, key ``fold_in(seed, switch)``)
and zeroes their optimiser moments (every optimiser-state leaf that belongs to such a
parameter is replaced by its value in ``tx.init`` -- fresh Adam ``mu``/``nu``); everything else
is left bit-identical, including the optimiser's global step count (optax keeps one count for
all parameters, so the bias correction of the reset parameters continues from the run's
count; PyTorch keeps a per-parameter step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.models.interface import is_staged as is_staged  # re-exported: staging.is_staged

PyTree = Any


def switch_step(model: Any, num_train_steps: int) -> int:
    """The step count at which the run switches to stage 2."""
    return int(float(model.stage_switch) * int(num_train_steps))


def _keys(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def under_prefixes(path: Sequence[Any], prefixes: Sequence[str]) -> bool:
    """Whether a key path (parameter tree, or an optimiser state holding a parameter-shaped
    tree) passes through one of ``prefixes`` (``'a/b'``: consecutive dict keys a, b)."""
    keys = _keys(path)
    for prefix in prefixes:
        want = tuple(prefix.split("/"))
        n = len(want)
        if any(keys[i:i + n] == want for i in range(len(keys) - n + 1)):
            return True
    return False


def select(old: PyTree, fresh: PyTree, prefixes: Sequence[str]) -> PyTree:
    """``old`` with the leaves under ``prefixes`` taken from ``fresh`` (same structure)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, o, f: f if under_prefixes(path, prefixes) else o, old, fresh)


def make_reset(model: Any, prefixes: Sequence[str], tx: Any, image_shape: tuple[int, ...],
               seed: int, switch: int, out_shardings: Any = None) -> Callable:
    """Jitted ``reset(state) -> state`` (module docstring)."""
    prefixes = tuple(prefixes)

    def reset(state):
        key = jax.random.fold_in(jax.random.key(int(seed), impl="rbg"), int(switch))
        variables = model.init({"params": key, "dropout": key},
                               jnp.zeros(image_shape, jnp.float32), train=False)
        params = select(state.params, variables["params"], prefixes)
        stats = select(state.batch_stats, variables.get("batch_stats", {}), prefixes)
        opt_state = select(state.opt_state, tx.init(params), prefixes)
        return state.replace(params=params, batch_stats=stats, opt_state=opt_state)

    return jax.jit(reset, out_shardings=out_shardings, donate_argnums=0)


class StagedTrainStep:
    """``(state, batch) -> (state, metrics)`` choosing the compiled step of the state's stage
    on the host (module docstring). The step count is read from the first state it gets and
    then counted on the host (no device sync per step)."""

    def __init__(self, stage_one: Callable, stage_two: Callable, switch: int,
                 reset: Callable):
        self.stage_one, self.stage_two = stage_one, stage_two
        self.switch, self.reset = int(switch), reset
        self.next_step: int | None = None

    def __call__(self, state, batch):
        if self.next_step is None:
            self.next_step = int(jax.device_get(state.step))
        if self.next_step == self.switch:
            state = self.reset(state)
        step = self.stage_two if self.next_step >= self.switch else self.stage_one
        out = step(state, batch)
        self.next_step += 1
        return out


class StagedEvalStep:
    """``(state, *args)`` → the stage-2 function iff ``state.step > switch``."""

    def __init__(self, stage_one: Callable, stage_two: Callable, switch: int):
        self.stage_one, self.stage_two, self.switch = stage_one, stage_two, int(switch)

    def __call__(self, state, *args):
        stage_two = int(jax.device_get(state.step)) > self.switch
        return (self.stage_two if stage_two else self.stage_one)(state, *args)


def staged_steps(switch: int, full: tuple[Callable, Callable, Callable],
                 first: tuple[Callable, Callable, Callable], reset: Callable
                 ) -> tuple[StagedTrainStep, StagedEvalStep, StagedEvalStep]:
    """``(train, eval, predict)`` dispatching between the stage-1 steps ``first`` and the
    full model's ``full`` at ``switch``."""
    return (StagedTrainStep(first[0], full[0], switch, reset),
            StagedEvalStep(first[1], full[1], switch),
            StagedEvalStep(first[2], full[2], switch))
