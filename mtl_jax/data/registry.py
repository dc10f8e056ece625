"""Find, build and open prepared datasets by their registry name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from mtl_jax.data import DATASETS, synthetic
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
        kwargs["config"] = name_of if name_of in cls.builder_configs else cfg
    return cls(**kwargs)


def build_command(name: str, data_dir: str | None, options: Mapping[str, Any]) -> str:
    """The ``mtl-jax data build`` command line that prepares this builder's data."""
    parts = ["mtl-jax data build", name]
    for k, v in options.items():
        parts.append(f"--{k}={v}")
    if data_dir:
        parts.append(f"--data_dir={data_dir}")
    return " ".join(parts)


def build(name: str, config: str | None = None, data_dir: str | None = None,
          **options: Any) -> tfds.core.DatasetBuilder:
    """Prepare a dataset (a no-op when it is already prepared); returns its builder."""
    builder = get_builder(name, config, data_dir, **options)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
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
        raise DatasetNotFoundError(
            f"dataset {name!r} (config {builder.builder_config.name!r}) is not prepared in "
            f"{resolve_data_dir(data_dir)!r}. Prepare it with:\n  "
            + build_command(name, resolve_data_dir(data_dir), opts))
    splits = builder.info.splits
    if split not in splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; splits: {sorted(splits)}")
    return builder.as_data_source(split=split)
