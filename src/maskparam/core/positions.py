"""Where a compact tensor's stored entries sit in the full tensor, and the two ways between them.

The compact layout stores the free entries of a tensor as one flat vector, in row-major order;
everything that reads or writes such a vector (the constraint's forward, optimizer state,
checkpoints, ``trainable_state_dict``, ``rewind``, ``update_masks``) goes through these
functions, so there is one definition of the order. The order is the logical (row-major) one
whatever the tensor's strides: a ``channels_last`` conv weight is addressed as any other, and
written in place without a ``view`` (which its strides do not allow).

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

__all__ = [
    "fill_at",
    "free_positions",
    "memory_format",
    "stored_indices",
    "to_full",
    "to_stored",
    "with_memory_format",
    "write_at",
]


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


def write_at(target: Tensor, positions: Tensor, values: Tensor) -> None:
    """Write ``values`` (one per position) in place into ``target`` at its flat row-major
    ``positions``, whatever its strides (a ``channels_last`` weight, or its optimizer state):
    ``target`` stays the same tensor, in its memory format. No autograd.

    >>> weight = torch.zeros(1, 2, 1, 2).to(memory_format=torch.channels_last)
    >>> write_at(weight, torch.tensor([1, 2]), torch.tensor([5.0, 7.0]))
    >>> weight.reshape(-1).tolist(), weight.is_contiguous(memory_format=torch.channels_last)
    ([0.0, 5.0, 7.0, 0.0], True)
    """
    at = positions.to(target.device)
    with torch.no_grad():
        if target.is_contiguous():
            target.view(-1).index_copy_(0, at, values.detach().reshape(-1).to(target.dtype))
            return
        # By multi-dimensional index: no view, no full copy; the strides stay.
        index = torch.unravel_index(at.to(torch.int64), target.shape)
        target.index_put_(index, values.detach().reshape(-1).to(target.device, target.dtype))


def fill_at(target: Tensor, positions: Tensor, value: float) -> None:
    """Set ``target`` to ``value`` in place at its flat row-major ``positions``, whatever its
    strides (as :func:`write_at`).

    >>> state = torch.ones(1, 2, 1, 2).to(memory_format=torch.channels_last)
    >>> fill_at(state, torch.tensor([0, 3]), 0.0)
    >>> state.reshape(-1).tolist()
    [0.0, 1.0, 1.0, 0.0]
    """
    at = positions.to(target.device)
    with torch.no_grad():
        if target.is_contiguous():
            target.view(-1).index_fill_(0, at, value)
            return
        index = torch.unravel_index(at.to(torch.int64), target.shape)
        filler = torch.full((at.numel(),), value, dtype=target.dtype, device=target.device)
        target.index_put_(index, filler)


def memory_format(tensor: Tensor) -> torch.memory_format:
    """The memory format ``tensor`` is laid out in: ``channels_last`` (4-D) or
    ``channels_last_3d`` (5-D) where it is that and not plainly contiguous, else
    ``contiguous_format``.

    >>> memory_format(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    torch.channels_last
    """
    if not tensor.is_contiguous():
        if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def with_memory_format(target: Tensor, fmt: torch.memory_format) -> None:
    """Lay ``target`` (a Parameter or buffer) out in ``fmt`` in place, keeping the object and
    its values (``set_``): a bake gives a ``channels_last`` weight back in ``channels_last``."""
    if fmt == torch.contiguous_format or target.is_contiguous(memory_format=fmt):
        return
    with torch.no_grad():
        target.set_(target.contiguous(memory_format=fmt))  # type: ignore[call-overload]
