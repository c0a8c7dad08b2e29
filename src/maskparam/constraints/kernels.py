"""Exact selection kernels shared by Mask, Freeze and LearnableMask: bitwise, not arithmetic.

A multiply by a 0/1 mask is not exact where it matters most: ``inf * 0`` and ``nan * 0`` are NaN
(an fp16 Adam step turns a masked entry's stored original into 0/0 = NaN), and ``v + x * 0``
turns a frozen ``-0.0`` into ``+0.0``. Selecting bits instead is exact whatever the stored
original holds: ``bits(x) & 0`` is ``+0.0`` and ``(bits(x) & 0) | bits(v)`` is ``v``, sign and
NaN payload included. Measured here (benchmarks/results/kernels.md, 1 thread, 1M entries, forward
and backward): 1.04 ms against 0.76 ms for a plain multiply (which is not exact); torch's ``where`` costs about 8 ms.

Masks are stored as uint8 0/1 (the state_dict format; EMA and SWA leave 0/1 exact) and widened
per call to ``0`` / ``-1`` (all bits set) of the tensor's width.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from maskparam.errors import error

__all__ = ["keep_bits", "keep_or_frozen", "scatter_free", "straight_through_mask"]

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_view(x: Tensor) -> torch.dtype | None:
    """The integer dtype of ``x``'s width, or None where no bitwise view exists."""
    if not (x.is_floating_point() or x.is_complex()):
        return None
    return _BITS.get(x.element_size())


