"""``Freeze``: chosen entries keep their values at apply time, bit for bit, forever; the rest train.

Invariant: every frozen entry equals its recorded value bit for bit (the sign of zero too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.constraints.compact import (
    CompactConstraint,
    check_compact_possible,
    chooses_compact,
    compact_checkpoint_in_full,
    fit_mask,
)
from maskparam.constraints.kernels import keep_or_frozen
from maskparam.core.constraint import (
    Constraint,
    Layout,
    MaskChange,
    Pins,
    Spec,
    binary_mask_problem,
    check_layout,
)
from maskparam.errors import check_int, error
from maskparam.masks import generators as masks
from maskparam.masks.generators import IndexLike, MaskSource

__all__ = ["Freeze", "FreezeEntriesConstraint", "FreezeSlicesConstraint"]


def _refuse_untrained(subject: str, tensor: Tensor) -> None:
    """Refuse a Parameter that does not train (``requires_grad=False``, named exactly): freezing
    some of its entries would leave the others untrained too, and say nothing."""
    if isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
        raise error(
            subject,
            "the Parameter does not train (requires_grad=False): Freeze would leave its free "
            "entries frozen too, and nothing of it would train.",
            fix="call tensor.requires_grad_(True) before apply_mask to train the entries Freeze "
            "leaves free, or leave the tensor out of the rules (it is frozen whole already).",
        )


@dataclass(frozen=True, eq=False)
class Freeze(Spec):
    """Chosen entries keep their values at apply time, bit for bit, forever; the rest train.

    Choose the entries with ``mask`` (any source :class:`~maskparam.Mask` takes; ``True`` =
    frozen) or whole slices with ``dim`` and ``index`` (``Freeze(dim=0, index=[5, 6, 7, 8, 9])``
    freezes 5 of 10 conv filters). Outputs are bit-identical right after applying.

    ``layout``: ``"auto"`` (default) stores only the free entries (``"compact"``) where a mask
    leaves at most 60% of them free on a trainable, untied Parameter constrained first, so the
    optimizer never sees a frozen entry; ``"dense"`` elsewhere, and for ``dim``/``index`` (which
    stores only the frozen slices).

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
    layout: Layout = field(default="auto", kw_only=True)

    def __post_init__(self) -> None:
        check_layout(self)
        by_slices = self.dim is not None or self.index is not None
        if self.mask is not None and by_slices:
            raise error(
                "Freeze",
                "got both a mask and dim/index.",
                fix="pass either mask= or dim= with index=.",
            )
        if self.dim is not None:
            check_int(self.dim, "Freeze", "dim")
        if self.index is not None:
            masks.check_index(self.index, "Freeze", "index")
        if self.mask is None and (self.dim is None or self.index is None):
            raise error(
                "Freeze",
                "needs the entries to freeze.",
                fix="pass mask= (True = frozen) or dim= and index=; to freeze a whole tensor, "
                "call tensor.requires_grad_(False) instead.",
            )

    def _frozen(self, value: Tensor, subject: str) -> Tensor:
        if self.dim is not None and self.index is not None:
            return masks.slices(self.dim, self.index).build(value, subject)
        return masks.resolve(cast(MaskSource, self.mask), value, subject)  # see __post_init__

    @override
    def build(self, name: str, tensor: Tensor) -> Constraint:
        subject = f"Freeze for {name!r}"
        _refuse_untrained(subject, tensor)
        value = tensor.detach()
        if self.dim is not None and self.index is not None and self.layout != "compact":
            # Frozen slices stay dense under "auto": they store only the frozen slices, and the
            # optimizer state of a frozen row is a small part of a conv or linear layer's step.
            self._frozen(value, subject)  # validates dim and index
            dim = self.dim % value.dim()
            index = masks.normalize_index(self.index, value.shape[dim], subject, "index")
            frozen_values = value.index_select(dim, index.to(value.device)).clone()
            return FreezeSlicesConstraint(dim, index, frozen_values)
        return self.build_selected(name, tensor, self._frozen(value, subject))

    @override
    def joint_source(self) -> masks.JointMaskGenerator | None:
        return self.mask if isinstance(self.mask, masks.JointMaskGenerator) else None

    @override
    def build_selected(self, name: str, tensor: Tensor, selected: Tensor) -> Constraint:
        subject = f"Freeze for {name!r}"
        _refuse_untrained(subject, tensor)
        value = tensor.detach()
        frozen = masks.as_binary(selected, value, subject)
        if chooses_compact(self.layout, ~frozen, value.shape):
            check_compact_possible(subject, value)
            fill = torch.where(frozen, value, torch.zeros((), dtype=value.dtype))
            return CompactConstraint(
                ~frozen,
                value.shape,
                fill,
                f"Freeze(freezes {self._what()}, compact)",
                mask_spec=Freeze,
                template="Freeze(freezes {}, compact)",
                dense=_dense_freeze,
            )
        # where(), not a multiply: a non-finite value at a free entry must not leak into the rest.
        frozen_values = torch.where(frozen, value, torch.zeros((), dtype=value.dtype))
        return FreezeEntriesConstraint(
            ~frozen, frozen_values, description=f"Freeze(freezes {self._what()})"
        )

    @override
    def mask_source(self, rule: str) -> MaskSource:
        if self.mask is None:
            raise error(
                f"rule {rule}",
                "update_masks takes a Freeze with a mask; Freeze(dim=..., index=...) freezes "
                "slices, which it does not update.",
                fix="pass mp.Freeze(mask), or remove_parametrizations and apply_mask again.",
            )
        return self.mask

    def _what(self) -> str:
        if self.dim is not None and self.index is not None:
            return masks.slices(self.dim, self.index).describe()
        return masks.describe_source(self.mask)


