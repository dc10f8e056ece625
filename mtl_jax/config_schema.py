"""The config schema: the range or choice set of every numeric and enumerated config key, and
the rules between keys, declared once here and checked before a run writes anything.

:data:`FIELDS` declares one rule per key (dotted, ``*`` matches any one key),
:data:`mtl_jax.config_cross.CROSS`
the rules that relate several keys or the devices. :func:`check` applies them and raises a
:class:`~mtl_jax.errors.UserError` of one line naming the key, its value, the rule and a valid
example, e.g.::

    config.eval_batch_size=0: must be an integer >= 1 (e.g. --config.eval_batch_size=8)

``mtl-jax train``, ``eval`` and ``params`` call it right after parsing the command line (before
the workdir, its lock or ``config.json`` exist), and :func:`mtl_jax.experiment.build_experiment`
calls it again with the devices of its mesh. A key a config does not set is not checked (its
default in the code applies); a key marked *required* must be set. The options of tasks,
models and weightings that their own constructors check (with a one-line error) are not
repeated here. :func:`markdown_table` renders the rules for docs/reliability.md (a test keeps
that page equal to it).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mtl_jax.config_cross import CROSS
from mtl_jax.errors import UserError

_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclasses.dataclass(frozen=True)
class Field:
    """The rule of one config key: ``test(value)`` is true for valid values; ``rule`` says it
    in words, ``example`` is a valid value (shown as ``--config.<key>=<example>``)."""

    key: str
    rule: str
    example: str
    test: Callable[[Any], bool]
    required: bool = False
    optional: bool = False  # None (the config's "off") is valid too

    def valid(self, value: Any) -> bool:
        if value is None:
            return self.optional
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def count(key: str, minimum: int = 1, example: int = 8, *, maximum: int | None = None,
          also: Sequence[int] = (), required: bool = False) -> Field:
    """An integer ``>= minimum`` (and ``<= maximum``), or one of ``also``."""
    rule = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if also:
        rule += " or " + " or ".join(str(a) for a in also)
    return Field(key, rule, str(example),
                 lambda v: _is_int(v) and (v in also or (
                     v >= minimum and (maximum is None or v <= maximum))),
                 required=required)


def real(key: str, low: float | None = None, high: float | None = None, example: float = 1.0,
         *, low_open: bool = False, high_open: bool = False, optional: bool = False) -> Field:
    """A finite number within ``[low, high]`` (``low_open``/``high_open``: the bound excluded)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    rule = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if optional:
        rule += ", or None"

    def test(v):
        if not _is_real(v):
            return False
        v = float(v)
        if low is not None and (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)

    return Field(key, rule, repr(example), test, optional=optional)


def choice(key: str, choices: Sequence[str] | Callable[[], Iterable[str]], example: str, *,
           where: str = "") -> Field:
    """One of ``choices`` (a callable: read from a registry when checked; ``where`` names the
    registry in the rule)."""
    def names():
        return tuple(choices() if callable(choices) else choices)

    rule = f"one of {where}" if where else "one of " + ", ".join(f"'{c}'" for c in names())
    return Field(key, rule, example, lambda v: isinstance(v, str) and v in names())


def flag(key: str, example: bool = True) -> Field:
    return Field(key, "True or False", str(example), lambda v: isinstance(v, bool))


def counts(key: str, minimum: int = 1, example: str = "(32, 48)", *,
           length: int | None = None, required: bool = False, optional: bool = False) -> Field:
    """A sequence of integers ``>= minimum`` (of ``length`` items); ``optional``: or None."""
    rule = (f"{length} integers" if length else "integers") + f" >= {minimum}"
    if optional:
        rule += ", or None"
    return Field(key, rule, example,
                 lambda v: (isinstance(v, (tuple, list)) and (length is None or len(v) == length)
                            and all(_is_int(x) and x >= minimum for x in v)),
                 required=required, optional=optional)


def reals(key: str, low: float, example: str, *, low_open: bool = True,
          nonempty: bool = True) -> Field:
    """A (non-empty) sequence of finite numbers ``> low`` (``>= low`` unless ``low_open``)."""
    op = ">" if low_open else ">="
    return Field(key, f"{'one or more' if nonempty else 'zero or more'} finite numbers "
                      f"{op} {low:g}", example,
                 lambda v: (isinstance(v, (tuple, list)) and (len(v) or not nonempty)
                            and all(_is_real(x) and (x > low if low_open else x >= low)
                                    for x in v)))


def custom(key: str, rule: str, example: str, test: Callable[[Any], bool]) -> Field:
    return Field(key, rule, example, test)


def _compat_ok(value: Any) -> bool:
    from mtl_jax.tasks.compat import parse_compat

    parse_compat(value)  # ValueError: invalid
    return True


def valid_frame_ids(value: Any) -> bool:
    """Whether ``value`` is a valid ``config.sde.frame_ids``: 0 first, then neighbours among
    -1 and 1, each once."""
    if not isinstance(value, (tuple, list)) or not all(_is_int(x) for x in value):
        return False
    ids = list(value)
    return (len(ids) >= 2 and ids[0] == 0 and len(set(ids)) == len(ids)
            and set(ids[1:]) <= {-1, 1})


