"""The compact layout: the stored original holds only the free entries, in row-major order.

Any selection constraint (Mask, Freeze, Triangular) can use it with ``layout="compact"``: the
forward scatters the free entries into the fixed ones (zeros, or the frozen values), so the
optimizer state shrinks with the free fraction and never sees a constrained entry. Torch keeps
the Parameter object and shrinks it in place (``set_``), so it must be the first constraint on
its tensor, and it needs real values (not meta tensors) to know the positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor
from typing_extensions import override

from maskparam.constraints.kernels import scatter_free
from maskparam.core.constraint import (
    Constraint,
    MaskChange,
    Pins,
    Spec,
    binary_mask_problem,
    broadcasts_to,
)
from maskparam.core.optimizer import elementwise
from maskparam.core.positions import free_positions, memory_format, to_full, to_stored
from maskparam.errors import error

__all__ = [
    "AUTO_COMPACT_MAX_FREE",
    "CompactConstraint",
    "DenseLayout",
    "check_compact_possible",
    "chooses_compact",
    "compact_checkpoint_in_full",
    "fit_mask",
]


#: ``layout="auto"`` stores a tensor compact when at most this fraction of its entries is free.
#: Measured on an MLP 4 x 1024, 1 thread (benchmarks/results/train_step.md): up to it, compact
#: costs about what dense costs under SGD(momentum) and fused AdamW and avoids most of default
#: AdamW's dense cost (torch's CPU ``sqrt`` of the exact zeros that a dense layout leaves in
#: ``exp_avg_sq``: 1.30x against 1.04x at 50% free); beyond it (90% free) dense is the cheaper.
#: Memory: compact keeps an 8-byte index per free entry and saves the parameter, gradient and
#: optimizer state of every fixed entry (peak RSS in benchmarks/results/memory.md).
AUTO_COMPACT_MAX_FREE = 0.6

#: Builds the dense layout of a compact constraint from a dense checkpoint's entries (its own
#: names), the tensor's shape and the description: how a checkpoint's layout wins on load.
DenseLayout: TypeAlias = Callable[[Mapping[str, Tensor], torch.Size, str], Constraint]


def check_compact_possible(subject: str, tensor: Tensor, layout: str = "compact") -> None:
    """Refuse the compact ``layout`` (or the CSR one) where it cannot work, naming ``subject``."""
    if tensor.device.type == "meta":
        raise error(
            subject,
            f"layout={layout!r} stores the positions of the free entries, which a meta tensor "
            "does not have: it needs real tensors.",
            fix="apply after to_empty() and loading the weights, or use the dense layout.",
        )


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


class CompactConstraint(Constraint):
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
    selects_entries = True

    def __init__(
        self,
        free: Tensor,
        shape: torch.Size,
        fill: Tensor | None,
        description: str,
        *,
        mask_spec: type[Spec] | None = None,
        template: str = "",
        dense: DenseLayout | None = None,
    ) -> None:
        super().__init__()
        # The dense layout of the same constraint, for a dense checkpoint to load into.
        self.dense = dense
        # The spec whose masks update_masks gives this layout (Mask: the kept entries, Freeze:
        # the frozen ones, held in ``fill``); None for a triangle, which has no mask to update.
        self.mask_spec = mask_spec
        self.template = template  # the description for a new mask, e.g. "Mask(keeps {}, compact)"
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
        # A normal tensor even where a load or forward under torch.inference_mode() derives it:
        # an inference tensor could not be saved for the next backward.
        with torch.inference_mode(False):
            return free_positions(self.free, self.shape)

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
            # mask copied in place after the first compiled call is not seen (docs/how-it-works.md).
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
        if problem is None and self.mask_spec is None and "free" in state:
            # No mask can change these free entries (a triangle's): a checkpoint must hold them.
            loaded = state["free"].to(self.free.device).ne(0).expand(self.shape)
            if not torch.equal(loaded, self.free.bool().expand(self.shape)):
                problem = (
                    f"free: the checkpoint's free entries are not this {self.description}'s "
                    "(another triangle, or a mask's)"
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
        base = self.fill.to(compact.dtype) if self.fill.numel() else None
        return scatter_free(compact, self.positions(), base, self.shape)

    @override
    def right_inverse(self, value: Tensor) -> Tensor:
        # The full tensor's memory format (channels_last), which the stored vector cannot keep.
        self._full_format = memory_format(value)
        if self.fill.numel():  # frozen values: the new values to hold, as Freeze does
            with torch.no_grad():
                self.fill.copy_(torch.where(self.free.bool(), 0, value))
        return to_stored(value, self.positions())

    @override
    def full_memory_format(self) -> torch.memory_format:
        fmt: torch.memory_format = self.__dict__.get("_full_format", torch.contiguous_format)
        return fmt

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

    @property
    def _frozen(self) -> bool:
        """Whether the fixed entries hold frozen values (a Freeze) rather than zeros."""
        return bool(self.fill.numel())

    @override
    def take_mask(self, selected: Tensor, current: Tensor, what: str) -> MaskChange:
        before = self.free.bool().expand(self.shape)
        after = (~selected if self._frozen else selected).expand(self.shape)
        if self._frozen:  # newly frozen entries hold their current value, bit for bit
            self.fill.copy_(torch.where(after, torch.zeros((), dtype=current.dtype), current))
        self.free = fit_mask(self.free, ~selected if self._frozen else selected)
        self.positions(refresh=True)
        self.description = self.template.format(what)
        # A regrown masked entry starts from 0; an unfrozen one trains on from its frozen value.
        start = current if self._frozen else torch.where(after & ~before, 0.0, current)
        return MaskChange(before.clone(), after.clone(), start.to(current.dtype))

    @override
    def free_for_mask(self, selected: Tensor) -> Tensor:
        return ~selected if self._frozen else selected

    @override
    def mask_for_free(self, free: Tensor) -> Tensor | None:
        return None if self._frozen or self.mask_spec is None else free

    @override
    def stored_positions(self) -> Tensor:
        return self.positions()

    @override
    def checkpoint_numel(self, state: Mapping[str, Tensor], original: Tensor) -> int | None:
        free = state.get("free")
        if free is None or original.dim() != 1 or not broadcasts_to(free.shape, self.shape):
            return None
        n_free = int(free.to(torch.bool).expand(self.shape).sum())
        current = self.positions().numel()
        return n_free if original.numel() == n_free != current else None

    @override
    def from_other_layout(
        self, state: Mapping[str, Tensor], original: Tensor, shape: torch.Size
    ) -> tuple[dict[str, Tensor], Tensor] | str | None:
        # The dense layouts save the full original and their mask under their own names:
        # a Mask's ``mask``, a Freeze's ``keep`` and ``frozen_values``; a Triangular none (its
        # triangle is this model's).
        if "free" in state or original.shape != self.shape:
            return None
        if self._frozen and "keep" in state and "frozen_values" in state:
            free, translated = (
                state["keep"],
                {"free": state["keep"], "fill": state["frozen_values"]},
            )
        elif not self._frozen and "mask" in state:
            free, translated = state["mask"], {"free": state["mask"]}
        elif not self._frozen and self.mask_spec is None and not state:
            free = self.free.clone()
            translated = {"free": free}
        else:
            return None
        if not broadcasts_to(free.shape, self.shape):
            return None  # a mask of another shape: refused by the shape check
        problem = binary_mask_problem(
            "keep" if self._frozen else "mask", free, self.free, full_shape=self.shape
        )
        if problem:  # its positions would be wrong: refused before anything loads
            return problem
        return translated, to_stored(original, free_positions(free, self.shape))

    @override
    def relayout(self, free: Tensor) -> Constraint | None:
        # Only a Mask's zeros: a compact Freeze's frozen values would need a state to carry.
        if not self.auto_layout or self.fill.numel() or self.dense is None:
            return None
        if chooses_compact("auto", free, self.shape):
            return None
        dense = self.in_other_layout({"free": free}, self.shape)
        if dense is not None:
            dense.auto_layout = True
        return dense

    @override
    def in_other_layout(self, state: Mapping[str, Tensor], shape: torch.Size) -> Constraint | None:
        if self.dense is None:
            return None
        return self.dense(state, shape, self.description.removesuffix(", compact)") + ")")

    @override
    def refresh(self) -> None:
        self.positions(refresh=True)

    @override
    def optimizer_problem(self, optimizer: torch.optim.Optimizer) -> tuple[str, str] | None:
        # Adafactor factors a matrix's second moment: on the vector it would run unfactored;
        # Muon orthogonalizes a matrix's update and refuses a vector at its step. (LBFGS is flat
        # over all parameters anyway.)
        muon = getattr(torch.optim, "Muon", None)
        matrix_wise = not elementwise(optimizer) or (
            isinstance(muon, type) and isinstance(optimizer, muon)
        )
        if matrix_wise and not isinstance(optimizer, torch.optim.LBFGS):
            problem = (
                f"{type(optimizer).__name__} treats a matrix as a matrix, but the compact layout "
                "stores this tensor as the vector of its free entries: it would run another "
                "algorithm on it."
            )
            fix = (
                "pass layout='dense' to this tensor's spec, or train it with an elementwise "
                "optimizer (SGD, Adam, AdamW)."
            )
            return problem, fix
        return None

    @override
    def on_registered(self, original: Tensor) -> None:
        # A gradient accumulated before apply_mask (zero_grad(set_to_none=False), or
        # accumulation across it) keeps its free entries, as the dense layout would.
        grad = original.grad
        if grad is not None and grad.shape == self.shape:
            original.grad = to_stored(grad, self.positions())


def fit_mask(buffer: Tensor, selected: Tensor) -> Tensor:
    """``selected`` as a uint8 0/1 mask: written into ``buffer`` where it fits its shape (the
    buffer stays the same object: DDP and a deep copy's references keep working), else new."""
    new = selected.to(device=buffer.device, dtype=torch.uint8)
    try:
        expanded = new.expand(buffer.shape)
    except RuntimeError:
        return new.contiguous()
    buffer.copy_(expanded)
    return buffer


def compact_checkpoint_in_full(
    free: Tensor, original: Tensor, shape: torch.Size, base: Tensor | None = None
) -> Tensor | None:
    """A compact checkpoint's original (its free entries, where ``free`` says) laid out in
    ``shape``, ``base`` (frozen values) or zeros elsewhere; None where it is not one."""
    positions = free_positions(free, shape)
    if original.dim() != 1 or original.numel() != positions.numel() or original.shape == shape:
        return None
    return to_full(original, positions, shape, base)