class FreezeEntriesConstraint(Constraint):
    """Entries where ``keep`` is 0 hold their value at apply time, bit for bit.

    Selected bitwise (see constraints/kernels.py): a frozen ``-0.0`` stays ``-0.0`` and a
    non-finite stored original at a frozen entry cannot leak in, which ``v + x * 0`` allowed.
    """

    keep: Tensor
    frozen_values: Tensor
    mask_buffer = "keep"
    selects_entries = True
    mask_spec = Freeze

    def __init__(
        self, keep: Tensor, frozen_values: Tensor, *, description: str = "Freeze(mask)"
    ) -> None:
        super().__init__()
        self.description = description
        self.register_buffer("keep", keep.to(torch.uint8).contiguous())
        self.register_buffer("frozen_values", frozen_values.contiguous())

    @override
    def forward(self, x: Tensor) -> Tensor:
        return keep_or_frozen(x, self.keep, self.frozen_values)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        # Assigning the tensor (or loading a plain checkpoint) sets the values to hold: as if
        # the constraint had been applied to a model holding `value`.
        with torch.no_grad():
            held = self.level_input(value)
            self.frozen_values.copy_(torch.where(self.keep.bool(), 0, held))
        return value

    @override
    def mask_shape(self) -> torch.Size:
        return self.frozen_values.shape

    @override
    def pins(self, value: Tensor) -> Pins:
        return Pins((self.keep == 0).expand(value.shape), self.frozen_values, captured=True)

    @override
    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        problems = super().check_state(state)
        keep = state.get("keep", self.keep)
        if "keep" in state:
            problem = binary_mask_problem(
                "keep", keep, self.keep, full_shape=self.frozen_values.shape
            )
            if problem:
                return [*problems, problem]
        frozen = state.get("frozen_values", self.frozen_values)
        if frozen.shape != self.frozen_values.shape:
            shapes = f"{tuple(frozen.shape)}, this model's {tuple(self.frozen_values.shape)}"
            return [*problems, f"frozen_values: shape {shapes}"]
        # The forward ORs the frozen bits in: at free entries they must be +0.0 (no bits set).
        stray = (keep.to(torch.bool) & (frozen.ne(0) | frozen.signbit() | frozen.isnan())).sum()
        if stray:
            problems.append(f"frozen_values: {int(stray)} free entries hold values, not +0.0")
        return problems

    @override
    def take_mask(self, selected: Tensor, current: Tensor, what: str) -> MaskChange:
        shape = current.shape
        before = self.keep.bool().expand(shape)
        after = ~selected.expand(shape)
        self.keep = fit_mask(self.keep, ~selected)
        # Newly frozen entries hold their current value, bit for bit; an unfrozen one trains on
        # from its frozen value.
        self.frozen_values.copy_(torch.where(selected.expand(shape), current, 0))
        self.description = f"Freeze(freezes {what})"
        return MaskChange(before.clone(), after.clone(), current)

    @override
    def free_for_mask(self, selected: Tensor) -> Tensor:
        return ~selected

    @override
    def input_changed(self, changed: Tensor, value: Tensor) -> None:
        # A frozen entry holds what it captured; where the stack before it now says otherwise
        # (a Mask pruned it), it holds the new value, so that the earlier constraint's zero wins.
        at = changed & (self.keep == 0)
        self.frozen_values.copy_(torch.where(at, value, self.frozen_values))

    @override
    def from_other_layout(
        self, state: Mapping[str, Tensor], original: Tensor, shape: torch.Size
    ) -> tuple[dict[str, Tensor], Tensor] | str | None:
        # The compact layout saves the free entries, the mask of free entries as ``free`` and
        # the frozen values as ``fill``.
        free, fill = state.get("free"), state.get("fill")
        if free is None or fill is None or fill.shape != shape or free.shape != self.keep.shape:
            return None
        full = compact_checkpoint_in_full(free, original, shape, base=fill)
        return None if full is None else ({"keep": free, "frozen_values": fill}, full)

    @override
    def base_state(self) -> dict[str, Tensor]:
        # Under the compact layout's name (both hold the frozen values in full, +0.0 at free
        # entries): a trainable state checksums the same base in either layout.
        return {"fill": self.frozen_values}

    @override
    def in_other_layout(self, state: Mapping[str, Tensor], shape: torch.Size) -> Constraint:
        return CompactConstraint(
            state["free"],
            shape,
            state["fill"],
            self.description[:-1] + ", compact)",
            mask_spec=Freeze,
            template="Freeze(freezes {}, compact)",
            dense=_dense_freeze,
        )

    @override
    def describe(self) -> str:
        return self.description


