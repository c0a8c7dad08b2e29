"""Checkpoints of either layout load into either layout.

``layout="auto"`` stores a tensor compact where that pays, and dense where compact is not
possible (on the meta device, tied, stacked second): the same rules can therefore save a
tensor in one layout and meet a model that holds it in the other (a model built on the meta
device loading a checkpoint of one built on real weights, or a 0.1 checkpoint, whose default
was dense). Both hold the same information, so the checkpoint is translated, in the dict torch
loads from, before anything is checked or copied:

* dense → compact: the mask (``mask``, or ``keep`` and ``frozen_values`` of a Freeze) becomes
  ``free`` (and ``fill``), and the stored original keeps its free entries. A Triangular stores
  no mask: the model's own triangle is the one the checkpoint was saved with.
* compact → dense: the other way, with the free entries laid into zeros (a Mask, a Triangular)
  or into the frozen values (a Freeze). A Triangular's checkpoint must hold its triangle.

Anything else (other keys, shapes, a mask of another kind) is left as it is, for the checks
that refuse it.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from maskparam._torch_parametrize import (
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
)
from maskparam.constraints.base import binary_mask_problem, load_error
from maskparam.constraints.compact import CompactScatter, free_positions
from maskparam.constraints.freeze import FreezeEntries
from maskparam.constraints.mask import MaskMultiply
from maskparam.constraints.triangular import TriangularPart

__all__ = ["translate_layouts"]


def translate_layouts(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Rewrite, in place, the entries of ``state_dict`` saved in the other layout."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        here = f"{name}." if name else ""
        for tensor_name in parametrized_names(module):
            constraints = maskparam_constraints(module, tensor_name)
            stack = parametrization_list(module, tensor_name)
            if not constraints or constraints[0] is not stack[0]:
                continue  # a parametrization of the user's own comes first
            stored = stack.original
            keys = _Keys(f"{here}parametrizations.{tensor_name}.")
            first = constraints[0]
            if isinstance(first, CompactScatter):
                _dense_to_compact(first, keys, state_dict)
            elif isinstance(first, (MaskMultiply, FreezeEntries, TriangularPart)):
                _compact_to_dense(first, stored.shape, keys, state_dict)


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.original = prefix + "original"
        self.level = prefix + "0."

    def __call__(self, buffer: str) -> str:
        return self.level + buffer


def _is_tensor(value: object, shape: torch.Size | None = None) -> TypeGuard[Tensor]:
    return isinstance(value, Tensor) and (shape is None or value.shape == shape)


def _dense_to_compact(first: CompactScatter, keys: _Keys, state: dict[str, Any]) -> None:
    original = state.get(keys.original)
    if keys("free") in state or not _is_tensor(original, first.shape):
        return  # saved compact already, or not this tensor's shape: left to the checks
    frozen = bool(first.fill.numel())
    saved_as = "keep" if frozen else "mask"  # the dense layout's name for the 0/1 mask
    if (
        frozen
        and _is_tensor(state.get(keys("keep")))
        and _is_tensor(state.get(keys("frozen_values")))
    ):
        state[keys("free")] = state.pop(keys("keep"))
        state[keys("fill")] = state.pop(keys("frozen_values"))
    elif not frozen and _is_tensor(state.get(keys("mask"))):
        state[keys("free")] = state.pop(keys("mask"))
    elif not frozen and not any(key.startswith(keys.level) for key in state):
        state[keys("free")] = first.free.clone()  # a Triangular: its triangle is the model's
    else:
        return
    free = state[keys("free")]
    if free.shape != first.free.shape:
        return  # a mask of another shape: refused by the shape check
    problem = binary_mask_problem(saved_as, free, first.free)
    if problem:  # its positions would be wrong: refused here, before anything loads
        raise load_error(keys.level, type(first).__name__, [problem])
    state[keys.original] = original.reshape(-1).index_select(
        0, free_positions(free, first.shape).to(original.device)
    )


def _compact_to_dense(
    first: MaskMultiply | FreezeEntries | TriangularPart,
    shape: torch.Size,
    keys: _Keys,
    state: dict[str, Any],
) -> None:
    original, free = state.get(keys.original), state.get(keys("free"))
    if not _is_tensor(original) or not _is_tensor(free) or original.shape == shape:
        return
    fill = state.get(keys("fill"))
    if isinstance(first, FreezeEntries):
        if not _is_tensor(fill, shape) or free.shape != first.keep.shape:
            return
        base = fill
        renamed = {"keep": free, "frozen_values": fill}
    elif isinstance(first, MaskMultiply):
        if fill is not None or free.shape != first.mask.shape:
            return
        base, renamed = None, {"mask": free}
    else:
        ones = torch.ones(shape[-2:], dtype=torch.bool, device=free.device)
        if fill is not None or not torch.equal(free.ne(0).expand(shape), first(ones).expand(shape)):
            return  # another triangle: refused by the shape check, not loaded as this one
        base, renamed = None, {}
    positions = free_positions(free, shape)
    if original.dim() != 1 or original.numel() != positions.numel():
        return
    full = torch.zeros(shape, dtype=original.dtype, device=original.device)
    if base is not None:
        full.copy_(base)
    state[keys.original] = (
        full.view(-1).index_copy_(0, positions.to(full.device), original).view(shape)
    )
    for key in ("free", "fill"):
        state.pop(keys(key), None)
    for key, value in renamed.items():
        state[keys(key)] = value
