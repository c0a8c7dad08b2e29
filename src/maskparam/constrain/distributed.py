"""Distributed training: DDP's constant buffers, one mask for every rank, and what refuses.

``DistributedDataParallel(broadcast_buffers=True)`` (the default) broadcasts every buffer from
rank 0 before each forward, so that BatchNorm statistics agree. maskparam's masks and frozen values (and
a subspace basis of your own) are buffers too, but they never change: re-sending them each step costs as
much bandwidth as the masked weights themselves (1 byte per entry for a mask, 4-5 for frozen
values). :func:`exclude_constants_from_ddp` broadcasts them once, then tells DDP to skip them.

The rest is what the mask-changing functions call where a process group is initialized or the
model is wrapped or sharded: :func:`take_rank0_masks` (every rank takes rank 0's new masks),
:func:`refuse_ddp_resize` (a compact tensor resized under DDP), :func:`refuse_ddp_wrapper` and
:func:`refuse_sharded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskparam.core.constraint import Constraint
from maskparam.core.tensors import TensorRef
from maskparam.errors import check_module, error

__all__ = [
    "PlannedMask",
    "constant_buffer_names",
    "exclude_constants_from_ddp",
    "process_group_initialized",
    "refuse_ddp_resize",
    "refuse_ddp_wrapper",
    "refuse_sharded",
    "take_rank0_masks",
]


def constant_buffer_names(model: nn.Module) -> list[str]:
    """Qualified names of the buffers of maskparam's constraints in ``model``."""
    return [
        f"{module_name}.{buffer_name}".lstrip(".")
        for module_name, module in model.named_modules()
        if isinstance(module, Constraint)
        for buffer_name, _ in module.named_buffers()
    ]


def exclude_constants_from_ddp(model: nn.Module) -> list[str]:
    """Call after ``apply_mask`` and before wrapping ``model`` in ``DistributedDataParallel``.

    When a process group is initialized, the constant buffers are broadcast from rank 0 once, so
    every rank holds rank 0's masks even if they were computed from different weights; then
    DDP is told to ignore them, so that it does not send them again before every forward. Other
    buffers (BatchNorm statistics) are still broadcast as usual. Returns the ignored names.
    Later mask changes (:func:`~maskparam.update_masks`, :class:`~maskparam.GradualPruning`)
    broadcast rank 0's new masks themselves.
    """
    check_module(model, "exclude_constants_from_ddp")
    refuse_ddp_wrapper(model, "exclude_constants_from_ddp")
    names = constant_buffer_names(model)
    if process_group_initialized():
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for name in names:
            if not buffers[name].is_sparse:  # sparse bases regenerate from their seed anyway
                dist.broadcast(buffers[name], src=0)
        for module in model.modules():
            if isinstance(module, Constraint):  # e.g. positions derived from rank 0's masks
                module.refresh()
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    # DDP's documented-by-code hook for excluding parameters and buffers by name.
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))  # type: ignore[no-untyped-call]
    return names