def _dense_freeze(state: Mapping[str, Tensor], shape: torch.Size, description: str) -> Constraint:
    """A compact Freeze's dense layout, for a dense checkpoint (its ``keep``, ``frozen_values``)."""
    del shape  # the frozen values have it
    return FreezeEntriesConstraint(state["keep"], state["frozen_values"], description=description)


class FreezeSlicesConstraint(Constraint):
    """``x.index_copy(dim, index, frozen_values)``: slices ``index`` along ``dim`` are frozen.

    Stores only the frozen slices; the backward is a cheap ``index_fill`` of the gradient.
    """

    index: Tensor
    frozen_values: Tensor
    selects_entries = True

    def __init__(self, dim: int, index: Tensor, frozen_values: Tensor) -> None:
        super().__init__()
        self.dim = dim
        # The spec's sorted, duplicate-free slice indices (computed on the CPU, so meta tensors
        # work): fixed (never averaged or cast), saved so that a checkpoint of other slices is
        # refused, and kept on the CPU for to_empty().
        self._index_cpu = index
        self.set_fixed("index", index.to(frozen_values.device), persistent=True)
        self.register_buffer("frozen_values", frozen_values.contiguous())

    @override
    def regenerate(self, name: str, device: torch.device) -> Tensor:
        return self._index_cpu.to(device)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x.index_copy(self.dim, self.index, self.frozen_values)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        with torch.no_grad():  # as FreezeEntriesConstraint.right_inverse: the new values to hold
            held = self.level_input(value)
            self.frozen_values.copy_(held.index_select(self.dim, self.index))
        return value

    @override
    def pins(self, value: Tensor) -> Pins:
        index = self.index.to(value.device)
        entries = torch.zeros(value.shape, dtype=torch.bool, device=value.device)
        entries.index_fill_(self.dim, index, True)
        values = torch.zeros(value.shape, dtype=self.frozen_values.dtype, device=value.device)
        values.index_copy_(self.dim, index, self.frozen_values.to(value.device))
        return Pins(entries, values, captured=True)

    @override
    def input_changed(self, changed: Tensor, value: Tensor) -> None:
        # As FreezeEntriesConstraint.input_changed: the frozen slices take the new input where
        # it changed.
        index = self.index.to(value.device)
        at = changed.index_select(self.dim, index)
        self.frozen_values.copy_(
            torch.where(at, value.index_select(self.dim, index), self.frozen_values)
        )

    @override
    def describe(self) -> str:
        return f"Freeze(dim={self.dim}, {self.index.numel()} slices)"
