"""Parameter counts of the model a config describes (shapes only: nothing is allocated)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mtl_jax.experiment import build_tasks
from mtl_jax.models import build_model, count_params


def param_counts(config) -> dict[str, int]:
    """``{part: count, ..., 'total': count}`` for ``config.model`` with ``config.tasks``.

    When the run trains parameters outside the model -- a weighting strategy's own (e.g.
    ``uw``'s log-variances), the domain discriminators of an adversarial UDA config -- the
    model's parts are followed by ``'model total'`` (the model alone, the number papers
    quote), then ``'weighting/<name>'``, ``'discriminator/<task>_s<scale>'`` and, in the
    self-supervised depth setting (a config with ``sde``), the pose network's
    ``'pose_net/encoder'`` and ``'pose_net/decoder'``; ``'total'`` includes them.
    """
    tasks = build_tasks(config)
    model = build_model(config.model, {name: task.channels for name, task in tasks.items()})
    h, w = config.input_size
    shapes = jax.eval_shape(
        lambda r: model.init({"params": r, "dropout": r}, np.zeros((1, h, w, 3), np.float32),
                             train=False)["params"], jax.random.key(0))
    counts = count_params(shapes)
    extra = {}
    learned = weighting_param_count(config, tuple(tasks))
    if learned:  # e.g. uw's log-variances, trained by the weighting's own optimiser
        extra[f"weighting/{config.weighting.name}"] = learned
    if config.get("uda", None):  # the domain discriminators of an adversarial UDA run
        from mtl_jax.uda.run import discriminator_param_counts

        extra.update({f"discriminator/{key}": n
                      for key, n in discriminator_param_counts(config, tasks).items()})
    if config.get("sde", None):  # the pose network of the self-supervised depth setting
        extra.update({f"pose_net/{part}": n for part, n in pose_param_counts(config).items()})
    if extra:
        total = counts.pop("total")
        counts["model total"] = total
        counts.update(extra)
        counts["total"] = total + sum(extra.values())
    return counts


def pose_param_counts(config) -> dict[str, int]:
    """``{'encoder': n, 'decoder': n}`` of the pose network ``config.sde.pose`` describes."""
    from mtl_jax.models.architectures.posenet import build_pose_network, init_pose_network

    network = build_pose_network(config)
    shapes = jax.eval_shape(
        lambda r: init_pose_network(network, r, tuple(config.input_size))["params"],
        jax.random.key(0))
    counts = count_params(shapes)
    counts.pop("total")
    return counts


def weighting_param_count(config, task_names: tuple[str, ...]) -> int:
    """Scalars a weighting strategy learns with its own optimiser (``uw``: one log-variance
    per task; 0 for most): the size of the first moments that optimiser keeps."""
    from mtl_jax.weighting import make_weighting

    weighting = make_weighting(config.weighting)
    if getattr(weighting, "steps_per_epoch", 1) == 0:  # dwa: any epoch length gives the shapes
        weighting = dataclasses.replace(weighting, steps_per_epoch=1)
    state = jax.eval_shape(lambda: weighting.init(task_names))
    if not isinstance(state, dict) or "opt_state" not in state:
        return 0
    moments = [leaf for leaf in jax.tree_util.tree_leaves(
        state["opt_state"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(leaf, "mu")]
    return sum(int(np.prod(x.shape)) for m in moments for x in jax.tree_util.tree_leaves(m.mu))