def _and(x: Tensor, ones: Tensor) -> Tensor:
    """``x`` where ``ones`` is -1 (all bits), ``+0`` where it is 0; ``ones`` broadcasts."""
    view = _bit_view(x)
    if view is None:  # complex128 and friends: where() is exact too, only slower
        return torch.where(ones != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (x.contiguous().view(view) & ones).view(x.dtype)


def _ones(mask: Tensor, like: Tensor) -> Tensor:
    """The uint8 0/1 mask as 0 / -1 (all bits set) of ``like``'s width, once per forward.

    Widened here, not inside each AND: an AND of int32 with int8 promotes in both passes (about
    3x the cost, measured). Autograd saves it for the backward, as a multiply saves its float mask.
    """
    # Negated as int8 (1 byte per entry), then sign-extended in one pass: 0.64 ms against 1.03 ms
    # for widening first and negating the wide tensor (4M entries to int32, 1 thread).
    view = _bit_view(like)
    negated = mask.view(torch.int8).neg()
    return negated if view is None else negated.to(view)


class _KeepBits(torch.autograd.Function):
    """``x`` at kept entries, exactly ``+0.0`` elsewhere; the gradient likewise."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, ones: Tensor) -> Tensor:
        return _and(x, ones)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], _output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (ones,) = ctx.saved_tensors
        return _and(grad, ones), None


class _KeepOrFrozen(torch.autograd.Function):
    """``x`` at kept entries, the frozen value bit for bit elsewhere; gradient only where kept."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, ones: Tensor, frozen: Tensor) -> Tensor:
        view = _bit_view(x)
        if view is None:
            return torch.where(ones != 0, x, frozen)
        # frozen holds +0.0 (no bits) at kept entries, so OR-ing it in changes nothing there.
        kept = x.contiguous().view(view) & ones
        return kept.bitwise_or_(frozen.contiguous().view(view)).view(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], _output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (ones,) = ctx.saved_tensors
        return _and(grad, ones), None, None


class _StraightThrough(torch.autograd.Function):
    """A hard mask ``scores > 0`` whose scores learn straight through: d/ds = upstream * x.

    The value is :func:`keep_bits` of ``x``, exact whatever the scores hold (a NaN score drops
    its entry); non-finite entries of ``x`` give the scores a zero gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, scores: Tensor) -> Tensor:
        return _and(x, _ones((scores > 0).view(torch.uint8), x))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], _output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, scores = ctx.saved_tensors
        grad_x = _and(grad, _ones((scores > 0).view(torch.uint8), grad))
        finite_x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return grad_x, (grad * finite_x).to(scores.dtype)


def straight_through_mask(x: Tensor, scores: Tensor) -> Tensor:
    """``x`` where ``scores > 0``, exactly ``+0.0`` elsewhere; the scores get ``upstream * x``.

    >>> x = torch.tensor([2.0, 3.0], requires_grad=True)
    >>> s = torch.tensor([1.0, -1.0], requires_grad=True)
    >>> straight_through_mask(x, s).sum().backward()
    >>> x.grad.tolist(), s.grad.tolist()
    ([1.0, 0.0], [2.0, 3.0])
    """
    return _StraightThrough.apply(x, scores)  # type: ignore[no-untyped-call,no-any-return]


def keep_bits(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where the uint8 ``mask`` is 1, exactly ``+0.0`` where it is 0 (NaN and inf too).

    >>> keep_bits(torch.tensor([float("nan"), -2.0, float("inf")]), torch.tensor([0, 1, 0], dtype=torch.uint8))
    tensor([ 0., -2.,  0.])
    """
    return _KeepBits.apply(x, _ones(mask, x))  # type: ignore[no-untyped-call,no-any-return]


def keep_or_frozen(x: Tensor, keep: Tensor, frozen: Tensor) -> Tensor:
    """``x`` where the uint8 ``keep`` is 1, ``frozen`` bit for bit where it is 0.

    ``frozen`` must hold ``+0.0`` at kept entries.

    >>> x = torch.tensor([1.0, float("nan"), 3.0])
    >>> keep_or_frozen(x, torch.tensor([1, 0, 0], dtype=torch.uint8), torch.tensor([0.0, -0.0, 7.0]))
    tensor([1., -0., 7.])
    """
    return _KeepOrFrozen.apply(x, _ones(keep, x), frozen.to(x.dtype))  # type: ignore[no-untyped-call,no-any-return]


class _ScatterFree(torch.autograd.Function):
    """The compact layout's forward: ``base`` (zeros or frozen values) with the free entries,
    listed by ``index``, replaced by ``compact``; the gradient is the free entries' gradient.

    ``scatter_`` into a fresh copy and ``index_select`` back, the fastest pair measured here (1
    thread): ``scatter_`` at 0.4-0.65x the time of ``index_copy_`` for 36K-4M entries at 50-90%
    free (about even at 10% free), ``index_select`` at 0.3x ``gather``'s. Exact: the scatter runs
    on the integer view of the same width, a copy of bits (the base keeps every fixed entry bit
    for bit, NaN payloads included).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(compact: Tensor, index: Tensor, base: Tensor | None, shape: torch.Size) -> Tensor:
        if compact.shape != index.shape:
            # scatter_ would take the first entries of a longer vector without a word.
            raise error(
                "compact layout",
                f"the stored entries are {tuple(compact.shape)}, the mask frees "
                f"{index.numel()}: they do not fit.",
                fix="give the mask and its stored entries together (load_state_dict of both, "
                "or mp.update_masks).",
            )
        # Zeros are allocated zeroed, not built and then cloned: one pass over the tensor.
        out = compact.new_zeros(math.prod(shape)) if base is None else base.reshape(-1).clone()
        bits = _bit_view(compact)
        if bits is None or torch._C._get_tracing_state() is not None:
            # complex128, or torch.jit.trace (which cannot record a view as another dtype):
            # index_copy_ copies exactly too, only slower.
            return out.index_copy_(0, index, compact).view(shape)
        # On the integer view: scatter_ of fp16/bf16 goes through float and rewrites NaN bits
        # (a signalling NaN quietened, a bf16 NaN's sign set), in the base's entries too.
        out.view(bits).scatter_(0, index, compact.contiguous().view(bits))
        return out.view(shape)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], _output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (index,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, index), None, None, None


def scatter_free(
    compact: Tensor, index: Tensor, base: Tensor | None, shape: torch.Size | None = None
) -> Tensor:
    """``base`` (zeros of ``shape`` when None) with its entries at the flat positions ``index``
    (int64, unique) set to ``compact``; gradients flow to ``compact`` only.

    >>> base = torch.tensor([[7.0, -0.0], [0.0, 0.0]])
    >>> scatter_free(torch.tensor([1.0, 2.0]), torch.tensor([2, 3]), base).tolist()
    [[7.0, -0.0], [1.0, 2.0]]
    >>> scatter_free(torch.tensor([1.0]), torch.tensor([1]), None, torch.Size([3])).tolist()
    [0.0, 1.0, 0.0]
    """
    if base is not None:
        shape = base.shape
    elif shape is None:
        raise TypeError("scatter_free needs the shape where base is None")
    return _ScatterFree.apply(compact, index, base, shape)  # type: ignore[no-untyped-call,no-any-return]


# torch's Function.apply binds the arguments to ``forward``'s signature on every call (a function
# with setup_context may have defaults), and inspect.signature costs about 20 us each time: more
# than the kernel itself on small tensors, once per constrained tensor per forward. inspect reads
# a function's ``__signature__`` first, so computing it once here leaves only the binding.
for _function in (_KeepBits, _KeepOrFrozen, _StraightThrough, _ScatterFree):
    _function.forward.__signature__ = inspect.signature(_function.forward)  # type: ignore[union-attr]
