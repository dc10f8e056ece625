"""``Registry``: the name → constructor table of one kind of model part.

There is one registry per part kind -- ``ENCODERS`` (:mod:`~mtl_jax.models.encoders`),
``DECODERS`` (:mod:`~mtl_jax.models.decoders`), ``INTERACTIONS``
(:mod:`~mtl_jax.models.interaction`) -- and ``ARCHITECTURES``
(:mod:`~mtl_jax.models.architectures`) for whole models. Every architecture builds its parts
through them. Each entry sits in a *slot*: the contract of its call, i.e. what it reads and
where it plugs in (e.g. an encoder in slot ``'pyramid'`` returns the five-map feature pyramid;
an interaction in slot ``'exchange'`` maps ``{task: x}`` between decoder stages). A name is
unique within its slot; ``registry[name]`` finds a name that is unique in the registry, and
:meth:`Registry.lookup` with a slot checks that a part fits where it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn

Constructor = Callable[..., nn.Module]


class Registry(Mapping[str, Constructor]):
    """Constructors of one part kind, by ``(slot, name)`` (module docstring).

    Args:
      kind: the part kind in error messages (``'encoder'``, ``'interaction'``, ...).
      slots: ``{slot: its contract, one line}``; entries must name one of them.
    """

    def __init__(self, kind: str, slots: Mapping[str, str]) -> None:
        self.kind = kind
        self.slots = dict(slots)
        self._entries: dict[tuple[str, str], Constructor] = {}

    def register(self, slot: str, name: str, build: Constructor) -> Constructor:
        """Add ``build`` as ``name`` in ``slot``; returns it."""
        if slot not in self.slots:
            raise ValueError(f"{self.kind} slot {slot!r} is not one of {sorted(self.slots)}")
        if (slot, name) in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice in slot {slot!r}")
        self._entries[(slot, name)] = build
        return build

    def names(self, slot: str | None = None) -> list[str]:
        """Sorted names, of one slot or of all."""
        return sorted({n for s, n in self._entries if slot is None or s == slot})

    def slot_of(self, name: str) -> str:
        """The slot of ``name`` (which must be unique in the registry)."""
        slots = [s for s, n in self._entries if n == name]
        if len(slots) != 1:
            raise KeyError(name)
        return slots[0]

    def entries(self) -> list[tuple[str, str, Constructor]]:
        """``[(slot, name, constructor), ...]`` in registration order."""
        return [(s, n, b) for (s, n), b in self._entries.items()]

    def lookup(self, name: str, slot: str | None = None, what: str | None = None
               ) -> Constructor:
        """The constructor of ``name`` (in ``slot`` when given); ``ValueError`` naming the valid
        choices otherwise. ``what`` words the error (default: the kind)."""
        if slot is not None and (slot, name) in self._entries:
            return self._entries[(slot, name)]
        if slot is None and name in self:
            return self[name]
        raise ValueError(f"unknown {what or self.kind} {name!r}; valid: {self.names(slot)}")

    def build(self, name: str, *args: Any, slot: str | None = None, **kwargs: Any
              ) -> nn.Module:
        """``lookup(name, slot)(*args, **kwargs)``."""
        return self.lookup(name, slot)(*args, **kwargs)

    def __getitem__(self, name: str) -> Constructor:
        return self._entries[(self.slot_of(name), name)]

    def __contains__(self, name: object) -> bool:
        return any(n == name for _, n in self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
