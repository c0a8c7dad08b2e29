"""``Mask``: the original at kept entries, exactly ``+0.0`` elsewhere (a bitwise selection, so a
stored inf or NaN cannot leak in). Unselected entries never train.

Invariant: every entry outside the mask is exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
from maskparam.constraints.csr import CSRConstraint, check_csr_target, csr_kernels_problem
from maskparam.constraints.kernels import keep_bits
from maskparam.core.constraint import (
    Constraint,
    Layout,
    MaskChange,
    Pins,
    Spec,
    binary_mask_problem,
    broadcasts_to,
    check_layout,
    zeros_pinned,
)
from maskparam.errors import error
from maskparam.masks import generators as masks
from maskparam.masks.generators import MaskSource

__all__ = ["Mask", "MaskConstraint"]


@dataclass(frozen=True, eq=False)
class Mask(Spec):
    """The original at kept entries, exactly ``+0.0`` elsewhere: unselected entries never train.

    ``mask``: a bool or 0/1 tensor of the tensor's shape or broadcastable to it (a per-row mask
    zeroes whole rows), a callable of the tensor, or a generator from :mod:`maskparam.masks`.
    ``True`` (or 1) keeps an entry. A callable is evaluated once, at apply time.

    ``layout``: ``"auto"`` (default) stores only the kept entries (``"compact"``) where at most
    60% are kept and the tensor is a trainable, untied Parameter constrained first, so that the
    optimizer never sees a masked entry; ``"dense"`` elsewhere. :func:`maskparam.summary` names
    the compact ones. ``"csr"`` (an ``nn.Linear`` or Conv1D weight, as its only constraint):
    stored as compact, and the module computes with the kept entries as a CSR matrix, forward
    and backward, without a dense weight: faster than dense from about 80% zeros
    (:mod:`maskparam.constraints.csr`). :func:`maskparam.to_sparse` chooses it by timing.

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(3, 2)
    >>> _ = mp.apply_mask(layer, {"weight": mp.Mask(torch.tensor([[1, 0, 1], [0, 1, 0]]))})
    >>> (layer.weight == 0).sum().item()
    3
    """

    mask: MaskSource
    layout: Layout = field(default="auto", kw_only=True)

    def __post_init__(self) -> None:
        check_layout(self, csr=True)

    @override
    def check_holder(self, name: str, module: nn.Module, local_name: str, n_specs: int) -> None:
        if self.layout == "csr":
            check_csr_target(self._for(name), module, local_name, n_specs)

    @override
    def build(self, name: str, tensor: Tensor) -> Constraint:
        return self.build_selected(name, tensor, masks.resolve(self.mask, tensor, self._for(name)))

    @override
    def joint_source(self) -> masks.JointMaskGenerator | None:
        return self.mask if isinstance(self.mask, masks.JointMaskGenerator) else None

    @override
    def mask_source(self, rule: str) -> MaskSource:
        return self.mask

    def _for(self, name: str) -> str:
        return f"Mask for {name!r}"

    @override
    def build_selected(self, name: str, tensor: Tensor, selected: Tensor) -> Constraint:
        kept = masks.as_binary(selected, tensor, self._for(name))
        keeps = masks.describe_source(self.mask)
        constraint: Constraint
        if self.layout == "csr":
            check_compact_possible(self._for(name), tensor, "csr")
            problem = csr_kernels_problem(tensor) if tensor.dim() == 2 else "it is not 2-D"
            if problem is not None:
                raise error(
                    self._for(name),
                    f"layout='csr' cannot train this tensor: {problem}.",
                    fix="use layout='compact' (or train in float32).",
                )
            constraint = CSRConstraint(
                kept,
                tensor.shape,
                None,
                f"Mask(keeps {keeps}, csr)",
                mask_spec=Mask,
                template="Mask(keeps {}, csr)",
                dense=_dense_mask,
            )
        elif chooses_compact(self.layout, kept, tensor.shape):
            check_compact_possible(self._for(name), tensor)
            constraint = CompactConstraint(
                kept,
                tensor.shape,
                None,
                f"Mask(keeps {keeps}, compact)",
                mask_spec=Mask,
                template="Mask(keeps {}, compact)",
                dense=_dense_mask,
            )
        else:
            constraint = MaskConstraint(
                kept, description=f"Mask(keeps {keeps})", shape=tensor.shape
            )
        # "auto" reaches here only where compact is possible: update_masks may choose again.
        constraint.auto_layout = self.layout == "auto"
        return constraint


class MaskConstraint(Constraint):
    """``x`` at kept entries, ``+0.0`` elsewhere, with a uint8 0/1 mask (1 byte per entry, or per
    slice when it broadcasts)."""

    mask: Tensor
    mask_buffer = "mask"
    selects_entries = True
    mask_spec = Mask

    def __init__(
        self, mask: Tensor, *, description: str = "Mask", shape: torch.Size | None = None
    ) -> None:
        super().__init__()
        self.description = description
        self.shape = mask.shape if shape is None else shape  # the tensor's
        self.register_buffer("mask", mask.to(torch.uint8).contiguous())

    @override
    def forward(self, x: Tensor) -> Tensor:
        # Bitwise, not a multiply: a masked entry is +0.0 even where the stored original holds
        # inf or NaN (inf * 0 = NaN), at the cost of a multiply (see constraints/kernels.py).
        return keep_bits(x, self.mask)

    @override
    def mask_shape(self) -> torch.Size:
        return self.shape

    @override
    def pins(self, value: Tensor) -> Pins:
        return zeros_pinned((self.mask == 0).expand(value.shape), value)

    @override
    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        problem = (
            binary_mask_problem("mask", state["mask"], self.mask, full_shape=self.shape)
            if "mask" in state
            else None
        )
        return [*super().check_state(state), *([problem] if problem else [])]

    @override
    def take_mask(self, selected: Tensor, current: Tensor, what: str) -> MaskChange:
        shape = current.shape
        before = self.mask.bool().expand(shape)
        after = selected.expand(shape)
        self.mask = fit_mask(self.mask, selected)
        self.description = f"Mask(keeps {what})"
        # A regrown entry starts from zero; a kept one keeps its value.
        start = torch.where(after & ~before, torch.zeros((), dtype=current.dtype), current)
        return MaskChange(before.clone(), after.clone(), start)

    @override
    def free_for_mask(self, selected: Tensor) -> Tensor:
        return selected

    @override
    def mask_for_free(self, free: Tensor) -> Tensor:
        return free

    @override
    def from_other_layout(
        self, state: Mapping[str, Tensor], original: Tensor, shape: torch.Size
    ) -> tuple[dict[str, Tensor], Tensor] | str | None:
        # The compact layout saves the kept entries and the mask as ``free``, without ``fill``.
        free = state.get("free")
        # (A mask of another shape that broadcasts, too: a per-row mask made per entry.)
        if free is None or "fill" in state or not broadcasts_to(free.shape, shape):
            return None
        full = compact_checkpoint_in_full(free, original, shape)
        return None if full is None else ({"mask": free}, full)

    @override
    def relayout(self, free: Tensor) -> Constraint | None:
        # "auto" stores a mask compact at this density: switch as apply_mask would have chosen.
        if not self.auto_layout or not chooses_compact("auto", free, self.shape):
            return None
        compact = self.in_other_layout({"free": free}, self.shape)
        compact.auto_layout = True
        return compact

    @override
    def in_other_layout(self, state: Mapping[str, Tensor], shape: torch.Size) -> Constraint:
        return CompactConstraint(
            state["free"],
            shape,
            None,
            self.description[:-1] + ", compact)",
            mask_spec=Mask,
            template="Mask(keeps {}, compact)",
            dense=_dense_mask,
        )

    @override
    def describe(self) -> str:
        return self.description


def _dense_mask(state: Mapping[str, Tensor], shape: torch.Size, description: str) -> Constraint:
    """A compact Mask's dense layout, for a dense checkpoint (its ``mask``), or where
    ``update_masks`` regrew it past what "auto" stores compact (its ``free`` entries)."""
    mask = state["mask"] if "mask" in state else state["free"]
    return MaskConstraint(mask, description=description, shape=shape)
