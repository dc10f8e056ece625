"""From a config to the objects a run needs: tasks, model, optimiser, mesh, compiled steps.

``build_experiment(config)`` binds the pure steps of :mod:`mtl_jax.steps` to their
dependencies and compiles them with ``jax.jit`` and explicit shardings: the batch split over
mesh axis ``data`` (data parallelism; BatchNorm statistics are computed over the global
batch, which is what ``jit`` on a sharded batch gives), the train state replicated, and the
state donated to the train step. Shapes come first (``jax.eval_shape``), then the sharded
init.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtl_jax import config_schema, optim, run_config, staging, steps
from mtl_jax.data import DATASETS, augment, registry
from mtl_jax.errors import UserError
from mtl_jax.models import build_model
from mtl_jax.models.options import as_dict
from mtl_jax.tasks import TASKS, make_task
from mtl_jax.tasks.compat import parse_compat
from mtl_jax.weighting import make_weighting


@dataclasses.dataclass
class Experiment:
    """Compiled steps and everything they close over."""

    config: ml_collections.ConfigDict
    tasks: dict[str, Any]
    model: Any
    weighting: Any
    tx: Any
    mesh: Mesh
    abstract_state: Any
    init_state: Callable[[], steps.TrainState]
    train_step: Callable
    eval_step: Callable
    predict_step: Callable
    augment: augment.JointAugment | None
    eval_batch_size: int

    def learning_rates(self, step: int) -> dict[str, float]:
        return optim.learning_rates(self.config.optimizer, int(self.config.num_train_steps),
                                    step)


def task_order(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The order of the tasks: ``config.task_order`` (a list naming every key of
    ``config.tasks`` once), else the task names sorted alphabetically.

    It is the one source of the order everything that depends on it reads: the loss vector the
    weighting sees, the heads, exchange blocks that concatenate the tasks' features (e.g. the
    mTEB fusion, cross-stitch units), and the converters' output (``mtl-jax convert-weights
    --config``). Never the order of a dict's keys: ``ConfigDict`` sorts them, a plain dict
    keeps insertion order, and a config saved as JSON may do either."""
    names = list(as_dict(config.tasks))
    given = config.get("task_order", None)
    if not given:
        return tuple(sorted(names))
    order = (tuple(t.strip() for t in given.split(",") if t.strip()) if isinstance(given, str)
             else tuple(str(t) for t in given))
    if sorted(order) != sorted(names) or len(set(order)) != len(order):
        raise UserError(f"config.task_order={list(order)} must name every task of config.tasks "
                        f"{sorted(names)} exactly once")
    return order


