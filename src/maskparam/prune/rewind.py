"""``rewind``: reset the weights that still train to their values at an earlier step (the
lottery-ticket procedure: prune, rewind the survivors, train again)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from maskparam.core.constraint import Constraint
from maskparam.core.parametrize import parametrization_list
from maskparam.core.progress import PROGRESS_BUFFER
from maskparam.core.tensors import TensorRef, find_tensors, refuse_sparse
from maskparam.errors import check_bool, check_module, error

__all__ = ["rewind"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def check_rewind_value(ref: TensorRef, value: Tensor) -> None:
    """Refuse a value of another kind than the tensor's (a bool mask given as a weight would
    rewind it to 1.0, a complex one would lose its imaginary part): same kind, any width."""
    want, got = _kind(ref.storage.dtype), _kind(value.dtype)
    if want != got:
        raise error(
            repr(ref.name),
            f"rewind's value is {'an' if got == 'integer' else 'a'} {got} tensor ({value.dtype}); "
            f"the tensor is {want} "
            f"({ref.storage.dtype}).",
            fix="rewind to the weights themselves (a copy of the model or its state_dict from "
            "earlier in training), not to masks or other tensors.",
        )


def rewind(model: ModuleT, to: nn.Module | Mapping[str, Tensor], *, strict: bool = True) -> ModuleT:
    """Reset ``model``'s weights to ``to``'s, keeping its constraints; in place, returns ``model``.

    ``to`` is a copy of the model made earlier (``copy.deepcopy(model)``, constrained or not),
    or a mapping from tensor names (``"fc.weight"``, as a plain model's ``state_dict`` has them)
    to values. Every tensor takes the value it had there: a constrained one at its *free*
    entries only. Masked entries stay zero and frozen ones keep their frozen values. The
    parameters stay the same objects; optimizer state is not touched (the lottery-ticket
    procedure starts a new optimizer). ``strict``: every tensor must be found in ``to``, and
    every name of ``to`` in the model.

    Rewinds entries that maskparam's selections (Mask, Freeze, Triangular) leave free. A
    subspace's θ or a learnable mask's scores are not weights of ``to``, so they are refused.

    >>> import copy, torch, maskparam as mp
    >>> model = torch.nn.Linear(4, 4)
    >>> early = copy.deepcopy(model.state_dict())
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(3)
    >>> _ = mp.apply_mask(model, {"weight": mp.Mask(mp.masks.magnitude(0.5))})
    >>> _ = mp.rewind(model, early)
    >>> kept = model.weight != 0
    >>> torch.equal(model.weight[kept], early["weight"][kept]), int(kept.sum())
    (True, 8)
    """
    check_module(model, "rewind")
    check_bool(strict, "rewind", "strict")
    refuse_sparse(model, "rewind")
    values = _values(to)
    # The tensors that hold values (not a schedule's step count, which a rewind leaves).
    refs = [ref for ref in find_tensors(model) if ref.local_name != PROGRESS_BUFFER]
    plan: list[tuple[Tensor, Tensor]] = []  # (stored tensor, the value it takes, as stored)
    found: set[str] = set()
    missing = []
    for ref in refs:
        name = next((n for n in ref.all_names if n in values), None)
        if name is None:
            missing.append(ref.name)
            continue
        found.update(n for n in ref.all_names if n in values)
        value = values[name]
        if tuple(value.shape) != tuple(ref.value.shape):
            raise error(
                repr(ref.name),
                f"rewind's value has shape {tuple(value.shape)}, the tensor "
                f"{tuple(ref.value.shape)}.",
                fix="rewind to a copy of this model (or its state_dict) from earlier in training.",
            )
        check_rewind_value(ref, value)
        _check_rewindable(ref)
        plan.append((ref.storage, _stored_form(ref, value)))
    unexpected = sorted(set(values) - found)
    if strict and (missing or unexpected):
        details = []
        if missing:
            details.append(f"not in `to`: {', '.join(map(repr, missing[:8]))}")
        if unexpected:
            details.append(f"not in the model: {', '.join(map(repr, unexpected[:8]))}")
        raise error(
            "rewind",
            "`to` does not hold the same tensors as the model.",
            *details,
            fix="rewind to a copy of this model from earlier in training, or pass strict=False.",
        )
    # Every value is converted to its stored form above, before anything is written: a value
    # that cannot be converted fails the call with every tensor unchanged.
    with torch.no_grad():
        for stored, value in plan:
            stored.copy_(value)
    return model


def _values(to: object) -> dict[str, Tensor]:
    if isinstance(to, nn.Module):
        with torch.no_grad():
            return {
                name: ref.value
                for ref in find_tensors(to)
                if ref.local_name != PROGRESS_BUFFER
                for name in ref.all_names
            }
    if isinstance(to, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in to.items()
    ):
        return {k: v for k, v in to.items() if k.rpartition(".")[2] != PROGRESS_BUFFER}
    raise error(
        "rewind",
        f"`to` must be a model or a mapping from tensor names to tensors; got a "
        f"{type(to).__name__}.",
        fix="keep copy.deepcopy(model) (or the plain model's state_dict) from the step to rewind to.",
    )


def _check_rewindable(ref: TensorRef) -> None:
    others = [p for p in ref.parametrizations if not getattr(p, "selects_entries", False)]
    if others:
        raise error(
            repr(ref.name),
            f"it is constrained by {type(others[0]).__name__}, whose trained values are not "
            "the tensor's entries.",
            fix="rewind with the state_dict of that earlier model instead "
            "(model.load_state_dict(early.state_dict())), or leave the tensor out of `to` (a "
            "state_dict without it) and pass strict=False.",
        )


def _stored_form(ref: TensorRef, value: Tensor) -> Tensor:
    """``value`` (full shape) as ``ref``'s stored tensor holds it: where a selection fixes an
    entry the stored value is not used, so writing it there too changes nothing the model
    computes. A new tensor of the stored tensor's shape, dtype and device."""
    stored = ref.storage
    with torch.no_grad():
        try:
            value = value.to(stored.device, stored.dtype)
        except (RuntimeError, NotImplementedError) as failure:  # a meta value holds no data
            raise error(
                repr(ref.name),
                f"rewind's value ({value.dtype} on {value.device}) cannot be copied to the "
                f"tensor ({stored.dtype} on {stored.device}): {failure}",
                fix="rewind to a copy of this model (or its state_dict) holding real values.",
            ) from failure
        if ref.is_parametrized:
            first = parametrization_list(ref.module, ref.local_name)[0]
            if isinstance(first, Constraint):  # the stored form: its free entries, where compact
                value = first.to_stored(value)
        if value.shape != stored.shape:
            raise error(
                repr(ref.name),
                f"rewind's value has {value.numel()} stored entries, the tensor {stored.numel()}.",
                fix="rewind to a copy of this model (or its state_dict) from earlier in training.",
            )
        return value