def _registry(module: str, name: str) -> Callable[[], Iterable[str]]:
    def names():
        import importlib

        return sorted(getattr(importlib.import_module(module), name))
    return names


def _optimizer_fields(prefix: str) -> list[Field]:
    from mtl_jax import optim

    return [
        choice(f"{prefix}.name", optim.OPTIMIZERS, "adam"),
        real(f"{prefix}.learning_rate", 0.0, None, 1e-3, low_open=True),
        choice(f"{prefix}.schedule", optim.SCHEDULES, "cosine"),
        count(f"{prefix}.warmup_steps", 0, 0),
        counts(f"{prefix}.decay_steps", 1, "(300, 450)"),
        real(f"{prefix}.decay_factor", 0.0, None, 0.1, low_open=True),
        real(f"{prefix}.min_lr_ratio", 0.0, 1.0, 0.01),
        real(f"{prefix}.power", 0.0, None, 0.9, low_open=True),
        real(f"{prefix}.b1", 0.0, 1.0, 0.9, high_open=True),
        real(f"{prefix}.b2", 0.0, 1.0, 0.999, high_open=True),
        real(f"{prefix}.eps", 0.0, None, 1e-8, low_open=True),
        real(f"{prefix}.momentum", 0.0, 1.0, 0.9, high_open=True),
        real(f"{prefix}.weight_decay", 0.0, None, 5e-4),
        real(f"{prefix}.grad_clip_norm", 0.0, None, 10.0, low_open=True, optional=True),
        real(f"{prefix}.part_lr_multipliers.*", 0.0, None, 0.1),
    ]


def _dataset_fields(prefix: str) -> list[Field]:
    return [
        choice(f"{prefix}.name", _registry("mtl_jax.data", "DATASETS"), "synthetic",
               where="the datasets of `mtl_jax.data.DATASETS`"),
        count(f"{prefix}.options.height", 1, 96),
        count(f"{prefix}.options.width", 1, 128),
        count(f"{prefix}.options.num_train", 1, 2000),
        count(f"{prefix}.options.num_val", 1, 500),
        count(f"{prefix}.options.seed", 0, 0),
        flag(f"{prefix}.normals_from_depth", False),
    ]


def _fields() -> list[Field]:
    return [
        # How long, how often: counts of steps or examples.
        count("num_train_steps", 1, 1200, required=True),
        count("batch_size", 1, 8, required=True),
        count("eval_batch_size", 1, 8),
        count("log_every_steps", 1, 50),
        count("eval_every_steps", 1, 400),
        count("checkpoint_every_steps", 1, 400),
        count("keep_checkpoints", 1, 3),
        count("num_vis_examples", 0, 4),
        count("prefetch", 1, 2),
        count("num_devices", 1, -1, also=(-1,)),
        count("seed", 0, 0, maximum=2**31 - 1),
        flag("async_checkpoints"),
        flag("skip_nonfinite", False),
        flag("trivial_baseline", False),
        choice("label_check", ("error", "warn"), "error"),
        counts("input_size", 1, "(96, 128)", length=2, required=True),
        # Data and augmentation.
        *_dataset_fields("dataset"),
        flag("augment.enabled"),
        flag("augment.flip"),
        flag("augment.scale_depth"),
        reals("augment.scales", 0.0, "(1.0, 1.2, 1.5)"),
        counts("augment.crop_size", 1, "(512, 512)", length=2, optional=True),
        # Tasks, model, weighting: the keys their constructors leave unchecked.
        count("tasks.semseg.num_classes", 1, 10),
        choice("model.dtype", ("float32", "bfloat16", "float16", "float64"), "float32"),
        choice("model.param_dtype", ("float32", "bfloat16", "float16", "float64"), "float32"),
        choice("model.encoder", _registry("mtl_jax.models", "ENCODERS"), "resnet18",
               where="the encoders of `mtl_jax.models.ENCODERS`"),
        choice("model.decoder", _registry("mtl_jax.models", "DECODERS"), "unet",
               where="the decoders of `mtl_jax.models.DECODERS`"),
        choice("model.architecture", _registry("mtl_jax.models", "ARCHITECTURES"), "segnet_mtan",
               where="the models of `mtl_jax.models.ARCHITECTURES`"),
        count("model.width", 1, 8),
        counts("model.widths", 1, "(8, 16, 32, 64)"),
        count("model.encoder_kwargs.width", 1, 16),
        count("model.decoder_kwargs.features", 1, 32),
        count("model.decoder_kwargs.hidden_features", 1, 32),
        count("model.decoder_kwargs.width", 1, 64),
        count("model.decoder_kwargs.convs_per_block", 1, 1),
        counts("model.decoder_kwargs.channels", 1, "(16, 32, 32, 64, 64)"),
        counts("model.decoder_kwargs.side_scales", 1, "(1,)"),
        flag("model.decoder_kwargs.regression", False),
        flag("model.decoder_kwargs.resize_sides", True),
        count("model.decoder_kwargs_by_task.*.features", 1, 32),
        counts("model.decoder_kwargs_by_task.*.channels", 1, "(16, 32, 32, 64, 64)"),
        counts("model.decoder_kwargs_by_task.*.side_scales", 1, "(1, 2, 3)"),
        flag("model.decoder_kwargs_by_task.*.regression", True),
        flag("model.decoder_kwargs_by_task.*.resize_sides", False),
        count("model.interaction.width", 1, 64),
        count("model.exchange.block_size", 1, 1024),
        count("model.bottleneck_features", 1, 128),
        real("model.dropout_rate", 0.0, 1.0, 0.2, high_open=True),
        real("model.label_smoothing", 0.0, 1.0, 0.0, high_open=True),
        real("model.stage_switch", 0.0, 1.0, 0.5, high_open=True),
        choice("weighting.name", _registry("mtl_jax.weighting", "WEIGHTINGS"), "ew",
               where="the strategies of `mtl_jax.weighting.WEIGHTINGS`"),
        real("weighting.weights.*", 0.0, None, 1.0),
        real("weighting.learning_rate", 0.0, None, 1e-3, low_open=True),
        *_optimizer_fields("optimizer"),
        custom("eval.compat", "'' or comma-separated modes of `mtl_jax.tasks.compat.COMPAT`",
               "per_image", _compat_ok),
        # Domain adaptation (config.uda).
        flag("uda.adversarial"),
        real("uda.lambda_adv", 0.0, None, 0.005),
        counts("uda.scales", 0, "(0, 1)"),
        counts("uda.discriminator.channels", 1, "(64, 128, 256, 512)"),
        real("uda.discriminator.negative_slope", 0.0, None, 0.2),
        count("uda.discriminator.power_iterations", 1, 1),
        *_optimizer_fields("uda.optimizer"),
        *_dataset_fields("uda.target_dataset"),
        *_dataset_fields("uda.source_eval_dataset"),
        # Self-supervised depth from video (config.sde; the disp task's depth ranges).
        custom("sde.frame_ids", "0 first, then neighbours among -1 and 1", "(0, -1, 1)",
               valid_frame_ids),
        counts("sde.scales", 0, "(0, 1, 2, 3)"),
        real("sde.disparity_smoothness", 0.0, None, 1e-3),
        flag("sde.no_ssim", False),
        flag("sde.avg_reprojection", False),
        flag("sde.disable_automasking", False),
        count("sde.pose.width", 1, 64),
        *_optimizer_fields("sde.pose_optimizer"),
        real("tasks.disp.min_depth", 0.0, None, 0.1, low_open=True),
        real("tasks.disp.max_depth", 0.0, None, 100.0, low_open=True),
        real("tasks.disp.eval_min_depth", 0.0, None, 1e-3),
        real("tasks.disp.eval_max_depth", 0.0, None, 80.0, low_open=True),
    ]