def process_group_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process: then a mask
    change is a collective (every rank must make it, in the same order)."""
    return dist.is_available() and dist.is_initialized()


class PlannedSelection(Protocol):
    """A planned new mask of a tensor (``prune/update.py``'s MaskUpdate and NewMask)."""

    ref: TensorRef

    @property
    def selected(self) -> Tensor | None: ...  # the new mask

    def select(self, selected: Tensor) -> None: ...  # plan another mask instead


class PlannedMask(Protocol):
    """A planned mask change, as ``update_masks`` plans it (``prune/update.py``'s MaskUpdate)."""

    ref: TensorRef
    constraint: Constraint

    @property
    def selected(self) -> Tensor | None: ...  # the new mask

    @property
    def free_after(self) -> Tensor | None: ...  # the entries it leaves free, the tensor's shape

    def select(self, selected: Tensor) -> None: ...  # plan another mask instead


def take_rank0_masks(planned: Sequence[PlannedSelection], caller: str) -> None:
    """Where a process group is initialized, plan rank 0's version of every new mask on every
    rank, in one broadcast (nothing changes yet).

    Masks computed on every rank from its own data or weights (Wanda, magnitude before DDP's
    first broadcast) differ by rank; DDP copies only rank 0's buffers (and, with
    :func:`exclude_constants_from_ddp`, none), never the entries that change side, and a compiled
    graph keeps the positions it traced. So every rank takes rank 0's masks before anything
    changes. Every rank must plan masks of the same shapes; that is checked first (one small
    all_gather), and a difference is refused on every rank alike.
    """
    if not planned or not process_group_initialized():
        return
    masks = []
    for change in planned:
        if change.selected is None:
            raise AssertionError(f"take_rank0_masks: no mask planned for {change.ref.name!r}")
        masks.append(change.selected)
    for change, mask in zip(planned, _rank0(masks, caller), strict=True):
        change.select(mask)


def _rank0(masks: list[Tensor], caller: str) -> list[Tensor]:
    """Rank 0's ``masks`` (bool, the shapes given), checked to be planned alike on every rank."""
    device = masks[0].device
    flat = torch.cat([mask.reshape(-1).to(torch.uint8) for mask in masks])
    # What each rank planned: how many masks, their entries, and (position-weighted) their
    # sizes and dimensions, so that masks of other shapes cannot pass for the same plan.
    plan = [
        len(masks),
        flat.numel(),
        sum((i + 1) * mask.numel() for i, mask in enumerate(masks)),
        sum((i + 1) * mask.dim() for i, mask in enumerate(masks)),
    ]
    mine = torch.tensor(plan, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(other, gathered[0]) for other in gathered):
        raise error(
            caller,
            "the ranks of the process group planned different mask changes.",
            *(
                f"rank {r}: {int(g[0])} tensor(s), {int(g[1])} mask entries"
                for r, g in enumerate(gathered)
            ),
            fix="call it on every rank with the same model and rules (a mask change is a "
            "collective while a process group is initialized).",
        )
    dist.broadcast(flat, src=0)
    shared, offset = [], 0
    for mask in masks:
        shared.append(flat[offset : offset + mask.numel()].view(mask.shape).bool())
        offset += mask.numel()
    return shared


def refuse_distributed_apply(
    planned: Sequence[PlannedSelection], caller: str, *, rewrap_ddp: bool
) -> None:
    """Refuse, while a process group is initialized, masking tensors that had none
    (``update_masks(apply_missing=True)``) unless ``rewrap_ddp``: ``apply_mask`` may store them
    compact, which resizes their Parameters under a ``DistributedDataParallel`` built before."""
    if not planned or rewrap_ddp or not process_group_initialized():
        return
    raise error(
        f"{caller} ({planned[0].ref.name!r})",
        "apply_missing would apply a Mask to this tensor while a torch.distributed process group "
        "is initialized: a compact layout resizes its Parameter, and a DistributedDataParallel "
        "built before would stop averaging its gradient.",
        fix="apply_mask before wrapping the model in DistributedDataParallel; or wrap it again "
        "after this call and say so: update_masks(..., apply_missing=True, rewrap_ddp=True).",
    )


def refuse_ddp_resize(planned: Sequence[PlannedMask], caller: str, *, rewrap_ddp: bool) -> None:
    """Refuse, while a process group is initialized, a mask change that resizes the stored
    Parameter of a compact tensor (another number of free entries), unless ``rewrap_ddp``.

    A resize calls ``set_`` on the Parameter, which gives it a new gradient accumulator: a
    ``DistributedDataParallel`` built before keeps its hooks on the old one, so the next backward
    is not averaged across ranks (the weights diverge without a word) and DDP then fails with
    "Expected to have finished reduction"; its buckets have the old size too. (A change that keeps
    the number writes the Parameter in place, and DDP goes on.) A new DDP wrapper after the change
    works; maskparam cannot see whether one wraps the model, so the caller says so.
    """
    if rewrap_ddp or not process_group_initialized():
        return
    names = [
        change.ref.name
        for change in planned
        if change.constraint.stored_positions() is not None  # compact: stores the free entries
        and change.free_after is not None
        and int(change.free_after.sum()) != change.ref.storage.numel()
    ]
    if not names:
        return
    raise error(
        repr(names[0]),
        "the new mask changes how many entries this compact tensor stores while a "
        "torch.distributed process group is initialized: its Parameter is resized, and a "
        "DistributedDataParallel built before would stop averaging its gradient across ranks "
        "(the weights diverge silently, then DDP fails with 'Expected to have finished "
        "reduction').",
        *([f"compact tensors resized: {', '.join(map(repr, names))}"] if len(names) > 1 else []),
        fix="under DDP, apply the masks with layout='dense' (a mask change then keeps every "
        "Parameter as it is); or wrap the model in a new DistributedDataParallel after every mask "
        f"change (ddp = DistributedDataParallel(model)) and say so: {caller}(..., "
        "rewrap_ddp=True).",
    )


#: What must run before ``DistributedDataParallel(model)``, not through the wrapper.
BEFORE_WRAPPING = {"apply_mask": ", rules", "exclude_constants_from_ddp": ""}


def refuse_ddp_wrapper(model: nn.Module, caller: str) -> None:
    """Refuse a model that is, or holds, a ``DistributedDataParallel`` wrapper: a change through
    it changes the Parameters DDP registered, and its names carry DDP's ``module.`` prefix."""
    ddp = nn.parallel.DistributedDataParallel
    for name, module in model.named_modules():
        if isinstance(module, ddp):
            where = f"model.{name}" if name else "the model"
            inner = f"model.{name}.module" if name else "ddp.module"
            raise error(
                caller,
                f"{where} is a DistributedDataParallel wrapper; maskparam works on the model "
                "inside it.",
                fix=(
                    f"call it before wrapping: mp.{caller}(model{BEFORE_WRAPPING[caller]}), then "
                    "ddp = DistributedDataParallel(model)."
                    if caller in BEFORE_WRAPPING
                    else f"pass the model inside it: {caller}({inner}, ...)."
                ),
            )


#: How to get what a sharded model cannot give (the fix of :func:`refuse_sharded`).
FULL_STATE_DICT = (
    "full = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
    "options=StateDictOptions(full_state_dict=True))"
)


def refuse_sharded(model: nn.Module, caller: str) -> None:
    """Refuse, before anything changes, a model whose constrained tensors FSDP2's
    ``fully_shard`` (or tensor parallelism) sharded into DTensors: ``caller`` computes with the
    whole tensors, which no rank holds."""
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - built only with distributed

    for holder_name, holder in model.named_modules():
        stacks = getattr(holder, "parametrizations", None)
        if not isinstance(stacks, nn.ModuleDict):
            continue
        for tensor_name, stack in stacks.items():
            sharded = any(isinstance(t, DTensor) for t in stack.parameters(recurse=False))
            if not sharded or not any(isinstance(p, Constraint) for p in stack.modules()):
                continue
            name = f"{holder_name}.{tensor_name}".lstrip(".")
            changes = caller in ("update_masks", "GradualPruning")
            raise error(
                caller,
                f"{name!r} is sharded (a DTensor: fully_shard ran after apply_mask), and "
                f"{caller} needs the whole tensors, which no rank holds.",
                fix=f"on every rank, {FULL_STATE_DICT}; then build the model again unsharded, "
                "apply_mask the same rules (and the same GradualPruning, if any), "
                "mp.load_state_dict(unsharded, full) and call "
                f"{caller} on it"
                + (
                    " (then fully_shard it and create the optimizer again); or change the "
                    "masks before fully_shard."
                    if changes
                    else "."
                ),
            )