def build_tasks(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.tasks``: ``{name: {task options}}`` -> ``{name: Task}`` in
    :func:`task_order`.

    The dataset's ``TASK_DEFAULTS`` (e.g. the depth evaluation range of VKITTI2) come first;
    the options in ``config.tasks`` override them."""
    dataset = as_dict(config.get("dataset", None)).get("name")
    implied = getattr(DATASETS[dataset], "TASK_DEFAULTS", {}) if dataset in DATASETS else {}
    options_of = as_dict(config.tasks)
    unknown = [name for name in options_of if name not in TASKS]
    if unknown:
        raise UserError(f"config.tasks has unknown task {unknown[0]!r}; available: "
                        f"{sorted(TASKS)}")
    if not options_of:
        raise UserError("config.tasks is empty: name at least one task")
    tasks = {}
    for name in task_order(config):
        try:
            tasks[name] = make_task(name, **{**implied.get(name, {}),
                                             **as_dict(options_of[name])})
        except (TypeError, ValueError) as e:
            raise UserError(f"config.tasks.{name}: {e}") from e
    return tasks


def _eval_compat(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.eval.compat``: reference-code metric modes (``mtl_jax.tasks.compat``)."""
    try:
        return parse_compat(as_dict(config.get("eval", None)).get("compat"))
    except ValueError as e:
        raise UserError(f"config.eval.compat: {e}") from e


def mesh_devices(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(devices of the data-parallel mesh, processes) for :func:`config_schema.check`."""
    n = int(config.get("num_devices", -1))
    return (n if n > 0 else len(jax.devices())), jax.process_count()


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """Data-parallel mesh over ``config.num_devices`` devices (-1: all; the schema checks that
    they are visible)."""
    n = int(config.get("num_devices", -1))
    devices = jax.devices()[:n] if n > 0 else jax.devices()
    return Mesh(np.array(devices), ("data",))


def build_experiment(config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None) -> Experiment:
    """Tasks, model, weighting, optimiser, mesh and compiled steps for ``config``.

    ``steps_per_epoch`` (training examples // batch size) fills in the epoch length of
    strategies that average over epochs (``dwa``) when the config leaves it at 0.
    """
    config_schema.check(config, devices=mesh_devices(config))
    tasks = build_tasks(config)
    try:
        model = build_model(config.model, {name: task.channels for name, task in tasks.items()})
    except ValueError as e:  # build_model's contract: ValueError for a bad config.model value
        raise UserError(f"config.model: {e}") from e
    weighting = make_weighting(config.weighting)
    fields = {f.name for f in dataclasses.fields(weighting)}
    if "steps_per_epoch" in fields and not weighting.steps_per_epoch and steps_per_epoch:
        weighting = dataclasses.replace(weighting, steps_per_epoch=int(steps_per_epoch))
    mesh = make_mesh(config)
    h, w = config.input_size
    image_shape = (1, int(h), int(w), 3)
    rng = jax.random.key(int(config.seed))
    # Parameters are drawn with the "rbg" generator: compiling an init of many weight
    # tensors with threefry takes several times longer on CPU (seconds for a small model).
    param_rng = jax.random.key(int(config.seed), impl="rbg")

    params_shape = jax.eval_shape(
        lambda r: model.init({"params": r, "dropout": r}, np.zeros(image_shape, np.float32),
                             train=False)["params"], rng)
    tx = optim.make_optimizer(config.optimizer, int(config.num_train_steps), params_shape)
    init_fn = functools.partial(steps.init_state, image_shape=image_shape, model=model, tx=tx,
                                weighting=weighting, task_names=tuple(tasks))
    replicated = NamedSharding(mesh, PartitionSpec())
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    abstract = jax.eval_shape(init_fn, rng, param_rng)
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        state_sharding)
    init_jit = jax.jit(init_fn, out_shardings=state_sharding)
    init_state = functools.partial(init_jit, rng, param_rng)
    encoder_init = config.model.get("encoder_init", None)
    if encoder_init:
        init_state = _encoder_init_state(str(encoder_init), model, init_state, abstract, tx,
                                         state_sharding)
    init_from = config.model.get("init_from", None)
    if init_from:
        init_state = _init_from_state(str(init_from), init_state, abstract, tx, state_sharding,
                                      tuple(tasks))

    def compile_steps(model):
        train_step = jax.jit(
            functools.partial(steps.train_step, model=model, tasks=tasks, weighting=weighting,
                              tx=tx),
            in_shardings=(state_sharding, data_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0)
        eval_step = jax.jit(
            functools.partial(steps.eval_step, model=model, tasks=tasks,
                              compat=_eval_compat(config)),
            in_shardings=(state_sharding, data_sharding), out_shardings=replicated)
        predict_step = jax.jit(
            functools.partial(steps.predict_step, model=model, tasks=tasks),
            in_shardings=(state_sharding, data_sharding), out_shardings=replicated)
        return train_step, eval_step, predict_step

    train_step, eval_step, predict_step = compile_steps(model)
    if staging.is_staged(model):  # e.g. ATI-Net: stage 1, then a reset, then the full model
        switch = staging.switch_step(model, int(config.num_train_steps))
        reset = staging.make_reset(model, model.stage_reset_prefixes(), tx, image_shape,
                                   int(config.seed), switch, state_sharding)
        train_step, eval_step, predict_step = staging.staged_steps(
            switch, (train_step, eval_step, predict_step),
            compile_steps(model.stage_one()), reset)

    aug_cfg = as_dict(config.get("augment", None))
    aug = None
    if aug_cfg.get("enabled", True):
        aug = augment.JointAugment(scales=tuple(aug_cfg.get("scales", augment.DEFAULT_SCALES)),
                                   flip=bool(aug_cfg.get("flip", True)),
                                   scale_depth=bool(aug_cfg.get("scale_depth", True)),
                                   crop_size=aug_cfg.get("crop_size"))
    return Experiment(
        config=config, tasks=tasks, model=model, weighting=weighting, tx=tx, mesh=mesh,
        abstract_state=abstract_state, init_state=init_state,
        train_step=train_step, eval_step=eval_step, predict_step=predict_step, augment=aug,
        eval_batch_size=int(config.get("eval_batch_size", config.batch_size)))


def _overlay_state(init_state: Callable[[], steps.TrainState], tx: Any,
                   state_sharding: steps.TrainState, overlay: Callable[[Any, Any], tuple]
                   ) -> Callable[[], steps.TrainState]:
    """``init_state`` whose params and batch_stats pass through ``overlay(params, stats)``
    (loaded weights), with the optimiser state rebuilt for the new parameters."""
    init_opt = jax.jit(tx.init, out_shardings=state_sharding.opt_state)

    def init_with_weights() -> steps.TrainState:
        state = init_state()
        params, batch_stats = overlay(state.params, state.batch_stats)
        params = jax.device_put(params, state_sharding.params)
        batch_stats = jax.device_put(batch_stats, state_sharding.batch_stats)
        return state.replace(params=params, batch_stats=batch_stats, opt_state=init_opt(params))

    return init_with_weights


def _encoder_init_state(path: str, model: Any, init_state: Callable[[], steps.TrainState],
                        abstract: steps.TrainState, tx: Any, state_sharding: steps.TrainState
                        ) -> Callable[[], steps.TrainState]:
    """``config.model.encoder_init``: ``init_state`` with the encoder's params and batch_stats
    read from a converted torchvision file (``models.pretrained``), checked against the model
    now; decoders and the rest keep their initialisation, the optimiser state is rebuilt."""
    from mtl_jax.models import pretrained
    from mtl_jax.models.encoders import ResNet

    if not isinstance(getattr(model, "encoder", None), ResNet):
        raise UserError(f"config.model.encoder_init loads torchvision ResNet weights; encoder "
                        f"{type(getattr(model, 'encoder', None)).__name__} is not a ResNet")
    loaded = pretrained.load_encoder_weights(path)
    pretrained.apply_encoder_weights(abstract.params, abstract.batch_stats, loaded)  # check
    return _overlay_state(init_state, tx, state_sharding,
                          lambda p, s: pretrained.apply_encoder_weights(p, s, loaded))


def _init_from_state(path: str, init_state: Callable[[], steps.TrainState],
                     abstract: steps.TrainState, tx: Any, state_sharding: steps.TrainState,
                     task_names: Sequence[str]) -> Callable[[], steps.TrainState]:
    """``config.model.init_from``: every parameter and batch statistic from a converted file
    (``mtl-jax convert-weights --from=NAME``), checked against the model now (leaves, shapes,
    and the task order the file was converted for, where its layout depends on it)."""
    from mtl_jax.models import converters

    flat = converters.load_variables(path)
    converters.check_task_order(flat, task_names, path)
    converters.apply_variables(abstract.params, abstract.batch_stats, flat)  # check
    return _overlay_state(init_state, tx, state_sharding,
                          lambda p, s: converters.apply_variables(p, s, flat))


def dataset_normals_from_depth(config: ml_collections.ConfigDict) -> bool:
    """``config.dataset.normals_from_depth`` (default False): compute the ``normals`` of every
    example from its ``depth`` and ``intrinsics`` when decoding it (docs/datasets.md)."""
    return bool(as_dict(config.dataset).get("normals_from_depth", False))


def open_data(config: ml_collections.ConfigDict, splits: Sequence[str] = ("train", "val"),
              data_dir: str | None = None) -> list:
    """Random-access sources of ``splits`` of ``config.dataset``.

    Generated datasets (``synthetic``) are built on first use; a real dataset that is not
    prepared raises an error with the ``mtl-jax data build`` command to run. The first
    examples' labels are checked against the tasks (e.g. class ids within ``num_classes``), and
    the tasks against the class count the builder guarantees for every example (its labels are
    checked at build time); the train and eval steps count out-of-range labels of every batch
    (``config.label_check``).
    """
    ds = as_dict(config.dataset)
    name = ds.get("name")
    if name not in DATASETS:
        raise UserError(f"config.dataset.name={name!r} is not a dataset; available: "
                        f"{sorted(DATASETS)}")
    options = dict(ds.get("options", {}) or {})
    builder_config = ds.get("config", None)
    data_dir = data_dir or ds.get("data_dir", None)
    if getattr(DATASETS[name], "GENERATED", False):
        builder = registry.get_builder(name, builder_config, data_dir, **options)
        if not builder.is_prepared():
            if jax.process_index() == 0:
                logging.info("Preparing dataset %s/%s (first use)...", name,
                             builder.builder_config.name)
                registry.build(name, builder_config, data_dir, **options)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("mtl_jax dataset prepared")
    sources = [registry.open_split(name, s, builder_config, data_dir, **options)
               for s in splits]
    tasks = build_tasks(config)
    run_config.check_dataset_classes(
        name, registry.get_builder(name, builder_config, data_dir, **options), tasks)
    from_depth = dataset_normals_from_depth(config)
    for src in sources:
        for i in range(min(4, len(src))):
            try:
                ex = augment.decode(src[i], normals_from_depth=from_depth)
            except ValueError as e:
                raise UserError(f"dataset {name!r}, example {i}: {e}") from e
            for task_name, task in tasks.items():
                label_key = task.label_key
                if label_key not in ex:
                    raise UserError(f"dataset {name!r} has no {label_key!r} field, needed by "
                                    f"task {task_name!r}; its fields: {sorted(ex)}")
                try:
                    task.check_labels({k: v[None] for k, v in ex.items()
                                       if isinstance(v, np.ndarray) and v.ndim})
                except ValueError as e:
                    raise UserError(f"dataset {name!r}, example {i}: {e}") from e
    return sources
