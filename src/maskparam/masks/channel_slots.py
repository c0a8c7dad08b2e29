"""Channel groups as data: the slices of a model's tensors that can only go together.

A *slot* is one index along one dim of one tensor (output channel 7 of ``conv.weight``, entry 7
of ``bn.running_mean``, column 7 of the next conv). Tracing a model
(:mod:`maskparam.masks.channel_trace`) joins the slots that one computation ties together;
each resulting class of slots is a :class:`ChannelGroup`. A group that may not be removed (it
reaches the model's input or output, a normalization mixes it with its neighbours, an operation
the tracer does not know reads it) carries the reason.

>>> import torch, maskparam as mp
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> groups = mp.masks.channel_groups(model, torch.randn(2, 3))
>>> [(len(family), family[0].blocked) for family in groups.families()]  # doctest: +NORMALIZE_WHITESPACE
[(4, None), (3, "the input it reads has no channels (the model's input)"),
 (2, "it reaches the model's output")]
>>> groups.families()[0][0].slices
(('0.weight', 0, (0,)), ('0.bias', 0, (0,)), ('2.weight', 1, (0,)))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelGroup", "ChannelGroups", "Slots"]


@dataclass(frozen=True)
class ChannelGroup:
    """One channel of a model: ``slices`` are (tensor name, dim, indices along dim), every
    slice of every tensor that goes with it; ``blocked`` says why it cannot be removed (None:
    it can)."""

    slices: tuple[tuple[str, int, tuple[int, ...]], ...]
    blocked: str | None

    @property
    def family(self) -> tuple[tuple[str, int], ...]:
        """The (tensor, dim) pairs it touches: the groups of one layer (or of one coupled set of
        layers, such as a residual stream) share them."""
        return tuple((name, dim) for name, dim, _ in self.slices)

    def tensors(self) -> list[str]:
        """The names of the tensors it touches, in the order of :attr:`slices`."""
        return list(dict.fromkeys(name for name, _, _ in self.slices))


@dataclass(frozen=True)
class ChannelGroups:
    """Every channel group of a model, as :func:`maskparam.masks.channel_groups` found them.

    ``parameters`` names the tensors that are parameters (the rest of the names in the groups
    are buffers, such as BatchNorm's running statistics, which go with their channel but are
    neither masked nor ranked); ``unknown_ops`` counts the operations the tracer did not know
    (every channel they read is blocked).
    """

    groups: tuple[ChannelGroup, ...]
    parameters: frozenset[str]
    unknown_ops: tuple[tuple[str, int], ...]

    def families(self) -> list[list[ChannelGroup]]:
        """The groups by the tensors they touch (one list per layer or coupled set of layers),
        in the order their first tensor appears in the model."""
        found: dict[tuple[tuple[str, int], ...], list[ChannelGroup]] = {}
        for group in self.groups:
            found.setdefault(group.family, []).append(group)
        return list(found.values())

    def removable(self) -> list[ChannelGroup]:
        """The groups that may be removed (not blocked)."""
        return [group for group in self.groups if group.blocked is None]

    def __str__(self) -> str:
        lines = []
        for family in self.families():
            first = family[0]
            names = ", ".join(f"{name}[dim {dim}]" for name, dim, _ in first.slices[:4])
            more = len(first.slices) - 4
            names += f" and {more} more" if more > 0 else ""
            blocked = sum(group.blocked is not None for group in family)
            state = "removable" if not blocked else f"{blocked} blocked: {first.blocked}"
            lines.append(f"{len(family):5d} x {names} ({state})")
        return "\n".join(lines)


class Slots:
    """A union-find over slots, with what each slot is and why a class may not be removed.

    Rules of the tracer create slots for a tensor's dims (:meth:`new`), join the slots that one
    computation ties together (:meth:`union`) and block those it cannot follow (:meth:`block`).
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._owner: list[tuple[str, int, int]] = []
        self._claimed: list[bool] = []
        self._blocks: list[tuple[int, str]] = []

    def new(self, name: str, dim: int, size: int) -> Tensor:
        """Fresh slots for the ``size`` indices of dim ``dim`` of tensor ``name``."""
        start = len(self._parent)
        self._parent.extend(range(start, start + size))
        self._owner.extend((name, dim, i) for i in range(size))
        self._claimed.extend([False] * size)
        return torch.arange(start, start + size)

    def find(self, slot: int) -> int:
        parent = self._parent
        root = slot
        while parent[root] != root:
            root = parent[root]
        while parent[slot] != root:  # path compression
            parent[slot], slot = root, parent[slot]
        return root

    def claim(self, labels: Tensor) -> None:
        """Mark slots as read by a rule the tracer knows (a slot no rule reads, such as a
        kernel's height, is not a channel)."""
        for slot in _valid(labels):
            self._claimed[slot] = True

    def union(self, first: Tensor, second: Tensor) -> None:
        """Join ``first[i]`` and ``second[i]`` for every i where both are slots (>= 0)."""
        a = first.reshape(-1)
        b = second.reshape(-1)
        both = (a >= 0) & (b >= 0)
        pairs = torch.unique(torch.stack([a[both], b[both]], dim=1), dim=0) if both.any() else None
        if pairs is None:
            return
        for x, y in pairs.tolist():
            self._claimed[x] = self._claimed[y] = True
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def join_all(self, labels: Tensor) -> None:
        """Join every slot in ``labels`` into one class."""
        valid = _valid(labels)
        if valid:
            self.union(torch.tensor(valid[:1] * len(valid)), torch.tensor(valid))

    def block(self, labels: Tensor | Iterable[Tensor | None], reason: str) -> None:
        """The classes of every slot in ``labels`` may not be removed, because of ``reason``."""
        tensors = [labels] if isinstance(labels, Tensor) else [t for t in labels if t is not None]
        for tensor in tensors:
            for slot in _valid(tensor):
                self._claimed[slot] = True
                self._blocks.append((slot, reason))

    def groups(self, parameters: frozenset[str]) -> tuple[ChannelGroup, ...]:
        """The classes as groups, in slot order; a class without a parameter or with a slot no
        rule read is left out (not a channel)."""
        members: dict[int, dict[tuple[str, int], list[int]]] = {}
        unclaimed: set[int] = set()
        for slot, (name, dim, index) in enumerate(self._owner):
            root = self.find(slot)
            members.setdefault(root, {}).setdefault((name, dim), []).append(index)
            if not self._claimed[slot]:
                unclaimed.add(root)
        reasons: dict[int, str] = {}
        for slot, reason in self._blocks:
            reasons.setdefault(self.find(slot), reason)
        found = []
        for root, by_tensor in members.items():
            if root in unclaimed or not any(name in parameters for name, _ in by_tensor):
                continue
            slices = tuple((name, dim, tuple(idx)) for (name, dim), idx in by_tensor.items())
            found.append(ChannelGroup(slices, reasons.get(root)))
        return tuple(found)


def _valid(labels: Tensor) -> list[int]:
    flat = labels.reshape(-1)
    return [int(s) for s in torch.unique(flat[flat >= 0]).tolist()]