#: Every key's rule (built once, on first use: the registries are imported lazily).
_FIELDS: list[Field] | None = None


def fields() -> list[Field]:
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = _fields()
    return _FIELDS


# ---------------------------------------------------------------------------------------------


def _matches(pattern: str, key: str) -> bool:
    want, have = pattern.split("."), key.split(".")
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have))


def _flat(config: Any) -> dict[str, Any]:
    """``{'a.b': value}`` of the config's leaves, values as Python objects (tuples kept)."""
    def walk(node: Any, prefix: str, out: dict) -> dict:
        items = node.items() if hasattr(node, "items") else None
        if items is not None and not isinstance(node, (str, bytes)):
            children = list(items)
            if not children:
                out[prefix[:-1]] = node
            for k, v in children:
                walk(v, f"{prefix}{k}.", out)
        else:
            out[prefix[:-1]] = node
        return out
    return walk(config, "", {})


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(config: Any, *, devices: tuple[int, int] | None = None) -> None:
    """Raise :class:`UserError` (one line) for the first key of ``config`` that breaks its
    rule in :func:`fields`, then for the first rule of :data:`CROSS` broken; ``devices`` =
    (devices of the mesh, processes) enables the rules that depend on them."""
    flat = _flat(config)
    for field in fields():
        keys = [k for k in flat if _matches(field.key, k)]
        if not keys and field.required:
            raise UserError(f"config.{field.key} is missing: it must be {field.rule} "
                            f"(e.g. --config.{field.key}={field.example})")
        for key in keys:
            if not field.valid(flat[key]):
                raise UserError(f"config.{key}={_show(flat[key])}: must be {field.rule} "
                                f"(e.g. --config.{key}={field.example})")
    for rule in CROSS:
        message = rule.check(flat, devices)
        if message:
            raise UserError(message)


def markdown_table() -> str:
    """The rules as the Markdown tables of docs/reliability.md ("The config schema")."""
    lines = ["| key | rule | example |", "|---|---|---|"]
    for f in fields():
        rule = f.rule + (" (required)" if f.required else "")
        lines.append(f"| `{f.key}` | {rule} | `{f.example}` |")
    lines += ["", "| keys | rule between them |", "|---|---|"]
    lines += [f"| `{c.keys}` | {c.rule} |" for c in CROSS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m mtl_jax.config_schema: the tables of docs/reliability.md
    print(markdown_table(), end="")
