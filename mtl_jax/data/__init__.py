"""Datasets (TFDS builders writing ``array_record``), joint augmentation and the grain pipeline.

``DATASETS`` maps the name used in configs and on the command line to a TFDS builder class.
Builder modules are imported on first access (so one dataset's module never slows down or
breaks the others). Adding a dataset is a new file with a builder plus one line here. Class
names carry an ``Mtl`` prefix so that TFDS's own registry (which has e.g. ``cityscapes``)
never clashes with ours.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

#: registry name -> (module, builder class)
_BUILDERS = {
    "synthetic": ("mtl_jax.data.synthetic", "MtlSynthetic"),
    "nyuv2": ("mtl_jax.data.nyuv2", "MtlNyuv2"),
    "nyud_mt": ("mtl_jax.data.nyud_mt", "MtlNyudMt"),
    "cityscapes_mtan": ("mtl_jax.data.cityscapes_mtan", "MtlCityscapesMtan"),
    "cityscapes": ("mtl_jax.data.cityscapes", "MtlCityscapes"),
    "cityscapes_seq": ("mtl_jax.data.cityscapes_seq", "MtlCityscapesSeq"),
    "vkitti2": ("mtl_jax.data.vkitti2", "MtlVkitti2"),
    "synthia": ("mtl_jax.data.synthia", "MtlSynthia"),
    "isprs_potsdam": ("mtl_jax.data.isprs_potsdam", "MtlIsprsPotsdam"),
}


class _LazyRegistry(Mapping):
    """``{name: builder class}``, importing a builder's module when it is first looked up."""

    def __init__(self, entries: Mapping[str, tuple[str, str]]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str):
        module, cls = self._entries[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


DATASETS: Mapping[str, type] = _LazyRegistry(_BUILDERS)
