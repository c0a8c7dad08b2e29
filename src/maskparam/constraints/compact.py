"""The compact layout: the stored original holds only the free entries, in row-major order.

Any selection constraint (Mask, Freeze, Triangular) can use it with ``layout="compact"``: the
forward scatters the free entries into the fixed ones (zeros, or the frozen values), so the
optimizer state shrinks with the free fraction and never sees a constrained entry. Torch keeps
the Parameter object and shrinks it in place (``set_``), so it must be the first constraint on
its tensor, and it needs real values (not meta tensors) to know the positions.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam import _optimizer_guard
from maskparam.constraints.base import Constraint, Pins, binary_mask_problem
from maskparam.constraints.kernels import scatter_free
from maskparam.errors import error

__all__ = [
    "AUTO_COMPACT_MAX_FREE",
    "CompactScatter",
    "check_compact_possible",
    "chooses_compact",
    "free_positions",
]

#: ``layout="auto"`` stores a tensor compact when at most this fraction of its entries is free.
#: Measured on an MLP 4 x 1024, 1 thread (benchmarks/results/train_step.md): up to it, compact
#: costs about what dense costs under SGD(momentum) and fused AdamW and avoids most of default
#: AdamW's dense cost (torch's CPU ``sqrt`` of the exact zeros that a dense layout leaves in
#: ``exp_avg_sq``: 1.30x against 1.04x at 50% free); beyond it (90% free) dense is the cheaper.
#: Memory: compact keeps an 8-byte index per free entry and saves the parameter, gradient and
#: optimizer state of every fixed entry (peak RSS in benchmarks/results/memory.md).
AUTO_COMPACT_MAX_FREE = 0.6


def check_compact_possible(subject: str, tensor: Tensor) -> None:
    """Refuse the compact layout where it cannot work, naming ``subject``."""
    if tensor.device.type == "meta":
        raise error(
            subject,
            "layout='compact' stores the positions of the free entries, which a meta tensor "
            "does not have: it needs real tensors.",
            fix="apply after to_empty() and loading the weights, or use the dense layout.",
        )


def free_positions(free: Tensor, shape: torch.Size) -> Tensor:
    """The flat positions (int64) of the nonzero entries of ``free``, broadcast to ``shape``: where
    the compact layout's stored entries sit in the full tensor, in order.

    >>> free_positions(torch.tensor([[1], [0]], dtype=torch.uint8), torch.Size([2, 3])).tolist()
    [0, 1, 2]
    """
    return free.ne(0).expand(shape).reshape(-1).nonzero().reshape(-1)


def chooses_compact(layout: str, free: Tensor, shape: torch.Size) -> bool:
    """Whether a spec of ``layout`` stores a tensor of ``shape`` compact, given its ``free`` mask
    (broadcastable to ``shape``).

    ``"auto"`` reaches a spec's build only where compact is possible (the first constraint on a
    trainable, untied Parameter holding real values); the planner turns it into ``"dense"``
    elsewhere.

    >>> free = torch.tensor([[True, False], [False, False]])
    >>> chooses_compact("auto", free, free.shape), chooses_compact("auto", ~free, free.shape)
    (True, False)
    """
    if layout != "auto":
        return layout == "compact"
    if free.is_meta:  # no positions to store (the planner already chose dense for meta tensors)
        return False
    numel = math.prod(shape)
    n_free = int(free.to(torch.bool).expand(shape).sum()) if numel else 0
    return numel > 0 and n_free <= AUTO_COMPACT_MAX_FREE * numel


class CompactScatter(Constraint):
    """``fill`` (or zeros) with the free entries, at ``index``, from the original: the original is
    the vector of free entries.

    The 1-byte ``free`` mask is the persistent state; the int64 ``index`` is derived from it
    (again after loading). ``fill`` holds the frozen values (``captured``), or is empty for
    zeros, allocated per forward rather than stored (4 bytes per entry saved).
    """

    free: Tensor
    index: Tensor
    fill: Tensor

    reshapes_original: ClassVar[bool] = True
    mask_buffer = "free"

    def __init__(
        self,
        free: Tensor,
        shape: torch.Size,
        fill: Tensor | None,
        description: str,
        *,
        selects: str | None = None,
    ) -> None:
        super().__init__()
        # What the spec's mask selects ("mask": the kept entries, "freeze": the frozen ones),
        # for update_masks; None where there is no mask to update (a triangle).
        self.selects = selects
        self.shape = shape
        self.numel = math.prod(shape)
        self.description = description
        self.register_buffer("free", free.to(torch.uint8).contiguous())
        self.set_fixed("index", self._index())  # derived from `free`: recomputed, never stored
        self._indexed = self._free_key()
        self.register_buffer(
            "fill", fill if fill is not None else torch.zeros(0), persistent=fill is not None
        )

    def _index(self) -> Tensor:
        return free_positions(self.free, self.shape)

    def watch(self, stored: Tensor, name: str) -> None:
        """Have the optimizer guard lay out ``stored``'s optimizer state by this constraint's
        positions, read through a weak proxy (a load may move them; a baked constraint is gone)."""
        proxy = weakref.proxy(self)
        _optimizer_guard.watch_reshaped(
            stored,
            name,
            self.shape,
            lambda: proxy.positions(),  # noqa: PLW0108 - weak, not bound
        )

    def _free_key(self) -> tuple[int, int]:
        return id(self.free), self.free._version

    def positions(self, *, refresh: bool = False) -> Tensor:
        """The flat positions of the free entries in the full tensor (``index``), derived again
        wherever ``free`` changed in place since: DDP broadcasts rank 0's buffers into every
        rank by copying, with no hook to tell, and a stale index would scatter the free entries
        to another mask's positions. ``refresh``: derive them again anyway (a collective such as
        ``dist.broadcast`` writes without counting a version)."""
        if torch.compiler.is_compiling():
            # Traced as it is (a fresh nonzero() would break the graph): under torch.compile a
            # mask copied in place after the first compiled call is not seen (README, Compact).
            return self.index
        key = self._free_key()
        if refresh or key != self._indexed:
            self.index = self._index()
            self._indexed = key
        return self.index

    @override
    def regenerate(self, name: str, device: torch.device) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=device)  # until `free` is loaded

    @override
    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        problem = (
            binary_mask_problem("free", state["free"], self.free, full_shape=self.shape)
            if "free" in state
            else None
        )
        return [*super().check_state(state), *([problem] if problem else [])]

    @override
    def check_original(self, original: Tensor, state: Mapping[str, Tensor]) -> str | None:
        free = state.get("free", self.free)
        n_free = int(free.to(torch.bool).expand(self.shape).sum())
        if "free" not in state and original.numel() != self.positions().numel():
            # Without its mask, the checkpoint's entries cannot be placed.
            return (
                f"the checkpoint stores {original.numel()} free entries, this model "
                f"{self.positions().numel()}, and it holds no mask to say where they go"
            )
        if original.numel() != n_free:
            return (
                f"the checkpoint stores {original.numel()} free entries, its mask selects {n_free}"
            )
        return None

    @override
    def forward(self, compact: Tensor) -> Tensor:
        # A compact Parameter maskparam did not shrink itself (a deep copy, a load with
        # assign=True) is watched from its first forward: its optimizer state must follow its
        # layout too. One dict lookup per call once watched.
        if (
            isinstance(compact, nn.Parameter)
            and not torch.compiler.is_compiling()
            and not _optimizer_guard.is_watched(compact)
        ):
            self.watch(compact, self.description)
        base = self.fill.to(compact.dtype) if self.fill.numel() else None
        return scatter_free(compact, self.positions(), base, self.shape)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        if self.fill.numel():  # frozen values: the new values to hold, as Freeze does
            with torch.no_grad():
                self.fill.copy_(torch.where(self.free.bool(), 0, value))
        return value.reshape(-1).index_select(0, self.positions())

    @override
    def mask_shape(self) -> torch.Size:
        return self.shape

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
        self.positions()  # the loaded mask may select other entries
