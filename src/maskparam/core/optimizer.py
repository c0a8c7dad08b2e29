"""Optimizer state of entries that change side, moved in the optimizers the caller passes.

maskparam never watches optimizers: it registers no hook, keeps no registry, and an optimizer
step runs none of its code. Where a call changes which entries of a stored Parameter exist or
train, the optimizer is an explicit argument (``optimizer=``, one or a list), and its state is
laid out at once, inside the call, so that it is right at every moment it can be observed (a
step, a ``state_dict()`` save, a deep copy):

* an entry that becomes free (regrown by a ``Mask``, unfrozen by a ``Freeze``, or baked back)
  starts from fresh state: zeros, or what torch's optimizer starts from (Rprop's step size,
  Adagrad's initial accumulator);
* a compact tensor that shrinks or grows keeps each entry's state by position;
* LBFGS, whose history is one flat vector over all its parameters, restarts it when a tensor
  stores other entries (changes size, or a compact one moves to other positions).

State of a shape that belongs to neither the old nor the new layout is refused, not guessed.

>>> import torch
>>> weight = torch.nn.Parameter(torch.ones(4))
>>> sgd = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
>>> weight.grad = torch.ones(4); sgd.step()
>>> reset_entries([sgd], weight, torch.tensor([1, 2]))
>>> sgd.state[weight]["momentum_buffer"].tolist()
[1.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from maskparam.core.positions import fill_at, to_full, to_stored
from maskparam.core.undo import Undo
from maskparam.errors import error

__all__ = [
    "UNSET",
    "Optimizers",
    "as_optimizers",
    "check_state_fits",
    "elementwise",
    "holders",
    "known_elementwise",
    "move_entries",
    "reset_entries",
]

Optimizers: TypeAlias = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


class _Unset:
    """The default of ``optimizer=`` where leaving it out must be a decision, not an accident."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# Optimizers whose state is not one value per entry of a parameter: LBFGS keeps flat vectors over
# all its parameters, Adafactor (torch's and Hugging Face's) factors a matrix's second moment
# into a row and a column.
_NOT_ELEMENTWISE: tuple[type, ...] = tuple(
    cls
    for cls in (torch.optim.LBFGS, getattr(torch.optim, "Adafactor", None))
    if isinstance(cls, type)
)


# torch's optimizers that step each entry of a parameter on its own (their state, where they
# keep one, is one value per entry).
_KNOWN_ELEMENTWISE: tuple[type, ...] = tuple(
    cls
    for name in (
        "SGD",
        "Adam",
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "ASGD",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SparseAdam",
    )
    if isinstance(cls := getattr(torch.optim, name, None), type)
)


def known_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is (a subclass of) one of torch's optimizers known to step each
    entry on its own: where maskparam may change a tensor's layout on its own account."""
    return isinstance(optimizer, _KNOWN_ELEMENTWISE)


# The same, outside torch, by (module, class name): recognised without importing them.
_NOT_ELEMENTWISE_ELSEWHERE = {("transformers.optimization", "Adafactor")}


def elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s per-parameter state holds one value per entry (SGD, Adam, ...)."""
    if isinstance(optimizer, _NOT_ELEMENTWISE):
        return False
    classes = {(cls.__module__, cls.__name__) for cls in type(optimizer).__mro__}
    return not classes & _NOT_ELEMENTWISE_ELSEWHERE


# State an optimizer starts an entry from, where it is not zero.
_FRESH: dict[tuple[type, str], str] = {
    (torch.optim.Rprop, "step_size"): "lr",
    (torch.optim.Adagrad, "sum"): "initial_accumulator_value",
}


def as_optimizers(value: object, caller: str) -> list[torch.optim.Optimizer]:
    """``optimizer=`` as a list (None: no optimizer); anything else is refused."""
    if value is None:
        return []
    if isinstance(value, torch.optim.Optimizer):
        return [value]
    if isinstance(value, (list, tuple)) and all(
        isinstance(o, torch.optim.Optimizer) for o in value
    ):
        # Each once, however often it is listed: its state must move once.
        return list({id(o): o for o in value}.values())
    raise error(
        caller,
        f"optimizer must be a torch.optim.Optimizer, a list of them, or None; got "
        f"{type(value).__name__}.",
        fix=f"pass e.g. {caller}(..., optimizer=optimizer).",
    )


def holders(
    optimizers: Sequence[torch.optim.Optimizer], parameter: Tensor
) -> list[tuple[torch.optim.Optimizer, dict[str, Any]]]:
    """(optimizer, parameter group) for every given optimizer that trains ``parameter``."""
    found = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if any(p is parameter for p in group["params"]):
                found.append((optimizer, group))
    return found


def _fresh(optimizer: torch.optim.Optimizer, group: dict[str, Any], key: str) -> float:
    option = next(
        (o for (cls, k), o in _FRESH.items() if k == key and isinstance(optimizer, cls)), None
    )
    return float(group[option]) if option is not None else 0.0


def _per_entry(state: dict[str, Any], shape: torch.Size) -> dict[str, Tensor]:
    """The state tensors laid out entry by entry for a parameter of ``shape``."""
    return {
        k: v for k, v in state.items() if isinstance(v, Tensor) and v.dim() and v.shape == shape
    }


def check_state_fits(
    optimizers: Sequence[torch.optim.Optimizer], parameter: Tensor, name: str
) -> None:
    """Refuse, before anything changes, state for ``parameter`` that is not laid out for the
    entries it holds now (e.g. an optimizer created before ``apply_mask`` stored it compact)."""
    for optimizer, _ in holders(optimizers, parameter):
        if not elementwise(optimizer):
            continue  # its state is not laid out entry by entry
        state = optimizer.state.get(parameter, {})
        odd = sorted(
            {
                tuple(v.shape)
                for v in state.values()
                if isinstance(v, Tensor) and v.dim() and v.shape != parameter.shape
            }
        )
        if odd:
            raise error(
                repr(name),
                f"{type(optimizer).__name__}'s state for this tensor has shapes {odd}, but the "
                f"tensor stores {tuple(parameter.shape)} entries now: it was laid out for other "
                "entries.",
                fix="pass this optimizer to every maskparam call that changes the tensor "
                "(apply_mask, update_masks, remove_parametrizations: optimizer=...), or clear "
                "its state for it (optimizer.state.pop(parameter)).",
            )


def reset_entries(
    optimizers: Sequence[torch.optim.Optimizer],
    parameter: Tensor,
    positions: Tensor,
    *,
    undo: Undo | None = None,
) -> None:
    """Fresh state at the flat ``positions`` of ``parameter`` (entries that become free). The
    caller checked beforehand that the state fits (:func:`check_state_fits`); ``undo`` records
    the old values first."""
    if not positions.numel():
        return
    for optimizer, group in holders(optimizers, parameter):
        state = optimizer.state.get(parameter, {})
        for key, value in _per_entry(state, parameter.shape).items():
            if undo is not None:
                undo.entries(value, positions)
            fill_at(value, positions, _fresh(optimizer, group, key))  # any strides


def move_entries(
    optimizers: Sequence[torch.optim.Optimizer],
    parameter: Tensor,
    *,
    was: Tensor | None,
    now: Tensor | None,
    full_shape: torch.Size,
    undo: Undo | None = None,
) -> None:
    """Lay ``parameter``'s state out again after its stored entries moved from the flat
    positions ``was`` to ``now`` (``None``: the full tensor): each entry keeps its state, an
    entry that was not stored starts fresh. Call it once the parameter holds the new entries;
    the state must be laid out for ``was`` (checked beforehand with :func:`check_state_fits`,
    so that nothing fails once entries have moved); ``undo`` records the old state first."""
    was_shape = full_shape if was is None else torch.Size([was.numel()])
    for optimizer, group in holders(optimizers, parameter):
        if isinstance(optimizer, torch.optim.LBFGS):
            stores_others = (was is None) != (now is None) or (
                was is not None and now is not None and not torch.equal(was, now)
            )
            if was_shape != parameter.shape or stores_others:
                # Its curvature pairs belong to the old variables: start afresh, as at step 1.
                params = optimizer.param_groups[0]["params"]
                if undo is not None:
                    undo.optimizer_state(optimizer, params[0])
                optimizer.state.pop(params[0], None)
                optimizer._numel_cache = None  # its cached total size
            continue
        state = optimizer.state.get(parameter)
        if not state:
            continue
        if undo is not None:
            undo.optimizer_state(optimizer, parameter)
        with torch.no_grad():
            for key, value in _per_entry(state, was_shape).items():
                base = torch.full(full_shape, _fresh(optimizer, group, key), dtype=value.dtype)
                full = (
                    value.reshape(full_shape)
                    if was is None
                    else to_full(value, was, full_shape, base.to(value.device))
                )
                state[key] = full.clone() if now is None else to_stored(full, now)
