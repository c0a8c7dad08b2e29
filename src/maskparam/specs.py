"""Specs: immutable descriptions of a constraint, each building one parametrization per tensor.

A spec validates its own arguments when constructed and the tensor when built, so a bad rule
fails before :func:`maskparam.apply_mask` changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor
from typing_extensions import override

from maskparam import masks
from maskparam.errors import error
from maskparam.masks import IndexLike, MaskSource
from maskparam.parametrizations import (
    ConstraintParametrization,
    FreezeEntries,
    FreezeSlices,
    MaskMultiply,
    ScatterFree,
    TriangularPart,
)

__all__ = ["Freeze", "Layout", "Mask", "Spec", "Triangular"]

Layout = Literal["dense", "compact"]


class Spec:
    """Base of all specs: :meth:`build` returns the parametrization for one tensor.

    A spec whose :meth:`group_key` is not ``None`` is built for all the tensors that share the
    key at once, by :meth:`build_group` (a Subspace group shares one θ).
    """

    #: ``"dense"``: the original keeps its shape (fastest compute). ``"compact"``: the original
    #: stores only the free entries, so optimizer state shrinks with them (see ScatterFree).
    layout: Layout = "dense"

    def group_key(self) -> str | None:
        """Tensors whose specs return the same key are built together; ``None``: one by one."""
        return None

    def _compact_needs_values(self, name: str, tensor: Tensor) -> None:
        if tensor.device.type == "meta":
            raise error(
                f"{type(self).__name__} for {name!r}",
                "layout='compact' stores the positions of the free entries, which a meta tensor "
                "does not have: it needs real tensors.",
                fix="apply after to_empty() and loading the weights, or use the dense layout.",
            )

    def _check_layout(self) -> None:
        if self.layout not in ("dense", "compact"):
            raise error(
                type(self).__name__,
                f"unknown layout {self.layout!r}.",
                fix="use layout='dense' (the default) or layout='compact'.",
            )

    def build_group(
        self, members: Sequence[tuple[str, Tensor]], specs: Sequence[Spec]
    ) -> list[ConstraintParametrization]:
        """Build the parametrizations of a group: ``members`` are (name, tensor) pairs."""
        return [
            spec.build(name, tensor) for (name, tensor), spec in zip(members, specs, strict=True)
        ]

    def build(self, name: str, tensor: Tensor) -> ConstraintParametrization:
        """Validate ``tensor`` (named ``name`` in errors) and build its parametrization.

        ``tensor`` is the tensor's value as this spec sees it (after any earlier stacked spec).
        """
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Mask(Spec):
    """Effective tensor = original ⊙ mask: unselected entries are exactly zero and never train.

    ``mask``: a bool or 0/1 tensor of the tensor's shape or broadcastable to it (a per-row mask
    zeroes whole rows), a callable of the tensor, or a generator from :mod:`maskparam.masks`.

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(3, 2)
    >>> _ = mp.apply_mask(layer, {"weight": mp.Mask(torch.tensor([[1, 0, 1], [0, 1, 0]]))})
    >>> (layer.weight == 0).sum().item()
    3
    """

    mask: MaskSource
    layout: Layout = field(default="dense", kw_only=True)

    def __post_init__(self) -> None:
        self._check_layout()

    @override
    def build(self, name: str, tensor: Tensor) -> ConstraintParametrization:
        kept = masks.resolve(self.mask, tensor, f"Mask for {name!r}")
        if self.layout == "compact":
            self._compact_needs_values(name, tensor)
            return ScatterFree(kept, tensor.shape, None, "Mask(compact)")
        return MaskMultiply(kept)


@dataclass(frozen=True, eq=False)
class Freeze(Spec):
    """Chosen entries keep their values at apply time, bit for bit, forever; the rest train.

    Choose the entries with ``mask`` (any source :class:`Mask` takes; ``True`` = frozen) or
    whole slices with ``dim`` and ``index`` (``Freeze(dim=0, index=[5, 6, 7, 8, 9])`` freezes 5
    of 10 conv filters). Outputs are bit-identical right after applying.

    >>> import torch, maskparam as mp
    >>> conv = torch.nn.Conv2d(3, 10, 3)
    >>> before = conv.weight.detach().clone()
    >>> _ = mp.apply_mask(conv, {"weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9])})
    >>> torch.equal(conv.weight, before)
    True
    """

    mask: MaskSource | None = None
    dim: int | None = field(default=None, kw_only=True)
    index: IndexLike | None = field(default=None, kw_only=True)
    layout: Layout = field(default="dense", kw_only=True)

    def __post_init__(self) -> None:
        self._check_layout()
        by_slices = self.dim is not None or self.index is not None
        if self.mask is not None and by_slices:
            raise error(
                "Freeze",
                "got both a mask and dim/index.",
                fix="pass either mask= or dim= with index=.",
            )
        if self.mask is None and (self.dim is None or self.index is None):
            raise error(
                "Freeze",
                "needs the entries to freeze.",
                fix="pass mask= (True = frozen) or dim= and index=; to freeze a whole tensor, "
                "call tensor.requires_grad_(False) instead.",
            )

    @override
    def build(self, name: str, tensor: Tensor) -> ConstraintParametrization:
        subject = f"Freeze for {name!r}"
        value = tensor.detach()
        if self.layout == "compact":
            self._compact_needs_values(name, value)
            if self.dim is not None and self.index is not None:
                frozen = masks.slices(self.dim, self.index).build(value, subject)
            else:
                frozen = masks.resolve(cast(MaskSource, self.mask), value, subject)
            fill = torch.where(frozen, value, torch.zeros((), dtype=value.dtype))
            return ScatterFree(~frozen, value.shape, fill, "Freeze(compact)")
        if self.dim is not None and self.index is not None:
            masks.slices(self.dim, self.index).build(value, subject)  # validates dim and index
            dim = self.dim % value.dim()
            index = masks.normalize_index(self.index, value.shape[dim], subject, "index")
            index = index.to(value.device)  # computed on the CPU: works for meta tensors too
            return FreezeSlices(dim, index, value.index_select(dim, index).clone())
        frozen = masks.resolve(cast(MaskSource, self.mask), value, subject)  # see __post_init__
        # where(), not a multiply: a non-finite value at a free entry must not leak into the rest.
        frozen_values = torch.where(frozen, value, torch.zeros((), dtype=value.dtype))
        return FreezeEntries(~frozen, frozen_values)


@dataclass(frozen=True)
class Triangular(Spec):
    """Effective tensor = ``tril(original, diagonal)`` (or ``triu`` with ``lower=False``).

    The other triangle is exactly zero and never trains. Works on matrices and on batches of
    matrices (the last two dimensions).

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(3, 3)
    >>> _ = mp.apply_mask(layer, {"weight": mp.Triangular()})
    >>> bool((layer.weight.triu(1) == 0).all())
    True
    """

    lower: bool = True
    diagonal: int = 0
    layout: Layout = field(default="dense", kw_only=True)

    def __post_init__(self) -> None:
        self._check_layout()

    @override
    def build(self, name: str, tensor: Tensor) -> ConstraintParametrization:
        if tensor.dim() < 2:
            raise error(
                f"Triangular for {name!r}",
                f"needs a matrix or a batch of matrices, but the tensor has shape "
                f"{tuple(tensor.shape)}.",
                fix="select only tensors with 2 or more dimensions (e.g. '*.weight', not '*.bias').",
            )
        part = TriangularPart(lower=self.lower, diagonal=self.diagonal)
        if self.layout == "compact":
            self._compact_needs_values(name, tensor)
            triangle = part(torch.ones(tensor.shape[-2:], dtype=torch.bool, device=tensor.device))
            return ScatterFree(triangle, tensor.shape, None, part.describe()[:-1] + ", compact)")
        return part
