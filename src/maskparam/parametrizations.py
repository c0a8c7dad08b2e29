"""The parametrization modules that maskparam registers with ``torch.nn.utils.parametrize``.

Each one maps the stored original ``x`` to the effective tensor in the forward pass, so the
gradient at a constrained entry is exactly zero and no optimizer can move the effective tensor off
its constraint. The formulations were chosen by measurement (``benchmarks/kernels.py``): on CPU,
``torch.where`` and ``masked_fill`` cost ~8x a multiply per element and a multiply by a bool
mask ~2x, while a multiply by a *uint8* mask costs about as much as by a float mask, at a quarter
of the memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

__all__ = [
    "ConstraintParametrization",
    "FreezeEntries",
    "FreezeSlices",
    "MaskMultiply",
    "ScatterFree",
    "TriangularPart",
]


class ConstraintParametrization(nn.Module):
    """Base of every parametrization maskparam registers.

    :func:`maskparam.remove_parametrizations` removes exactly the instances of this class, so a
    user's own parametrizations (``weight_norm``, ``orthogonal``) on the same tensor survive.
    """

    # The module's parameter and buffer names in order before maskparam first touched it:
    # removal puts each baked tensor back in its place, so parameters() and state_dict keep
    # their order (optimizer state_dicts map to parameters by position).
    slot_orders: dict[str, tuple[str, ...]] | None = None
    # Tensors constrained with the same group name share coordinates (a Subspace's θ).
    group_name: str | None = None
    # Compact layouts store fewer entries than the tensor has: see ScatterFree.
    compact: bool = False

    def right_inverse(self, value: Tensor) -> Tensor:
        # Assigning ``module.weight = value`` stores ``value`` as the original; the constraint
        # then applies to it in the forward pass (masked entries stay zero, frozen ones frozen).
        return value

    def on_registered(self, original: Tensor) -> None:
        """Called once registered, with the stored original (e.g. to freeze it)."""

    def on_removed(self, original: Tensor) -> None:
        """Called once removed, with the (baked or restored) tensor: undo ``on_registered``."""

    def trained_parameters(self) -> list[Tensor]:
        """Parameters this constraint adds and trains (a learnable mask's scores, a θ)."""
        return [p for p in self.parameters() if p.requires_grad]

    def restrict_free(self, free: Tensor) -> Tensor:
        """Given a bool tensor of the entries that train before this constraint, return those after."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human-readable description for :func:`maskparam.summary`."""
        raise NotImplementedError


class MaskMultiply(ConstraintParametrization):
    """``x * mask`` with a uint8 0/1 mask (1 byte per entry, or per slice when it broadcasts)."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.uint8).contiguous())

    @override
    def forward(self, x: Tensor) -> Tensor:
        # Convert once per forward: autograd saves the converted mask for the backward, which
        # then multiplies float by float. Multiplying by the uint8 mask directly would hide a
        # conversion in both passes (~25% slower, measured in benchmarks/kernels.py).
        return x * self.mask.to(x.dtype)

    @override
    def restrict_free(self, free: Tensor) -> Tensor:
        return free & self.mask.bool()

    @override
    def describe(self) -> str:
        return "Mask"


class FreezeEntries(ConstraintParametrization):
    """``frozen_values + x * keep``: entries where ``keep`` is 0 hold their value at apply time.

    One fused ``addcmul`` (about a quarter of ``torch.where``'s time here) and exact: a frozen
    entry is ``v + x*0 = v`` and a free one ``0 + x*1 = x``.
    """

    keep: Tensor
    frozen_values: Tensor

    def __init__(self, keep: Tensor, frozen_values: Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep.to(torch.uint8).contiguous())
        self.register_buffer("frozen_values", frozen_values.contiguous())

    @override
    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.frozen_values, x, self.keep)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        # Assigning the tensor (or loading a plain checkpoint) sets the values to hold: as if
        # the constraint had been applied to a model holding `value`.
        with torch.no_grad():
            self.frozen_values.copy_(torch.where(self.keep.bool(), 0, value))
        return value

    @override
    def restrict_free(self, free: Tensor) -> Tensor:
        return free & self.keep.bool()

    @override
    def describe(self) -> str:
        return "Freeze(mask)"


class FreezeSlices(ConstraintParametrization):
    """``x.index_copy(dim, index, frozen_values)``: slices ``index`` along ``dim`` are frozen.

    Stores only the frozen slices; the backward is a cheap ``index_fill`` of the gradient.
    """

    index: Tensor
    frozen_values: Tensor

    def __init__(self, dim: int, index: Tensor, frozen_values: Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index)
        self.register_buffer("frozen_values", frozen_values.contiguous())

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x.index_copy(self.dim, self.index, self.frozen_values)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        with torch.no_grad():  # as FreezeEntries.right_inverse: the new values to hold
            self.frozen_values.copy_(value.index_select(self.dim, self.index))
        return value

    @override
    def restrict_free(self, free: Tensor) -> Tensor:
        return free.index_fill(self.dim, self.index.to(free.device), False)

    @override
    def describe(self) -> str:
        return f"Freeze(dim={self.dim}, {self.index.numel()} slices)"


class TriangularPart(ConstraintParametrization):
    """``tril(x, diagonal)`` or ``triu(x, diagonal)`` over the last two dimensions; no storage."""

    def __init__(self, *, lower: bool, diagonal: int) -> None:
        super().__init__()
        self.lower = lower
        self.diagonal = diagonal

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x.tril(self.diagonal) if self.lower else x.triu(self.diagonal)

    @override
    def restrict_free(self, free: Tensor) -> Tensor:
        return self.forward(free)

    @override
    def describe(self) -> str:
        return f"Triangular({'lower' if self.lower else 'upper'}, diagonal={self.diagonal})"


class ScatterFree(ConstraintParametrization):
    """Compact layout: the stored original holds only the free entries, in row-major order.

    The forward scatters them into ``fill`` (the frozen values, or zeros), so the optimizer state
    shrinks with the free fraction and never sees a constrained entry. The 1-byte ``free`` mask
    is the persistent state; the int64 ``index`` is derived from it (again after loading).
    """

    free: Tensor
    index: Tensor
    fill: Tensor

    compact: bool = True

    def __init__(
        self, free: Tensor, shape: torch.Size, fill: Tensor | None, description: str
    ) -> None:
        super().__init__()
        self.shape = shape
        self.numel = math.prod(shape)
        self.description = description
        self.register_buffer("free", free.to(torch.uint8).contiguous())
        self.register_buffer("index", self._index(), persistent=False)
        # No fill: zeros, allocated per forward rather than stored (4 bytes per entry saved).
        self.register_buffer(
            "fill", fill if fill is not None else torch.zeros(0), persistent=fill is not None
        )

    def _index(self) -> Tensor:
        return self.free.bool().expand(self.shape).reshape(-1).nonzero().reshape(-1)

    @override
    def forward(self, compact: Tensor) -> Tensor:
        base = self.fill.reshape(-1) if self.fill.numel() else compact.new_zeros(self.numel)
        return base.scatter(0, self.index, compact).reshape(self.shape)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        if self.fill.numel():  # frozen values: the new values to hold, as FreezeEntries does
            with torch.no_grad():
                self.fill.copy_(torch.where(self.free.bool(), 0, value))
        return value.reshape(-1).index_select(0, self.index)

    @override
    def restrict_free(self, free: Tensor) -> Tensor:
        return free & self.free.bool()

    @override
    def describe(self) -> str:
        return self.description

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.index = self._index()  # the loaded mask may select other entries
