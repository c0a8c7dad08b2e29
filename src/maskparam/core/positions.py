"""Where a compact tensor's stored entries sit in the full tensor, and the two ways between them.

The compact layout stores the free entries of a tensor as one flat vector, in row-major order;
everything that reads or writes such a vector (the constraint's forward, optimizer state,
checkpoints, ``trainable_state_dict``, ``rewind``, ``update_masks``) goes through these three
functions, so there is one definition of the order.

>>> free = torch.tensor([[True, False], [False, True]])
>>> positions = free_positions(free, free.shape)
>>> positions.tolist()
[0, 3]
>>> full = to_full(torch.tensor([1.0, 2.0]), positions, free.shape)
>>> full.tolist(), to_stored(full, positions).tolist()
([[1.0, 0.0], [0.0, 2.0]], [1.0, 2.0])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["free_positions", "stored_indices", "to_full", "to_stored"]


def free_positions(free: Tensor, shape: torch.Size) -> Tensor:
    """The flat positions (int64) of the nonzero entries of ``free``, broadcast to ``shape``, in
    order: where the compact layout's stored entries sit in the full tensor.

    >>> free_positions(torch.tensor([[1], [0]], dtype=torch.uint8), torch.Size([2, 3])).tolist()
    [0, 1, 2]
    """
    return free.ne(0).expand(shape).reshape(-1).nonzero().reshape(-1)


def to_full(
    values: Tensor, positions: Tensor, shape: torch.Size, base: Tensor | None = None
) -> Tensor:
    """``values`` (one per position) laid out in a new tensor of ``shape``: ``base`` (copied) or
    zeros elsewhere. No autograd (see ``constraints/kernels.py`` for the differentiable one)."""
    if base is None:
        full = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    else:
        full = base.detach().to(dtype=values.dtype, device=values.device).reshape(-1).clone()
    full.index_copy_(0, positions.to(values.device), values.detach().reshape(-1))
    return full.reshape(shape)


def to_stored(full: Tensor, positions: Tensor) -> Tensor:
    """The entries of ``full`` at ``positions``, as the compact layout stores them (a new tensor)."""
    return full.detach().reshape(-1).index_select(0, positions.to(full.device))


def stored_indices(entries: Tensor, positions: Tensor | None) -> Tensor:
    """Where the ``entries`` of the full tensor (bool, its shape) sit in the stored original,
    flat: among the stored ``positions`` of a compact layout (entries it does not store are
    left out), or the flat positions themselves where the original is stored in full (None).

    >>> entries = torch.tensor([False, True, True, False])
    >>> stored_indices(entries, torch.tensor([1, 3])).tolist(), stored_indices(entries, None).tolist()
    ([0], [1, 2])
    """
    flat = entries.reshape(-1)
    if positions is not None:
        flat = flat.index_select(0, positions.to(flat.device))
    return flat.nonzero().reshape(-1)
