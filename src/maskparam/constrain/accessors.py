"""Read what constrains a tensor without reaching into ``parametrizations.weight[0]``.

Both read the constraints' invariants (:class:`~maskparam.Pins`), so they work for every
constraint, layout and stack, and for constraints of your own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskparam.constrain.distributed import refuse_sharded
from maskparam.core.constraint import Constraint
from maskparam.core.parametrize import walk_stack
from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import check_module, error

__all__ = ["frozen_entries", "kept_entries"]


def _ref(model: nn.Module, name: str, caller: str) -> TensorRef:
    check_module(model, caller)
    refuse_sharded(model, caller)
    _check_name(name, caller)
    refs = [ref for ref in find_tensors(model) if name in ref.all_names]
    if not refs or not refs[0].has_constraint:
        constrained = [ref.name for ref in find_tensors(model) if ref.has_constraint]
        raise error(
            f"{caller}({name!r})",
            "no tensor of this name is constrained by maskparam."
            if refs
            else "the model has no tensor of this name.",
            f"constrained tensors: {constrained[:8]}{' ...' if len(constrained) > 8 else ''}",
            fix="pass the name a user sees, e.g. 'fc.weight'.",
        )
    return refs[0]


def _pins(ref: TensorRef) -> list[tuple[Tensor, Tensor, bool]]:
    """(entries, values, captured) of every constraint on the tensor, in stack order."""
    result = []
    levels, _ = walk_stack(ref.module, ref.local_name)
    with torch.no_grad():
        for parametrization, value in levels:
            if isinstance(parametrization, Constraint):
                pins = parametrization.pins(value)
                if pins is not None:
                    result.append((pins.entries, pins.values, pins.captured))
    return result


def _check_name(name: object, caller: str) -> None:
    if not isinstance(name, str):
        raise error(caller, f"the name must be a str; got {name!r}.", fix="pass e.g. 'fc.weight'.")


def kept_entries(model: nn.Module, name: str) -> Tensor:
    """The entries of tensor ``name`` that no constraint forces to zero (a bool tensor).

    For a ``Mask`` this is the mask; for a learnable mask the current hard mask; for a triangle
    the triangle; combined over a stack.

    >>> import torch, maskparam as mp
    >>> layer = mp.apply_mask(torch.nn.Linear(3, 2), {"weight": mp.Mask(mp.masks.rows([1]))})
    >>> mp.kept_entries(layer, "weight")
    tensor([[False, False, False],
            [ True,  True,  True]])
    """
    ref = _ref(model, name, "kept_entries")
    shape = getattr(ref.module, ref.local_name).shape
    kept = torch.ones(shape, dtype=torch.bool, device=ref.storage.device)
    for entries, values, captured in _pins(ref):
        if not captured:
            zero = entries.expand(shape) & (values.expand(shape) == 0)
            kept &= ~zero.to(kept.device)
    return kept


def frozen_entries(model: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """``(frozen, values)``: which entries of tensor ``name`` are frozen, and their values.

    ``values`` holds the frozen values at frozen entries and 0 elsewhere.

    >>> import torch, maskparam as mp
    >>> layer = mp.apply_mask(torch.nn.Linear(3, 2), {"weight": mp.Freeze(dim=0, index=[0])})
    >>> frozen, values = mp.frozen_entries(layer, "weight")
    >>> frozen.sum().item(), torch.equal(values[0], layer.weight[0].detach())
    (3, True)
    """
    ref = _ref(model, name, "frozen_entries")
    effective: Tensor = getattr(ref.module, ref.local_name).detach()
    frozen = torch.zeros(effective.shape, dtype=torch.bool, device=effective.device)
    for entries, _values, captured in _pins(ref):
        if captured:
            frozen |= entries.expand(effective.shape).to(frozen.device)
    return frozen, torch.where(frozen, effective, torch.zeros((), dtype=effective.dtype))
