"""The compact layout: the stored original holds only the free entries, in row-major order.

Any selection constraint (Mask, Freeze, Triangular) can use it with ``layout="compact"``: the
forward scatters the free entries into the fixed ones (zeros, or the frozen values), so the
optimizer state shrinks with the free fraction and never sees a constrained entry. Torch keeps
the Parameter object and shrinks it in place (``set_``), so it must be the first constraint on
its tensor, and it needs real values (not meta tensors) to know the positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from maskparam.constraints.base import Constraint, Pins, binary_mask_problem
from maskparam.constraints.kernels import scatter_free
from maskparam.errors import error

__all__ = ["CompactScatter", "check_compact_possible"]


def check_compact_possible(subject: str, tensor: Tensor) -> None:
    """Refuse the compact layout where it cannot work, naming ``subject``."""
    if tensor.device.type == "meta":
        raise error(
            subject,
            "layout='compact' stores the positions of the free entries, which a meta tensor "
            "does not have: it needs real tensors.",
            fix="apply after to_empty() and loading the weights, or use the dense layout.",
        )


class CompactScatter(Constraint):
    """``fill.scatter(index, original)``: the original is the vector of free entries.

    The 1-byte ``free`` mask is the persistent state; the int64 ``index`` is derived from it
    (again after loading). ``fill`` holds the frozen values (``captured``), or is empty for
    zeros, allocated per forward rather than stored (4 bytes per entry saved).
    """

    free: Tensor
    index: Tensor
    fill: Tensor

    reshapes_original: ClassVar[bool] = True

    def __init__(
        self, free: Tensor, shape: torch.Size, fill: Tensor | None, description: str
    ) -> None:
        super().__init__()
        self.shape = shape
        self.numel = math.prod(shape)
        self.description = description
        self.register_buffer("free", free.to(torch.uint8).contiguous())
        self.set_fixed("index", self._index())  # derived from `free`: recomputed, never stored
        self.register_buffer(
            "fill", fill if fill is not None else torch.zeros(0), persistent=fill is not None
        )

    def _index(self) -> Tensor:
        return self.free.bool().expand(self.shape).reshape(-1).nonzero().reshape(-1)

    @override
    def regenerate(self, name: str, device: torch.device) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=device)  # until `free` is loaded

    @override
    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        problem = binary_mask_problem("free", state["free"], self.free) if "free" in state else None
        return [*super().check_state(state), *([problem] if problem else [])]

    @override
    def check_original(self, original: Tensor, state: Mapping[str, Tensor]) -> str | None:
        free = state.get("free", self.free)
        n_free = int(free.to(torch.bool).expand(self.shape).sum())
        if original.numel() != self.index.numel():
            # load_state_dict cannot resize the stored Parameter: the mask must not load either.
            return (
                f"the checkpoint stores {original.numel()} free entries, this model "
                f"{self.index.numel()}: a mask of another density (apply the same rules first)"
            )
        if original.numel() != n_free:
            return (
                f"the checkpoint stores {original.numel()} free entries, its mask selects {n_free}"
            )
        return None

    @override
    def forward(self, compact: Tensor) -> Tensor:
        base = self.fill if self.fill.numel() else compact.new_zeros(self.shape)
        return scatter_free(compact, self.index, base.to(compact.dtype))

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        if self.fill.numel():  # frozen values: the new values to hold, as Freeze does
            with torch.no_grad():
                self.fill.copy_(torch.where(self.free.bool(), 0, value))
        return value.reshape(-1).index_select(0, self.index)

    @override
    def pins(self, value: Tensor) -> Pins:
        fixed = ~self.free.bool().expand(self.shape)
        if self.fill.numel():
            return Pins(fixed, self.fill, captured=True)
        return Pins(fixed, torch.zeros((), dtype=value.dtype).expand(self.shape))

    @override
    def describe(self) -> str:
        return self.description

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.index = self._index()  # the loaded mask may select other entries
