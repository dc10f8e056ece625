"""Mapping a PyTorch state_dict onto flat flax variable names, every source array used once.

``TorchStateDict(state_dict)`` hands out arrays by PyTorch name and records which were used;
its helpers write our layouts into ``out`` (flat ``'params/<path>'`` / ``'batch_stats/<path>'``):

* ``conv(src, dst)``: ``src.weight`` ``[O, I, kh, kw]`` → ``params/dst/kernel``
  ``[kh, kw, I, O]`` (HWIO); ``src.bias`` → ``params/dst/bias`` when the source has one;
* ``bn(src, dst)``: ``weight`` → ``scale``, ``bias`` → ``bias`` (params), ``running_mean`` →
  ``mean``, ``running_var`` → ``var`` (batch_stats); ``num_batches_tracked`` is dropped;
* ``linear(src, dst)``: ``weight`` ``[out, in]`` → ``kernel`` ``[in, out]``, ``bias``;
* ``copy(src, dst, collection)``: an array as it is (e.g. a learned per-channel scalar);
* ``resnet(src_prefix, dst)``: every array under ``src_prefix`` as a torchvision ResNet
  (``conv1``, ``bn1``, ``layer{s}.{b}.*``; names as :mod:`~mtl_jax.models.pretrained`) onto our
  ResNet encoder at ``dst`` (a classifier ``fc.*`` under the prefix is dropped).

``finish()`` returns ``out`` and raises ``UserError`` naming the source arrays no mapping used
(so a converter cannot silently drop weights), and every ``take`` of an array that is absent or
already used names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flax import traverse_util

from mtl_jax.errors import UserError
from mtl_jax.models.pretrained import resnet_from_torchvision

IGNORED_SUFFIXES = (".num_batches_tracked",)
#: Key of a converted file's task order (1-D array of names), written by the converters whose
#: layout depends on the model's task order (``converters.check_task_order`` reads it).
TASK_ORDER_KEY = "meta/task_order"


class TorchStateDict:
    """A PyTorch state_dict being converted (see the module docstring)."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "state_dict",
                 ignore_prefixes: Iterable[str] = ()):
        self.source = source
        self.arrays = {k: np.asarray(v) for k, v in state_dict.items()}
        self.used: set[str] = {k for k in self.arrays if k.endswith(IGNORED_SUFFIXES)
                               or any(k.startswith(p) for p in ignore_prefixes)}
        self.out: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str, ndim: int | None = None) -> np.ndarray:
        """The array ``name`` (marked used); ``UserError`` if absent, used twice or of the
        wrong rank."""
        if name not in self.arrays:
            prefix = name.rsplit(".", 1)[0]
            near = sorted(k for k in self.arrays if k.startswith(prefix))[:5]
            raise UserError(f"{self.source}: no array {name!r}"
                            + (f" (names under {prefix!r}: {near})" if near else
                               " (is it a checkpoint of the right model?)"))
        if name in self.used and not name.endswith(IGNORED_SUFFIXES):
            raise UserError(f"{self.source}: array {name!r} would be used twice")
        value = self.arrays[name]
        if ndim is not None and value.ndim != ndim:
            raise UserError(f"{self.source}: {name!r} has shape {value.shape}, expected "
                            f"{ndim} dimensions")
        self.used.add(name)
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        if key in self.out:
            raise UserError(f"{self.source}: two source arrays map to {key!r}")
        self.out[key] = np.ascontiguousarray(value)

    def conv(self, src: str, dst: str) -> None:
        self.put(f"params/{dst}/kernel", np.transpose(self.take(f"{src}.weight", 4),
                                                      (2, 3, 1, 0)))
        if self.has(f"{src}.bias"):
            self.put(f"params/{dst}/bias", self.take(f"{src}.bias", 1))

    def bn(self, src: str, dst: str) -> None:
        self.put(f"params/{dst}/scale", self.take(f"{src}.weight", 1))
        self.put(f"params/{dst}/bias", self.take(f"{src}.bias", 1))
        self.put(f"batch_stats/{dst}/mean", self.take(f"{src}.running_mean", 1))
        self.put(f"batch_stats/{dst}/var", self.take(f"{src}.running_var", 1))

    def linear(self, src: str, dst: str) -> None:
        self.put(f"params/{dst}/kernel", self.take(f"{src}.weight", 2).T)
        if self.has(f"{src}.bias"):
            self.put(f"params/{dst}/bias", self.take(f"{src}.bias", 1))

    def copy(self, src: str, dst: str, collection: str = "params") -> None:
        self.put(f"{collection}/{dst}", self.take(src))

    def resnet(self, src_prefix: str, dst: str = "encoder") -> None:
        names = [k for k in self.arrays if k.startswith(src_prefix) and k not in self.used]
        if not names:
            raise UserError(f"{self.source}: no ResNet arrays under {src_prefix!r}")
        sub = {k[len(src_prefix):]: self.take(k) for k in names}
        params, stats = resnet_from_torchvision(sub)
        for collection, tree in (("params", params), ("batch_stats", stats)):
            for path, value in traverse_util.flatten_dict(tree, sep="/").items():
                self.put(f"{collection}/{dst}/{path}", value)

    def finish(self) -> dict[str, np.ndarray]:
        """The converted flat variables; ``UserError`` listing source arrays left unused."""
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise UserError(f"{self.source}: {len(unused)} array(s) were not mapped onto the "
                            f"model (first: {unused[:5]}); is it a checkpoint of the model and "
                            "options given?")
        return dict(self.out)
