"""Read what constrains a tensor without reaching into ``parametrizations.weight[0]``.

Both read the constraints' invariants (:class:`~maskparam.Pins`), so they work for every
constraint, layout and stack, and for constraints of your own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskparam.constrain.distributed import refuse_sharded
from maskparam.constraints.mask import Mask
from maskparam.core.constraint import Constraint
from maskparam.core.parametrize import walk_stack
from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import check_module, error

__all__ = ["frozen_entries", "kept_entries", "kept_masks", "sparsity"]


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


def _masked(model: nn.Module) -> list[TensorRef]:
    """The tensors a ``Mask`` constrains (once each, a tied weight under its first name)."""
    return [
        ref
        for ref in find_tensors(model)
        if any(getattr(p, "mask_spec", None) is Mask for p in ref.parametrizations)
    ]


def kept_masks(model: nn.Module) -> dict[str, Tensor]:
    """The kept entries (:func:`kept_entries`) of every tensor a ``Mask`` constrains, by name.

    A lottery ticket's masks, ready to give another model: ``update_masks`` and ``apply_mask``
    take a tensor as a mask source, so ``mp.update_masks(fresh, mp.kept_masks(ticket),
    optimizer=None, apply_missing=True)`` gives a freshly initialised model the ticket's masks
    (``apply_missing``: whether it is masked yet or not).

    >>> import torch, maskparam as mp
    >>> ticket = mp.apply_mask(torch.nn.Linear(4, 2), {"weight": mp.Mask(mp.masks.rows([0]))})
    >>> fresh = mp.update_masks(
    ...     torch.nn.Linear(4, 2), mp.kept_masks(ticket), optimizer=None, apply_missing=True
    ... )
    >>> torch.equal(mp.kept_entries(fresh, "weight"), mp.kept_entries(ticket, "weight"))
    True
    """
    check_module(model, "kept_masks")
    masks = {}
    for ref in _masked(model):
        shape = getattr(ref.module, ref.local_name).shape
        masks[ref.name] = kept_entries(model, ref.name).expand(shape).clone()
    return masks


def sparsity(model: nn.Module) -> float:
    """The fraction of entries pruned over every tensor a ``Mask`` constrains (a tied weight
    counted once): 0.0 where nothing is masked. ``1 - sparsity(model)`` is the share of those
    weights that remain.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> _ = mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.75))})
    >>> mp.sparsity(model)
    0.75
    """
    check_module(model, "sparsity")
    pruned = total = 0
    for kept in kept_masks(model).values():
        total += kept.numel()
        pruned += kept.numel() - int(kept.sum())
    return pruned / total if total else 0.0
