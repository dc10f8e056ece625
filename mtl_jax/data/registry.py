"""Find, build and open prepared datasets by their registry name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from mtl_jax.data import DATASETS
from mtl_jax.errors import DatasetNotFoundError, UserError

__all__ = ["DatasetNotFoundError", "build", "get_builder", "open_split", "resolve_data_dir"]


def resolve_data_dir(data_dir: str | None = None) -> str:
    """``data_dir`` if given, else ``$TFDS_DATA_DIR``, else the TFDS default."""
    if data_dir:
        return os.path.expanduser(str(data_dir))
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser(str(tfds.core.constants.DATA_DIR))


def _builder_config(name: str, config: str | None, options: Mapping[str, Any]):
    if name == "synthetic":
        from mtl_jax.data import synthetic

        opts = dict(options)
        if config is not None:
            opts.setdefault("domain", config)
        return synthetic.make_config(**opts)
    if options:
        raise UserError(f"dataset {name!r} takes no builder options, got {sorted(options)}")
    return config


def get_builder(name: str, config: str | None = None, data_dir: str | None = None,
                **options: Any) -> tfds.core.DatasetBuilder:
    """The TFDS builder of dataset ``name`` (a key of ``DATASETS``) and builder config.

    ``options`` are builder-config settings (for ``synthetic``: domain, height, width,
    num_train, num_val, seed). ``config`` is a builder-config name; for ``synthetic`` it is
    the domain.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    cls = DATASETS[name]
    cfg = _builder_config(name, config, options)
    kwargs = {"data_dir": resolve_data_dir(data_dir), "file_format": "array_record"}
    if cfg is not None:
        # TFDS wants the registered object itself (or its name) for predefined configs.
        name_of = getattr(cfg, "name", cfg)
        if isinstance(cfg, str) and name_of not in cls.builder_configs:
            valid = ", ".join(cls.builder_configs) or "(none: omit --config)"
            raise UserError(f"dataset {name!r} has no builder config {cfg!r}; valid: {valid}")
        kwargs["config"] = name_of if name_of in cls.builder_configs else cfg
    return cls(**kwargs)


def config_name(builder: tfds.core.DatasetBuilder) -> str:
    """The builder config's name, ``'default'`` for builders without configs."""
    return builder.builder_config.name if builder.builder_config is not None else "default"


def build_command(name: str, data_dir: str | None, options: Mapping[str, Any]) -> str:
    """The ``mtl-jax data build`` command line that prepares this builder's data."""
    parts = ["mtl-jax data build", name]
    for k, v in options.items():
        parts.append(f"--{k}={v}")
    if data_dir:
        parts.append(f"--data_dir={data_dir}")
    return " ".join(parts)


def build(name: str, config: str | None = None, data_dir: str | None = None,
          manual_dir: str | None = None, **options: Any) -> tfds.core.DatasetBuilder:
    """Prepare a dataset (a no-op when it is already prepared); returns its builder.

    Datasets read from a manual download (every real dataset) need ``manual_dir``, the folder
    the user downloaded; a missing one raises :class:`~mtl_jax.data.manual.ManualDataError`
    with the expected tree and the download page. Nothing is ever downloaded.
    """
    builder = get_builder(name, config, data_dir, **options)
    if builder.is_prepared():
        return builder
    cls = DATASETS[name]
    if not getattr(cls, "GENERATED", False):
        if not manual_dir:
            raise cls.missing("--manual_dir (the folder you downloaded)")
        manual_dir = os.path.expanduser(str(manual_dir))
        if not os.path.isdir(manual_dir):
            raise cls.missing(f"the folder {manual_dir}")
        if not os.listdir(manual_dir):
            raise cls.missing(f"everything (the folder {manual_dir} is empty)")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, manual_dir=manual_dir))
    return builder


def open_split(name: str, split: str, config: str | None = None, data_dir: str | None = None,
               **options: Any):
    """A random-access source (``len``, ``[i]`` -> dict of NumPy arrays) of a prepared split.

    Raises :class:`DatasetNotFoundError` with the command to run when it is not prepared.
    """
    builder = get_builder(name, config, data_dir, **options)
    if not builder.is_prepared():
        opts = dict(options)
        if config is not None and name == "synthetic":
            opts.setdefault("domain", config)
        elif config is not None:
            opts["config"] = config
        if not getattr(DATASETS[name], "GENERATED", False):
            opts["manual_dir"] = "FOLDER_YOU_DOWNLOADED"
        raise DatasetNotFoundError(
            f"dataset {name!r} (config {config_name(builder)!r}) is not prepared in "
            f"{resolve_data_dir(data_dir)!r}. Prepare it with:\n  "
            + build_command(name, resolve_data_dir(data_dir), opts))
    splits = builder.info.splits
    if split not in splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; splits: {sorted(splits)}")
    return builder.as_data_source(split=split)
