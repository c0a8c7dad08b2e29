"""``verify``: check every constraint's invariant on the tensors the model really computes with.

Each constraint states its invariant as :class:`~maskparam.Pins` (the entries it fixes and their
values). In a stack, a later constraint rules where it pins too; values a constraint *captured*
(frozen values) must also agree with what the constraints before it pin, since they were taken
from that input (a frozen row above the diagonal of a triangle must be zero).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskparam.constrain.distributed import refuse_sharded
from maskparam.core.constraint import Constraint, Pins
from maskparam.core.parametrize import maskparam_constraints, parametrization_list, walk_stack
from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import check_module

__all__ = ["verify"]


def verify(model: nn.Module) -> list[str]:
    """Every violated invariant of maskparam's constraints in ``model``; empty when all hold.

    Checked exactly, on the tensor each module computes with: masked and off-triangle entries
    are zero (not NaN), frozen entries equal their recorded values bit for bit (the sign of zero
    included), subspace members equal ``θ₀ + E·θ``.

    >>> import torch, maskparam as mp
    >>> layer = mp.apply_mask(torch.nn.Linear(3, 3), {"weight": mp.Triangular()})
    >>> with torch.no_grad():  # whatever happens to the stored original...
    ...     _ = layer.parametrizations.weight.original.fill_(float("inf"))
    >>> mp.verify(layer)  # ...the upper triangle is still exactly zero
    []
    """
    check_module(model, "verify")
    refuse_sharded(model, "verify")
    problems: list[str] = []
    with torch.no_grad():
        for ref in find_tensors(model):
            if ref.has_constraint:
                problems += _check(ref)
    return problems


def _levels(ref: TensorRef) -> tuple[list[Constraint | None], list[Tensor]]:
    """Each parametrization of the stack (None for a user's) and the value entering it."""
    levels, _ = walk_stack(ref.module, ref.local_name)
    layers = [p if isinstance(p, Constraint) else None for p, _ in levels]
    return layers, [value for _, value in levels]


def _check(ref: TensorRef) -> list[str]:
    problems = []
    first = parametrization_list(ref.module, ref.local_name)[0]
    for constraint in maskparam_constraints(ref.module, ref.local_name):
        if constraint.awaits_state:
            problems.append(
                f"{ref.name!r}: {constraint.describe()} was built on the meta device and its state "
                "was never loaded"
            )
        own = {**constraint._buffers, **{n: getattr(constraint, n) for n in constraint._fixed}}
        problems += [f"{ref.name!r}: {p}" for p in constraint.check_state(own)]
        if constraint is first and not constraint.awaits_state:
            # The stored original must fit the state (a compact mask changed in place no longer
            # selects as many entries as are stored).
            problem = constraint.check_original(ref.storage, own)
            if problem:
                problems.append(f"{ref.name!r}: {constraint.describe()}: {problem}")
    if problems:
        return problems
    try:
        final: Tensor = getattr(ref.module, ref.local_name)
        layers, inputs = _levels(ref)
    except Exception as failure:  # noqa: BLE001 - reported: state changed in place, unforeseen
        why = f"{type(failure).__name__}: {failure}"
        return [f"{ref.name!r}: the constraints cannot compute the tensor ({why})"]
    pins: list[Pins | None] = [
        layer.pins(value) if layer is not None else None
        for layer, value in zip(layers, inputs, strict=True)
    ]
    for level, (layer, pin) in enumerate(zip(layers, pins, strict=True)):
        if layer is None or pin is None:
            continue
        entries = pin.entries.expand(final.shape).to(final.device)
        later = [p for p in pins[level + 1 :] if p is not None]
        for after in later:
            entries = entries & ~after.entries.expand(final.shape).to(final.device)
        values = pin.values.expand(final.shape).to(final.device, final.dtype)
        bad = _mismatches(final, values, entries, bitwise=pin.captured)
        if bad:
            problems.append(f"{ref.name!r}: {layer.describe()} violated at {bad} entries")
        if pin.captured:  # captured values agree with what earlier constraints pinned
            here = pin.entries.expand(final.shape).to(final.device)
            for before in pins[:level]:
                if before is None:
                    continue
                overlap = here & before.entries.expand(final.shape).to(final.device)
                entering = inputs[level].expand(final.shape)
                bad = _mismatches(entering, values, overlap, bitwise=False)
                if bad:
                    problems.append(
                        f"{ref.name!r}: {layer.describe()} holds {bad} values that break the "
                        "constraint before it"
                    )
    return problems


def _mismatches(actual: Tensor, expected: Tensor, where: Tensor, *, bitwise: bool) -> int:
    """How many entries in ``where`` differ (bitwise: the sign of zero too).

    NaN matches only an expected NaN (a subspace whose θ diverged still is θ₀ + E·θ); a masked
    entry, expected to be 0, never matches NaN.
    """
    a, e = actual[where], expected[where]
    if bitwise and a.is_floating_point():
        same = (a == e) & (torch.signbit(a) == torch.signbit(e))
        same = same | (a.isnan() & e.isnan() & _same_bits(a, e))
    else:
        same = (a == e) | (a.isnan() & e.isnan())
    return int((~same).sum())


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    views = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    view = views.get(a.element_size())
    if view is None:
        return torch.zeros_like(a, dtype=torch.bool)
    return a.view(view) == b.view(view)
