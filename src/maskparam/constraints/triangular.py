"""``Triangular``: effective tensor = ``tril(original, diagonal)`` (or ``triu``).

Invariant: every entry of the other triangle is exactly zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from typing_extensions import override

from maskparam.constraints.compact import (
    CompactConstraint,
    check_compact_possible,
    chooses_compact,
    compact_checkpoint_in_full,
)
from maskparam.core.constraint import (
    Constraint,
    Layout,
    Pins,
    Spec,
    broadcasts_to,
    check_layout,
    zeros_pinned,
)
from maskparam.errors import check_bool, check_int, error

__all__ = ["Triangular", "TriangularConstraint"]


@dataclass(frozen=True)
class Triangular(Spec):
    """Effective tensor = ``tril(original, diagonal)`` (or ``triu`` with ``lower=False``).

    The other triangle is exactly zero and never trains. Works on matrices and on batches of
    matrices (the last two dimensions).

    ``layout``: ``"auto"`` (default) stores only the triangle (``"compact"``) where it holds at
    most 60% of the entries (square matrices from 5 x 5 on) of a trainable, untied Parameter
    constrained first; ``"dense"`` elsewhere (which stores nothing).

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(3, 3)
    >>> _ = mp.apply_mask(layer, {"weight": mp.Triangular()})
    >>> bool((layer.weight.triu(1) == 0).all())
    True
    """

    lower: bool = True
    diagonal: int = 0
    layout: Layout = field(default="auto", kw_only=True)

    def __post_init__(self) -> None:
        check_layout(self)
        check_bool(self.lower, "Triangular", "lower")
        check_int(self.diagonal, "Triangular", "diagonal")

    @override
    def build(self, name: str, tensor: Tensor) -> Constraint:
        if tensor.dim() < 2:
            raise error(
                f"Triangular for {name!r}",
                f"needs a matrix or a batch of matrices, but the tensor has shape "
                f"{tuple(tensor.shape)}.",
                fix="select only tensors with 2 or more dimensions (e.g. '*.weight', not '*.bias').",
            )
        rows, cols = tensor.shape[-2:]
        # A diagonal beyond the matrix is a mistake, not a constraint (it zeroes nothing or
        # everything of every such matrix); within [-rows, cols], tiny matrices included, the
        # triangle is what the user asked for.
        if not -rows <= self.diagonal <= cols:
            raise error(
                f"Triangular for {name!r}",
                f"diagonal={self.diagonal} lies beyond a {rows} x {cols} matrix: it would "
                + (
                    "constrain no entry."
                    if (self.diagonal > cols) == self.lower
                    else "zero every entry."
                ),
                fix=f"choose a diagonal in [{-(rows - 1)}, {cols - 1}] (0 is the main diagonal).",
            )
        part = TriangularConstraint(lower=self.lower, diagonal=self.diagonal)
        triangle = part(torch.ones(tensor.shape[-2:], dtype=torch.bool, device=tensor.device))
        if chooses_compact(self.layout, triangle, tensor.shape):
            check_compact_possible(f"Triangular for {name!r}", tensor)
            return part.in_other_layout({"free": triangle}, tensor.shape)
        return part


class TriangularConstraint(Constraint):
    """``tril(x, diagonal)`` or ``triu(x, diagonal)`` over the last two dimensions; no storage."""

    selects_entries = True

    def __init__(self, *, lower: bool, diagonal: int) -> None:
        super().__init__()
        self.lower = lower
        self.diagonal = diagonal

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x.tril(self.diagonal) if self.lower else x.triu(self.diagonal)

    @override
    def pins(self, value: Tensor) -> Pins:
        ones = torch.ones(value.shape[-2:], dtype=torch.bool, device=value.device)
        return zeros_pinned(~self.forward(ones).expand(value.shape), value)

    @override
    def from_other_layout(
        self, state: Mapping[str, Tensor], original: Tensor, shape: torch.Size
    ) -> tuple[dict[str, Tensor], Tensor] | str | None:
        # The compact layout saves the triangle's entries and the triangle as ``free``: it must
        # be this one (another triangle is refused by the shape check, not loaded as this one).
        free = state.get("free")
        if free is None or "fill" in state or not broadcasts_to(free.shape, shape):
            return None
        ones = torch.ones(shape[-2:], dtype=torch.bool, device=free.device)
        if not torch.equal(free.ne(0).expand(shape), self.forward(ones).expand(shape)):
            return None
        full = compact_checkpoint_in_full(free, original, shape)
        return None if full is None else ({}, full)

    @override
    def in_other_layout(self, state: Mapping[str, Tensor], shape: torch.Size) -> Constraint:
        dense = functools.partial(_dense_triangle, lower=self.lower, diagonal=self.diagonal)
        return CompactConstraint(
            state["free"], shape, None, self.describe()[:-1] + ", compact)", dense=dense
        )

    @override
    def describe(self) -> str:
        return f"Triangular({'lower' if self.lower else 'upper'}, diagonal={self.diagonal})"


def _dense_triangle(
    state: Mapping[str, Tensor], shape: torch.Size, description: str, *, lower: bool, diagonal: int
) -> Constraint:
    """A compact triangle's dense layout (which stores nothing)."""
    del state, shape, description
    return TriangularConstraint(lower=lower, diagonal=diagonal)
