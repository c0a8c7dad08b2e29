"""Writes at flat (row-major) positions into a tensor of any memory format, in place.

``tensor.view(-1)`` exists only for a contiguous tensor: a channels_last convolution weight (and
its optimizer state, which ``torch.zeros_like`` lays out the same way) has none. These address
the entries by their multi-dimensional index instead, so the tensor keeps its object, its
strides and its memory format.

>>> import torch
>>> weight = torch.zeros(1, 2, 2, 2).to(memory_format=torch.channels_last)
>>> write_at(weight, torch.tensor([1, 6]), torch.tensor([5.0, 7.0]))
>>> weight.reshape(-1).tolist(), weight.is_contiguous(memory_format=torch.channels_last)
([0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0], True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fill_at", "write_at"]


def _index(tensor: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
    return torch.unravel_index(positions.to(tensor.device, torch.int64), tensor.shape)


def write_at(tensor: Tensor, positions: Tensor, values: Tensor) -> None:
    """``tensor``'s entries at the flat ``positions`` take ``values`` (one per position)."""
    if not positions.numel():
        return
    values = values.to(tensor.device, tensor.dtype)
    if tensor.is_contiguous():
        tensor.view(-1).index_copy_(0, positions.to(tensor.device), values)
    else:
        tensor.index_put_(_index(tensor, positions), values)


def fill_at(tensor: Tensor, positions: Tensor, value: float) -> None:
    """``tensor``'s entries at the flat ``positions`` take ``value``."""
    if not positions.numel():
        return
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, positions.to(tensor.device), value)
    else:
        filler = torch.full((positions.numel(),), value, dtype=tensor.dtype, device=tensor.device)
        tensor.index_put_(_index(tensor, positions), filler)
