"""Optimizer checkpoints keyed by tensor names, so that they survive apply and bake.

torch's ``Optimizer.state_dict`` maps state to parameters by *position*, and constraining a tensor
moves it in ``parameters()`` (``fc.weight`` becomes ``fc.parametrizations.weight.original``, listed
after the module's other parameters). A state saved before ``apply_mask`` and loaded after it, or
saved constrained and loaded after baking, gives one tensor another's moments: an error where the
shapes differ, silently where they agree. :func:`optimizer_state_dict` records the name of each
position (the name a user sees: ``fc.weight`` whether constrained or not) and
:func:`load_optimizer_state_dict` puts each state back on the tensor of that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from maskparam.core.constraint import Constraint
from maskparam.core.optimizer import elementwise
from maskparam.core.parametrize import maskparam_constraints
from maskparam.core.positions import free_positions, to_full, to_stored
from maskparam.core.tensors import find_tensors
from maskparam.errors import check_module, error

__all__ = ["load_optimizer_state_dict", "optimizer_state_dict"]

_NAMES = "maskparam_param_names"


def _names(model: nn.Module) -> dict[int, str]:
    """id(Parameter) -> the name a user sees; a constraint's own parameters (θ, scores) by path."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    for ref in find_tensors(model):
        if ref.is_parameter:
            names[id(ref.storage)] = ref.name  # fc.weight, not fc.parametrizations.weight.original
    return names


def _group_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    result = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise error(
                f"{type(optimizer).__name__}",
                f"holds {len(missing)} parameter(s) that are not in the model (shapes "
                f"{[tuple(p.shape) for p in missing[:3]]}).",
                fix="pass the model whose parameters the optimizer trains.",
            )
        result.append([names[id(p)] for p in group["params"]])
    return result


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` plus the name of every parameter position, for
    :func:`load_optimizer_state_dict`. Save it with ``torch.save`` as usual.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> saved = mp.optimizer_state_dict(opt, model)  # plain: order weight, bias
    >>> _ = mp.apply_mask(model, {"weight": mp.Triangular()})  # now: bias, weight
    >>> new = torch.optim.Adam(model.parameters())
    >>> mp.load_optimizer_state_dict(new, model, saved)
    >>> new.state[model.parametrizations.weight.original]["exp_avg"].shape  # the 3 free entries
    torch.Size([3])
    """
    _check_arguments(optimizer, model, "optimizer_state_dict")
    state = optimizer.state_dict()
    state[_NAMES] = _group_names(optimizer, _names(model))
    return state


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer, model: nn.Module, state: Mapping[str, Any]
) -> None:
    """Load a state from :func:`optimizer_state_dict`, each parameter's state onto the tensor of
    the same name, whatever the order of ``parameters()`` now (constrained, baked or plain).

    Checked before anything is loaded: the same names in each group, and each state tensor of
    its parameter's shape. State saved for the full tensor fits its compact layout (the free
    entries' state is kept) and back (zeros at the fixed entries).
    """
    _check_arguments(optimizer, model, "load_optimizer_state_dict")
    if not isinstance(state, Mapping):
        raise error(
            "load_optimizer_state_dict",
            f"the state must be a mapping; got a {type(state).__name__}.",
            fix="pass what mp.optimizer_state_dict returned (e.g. after torch.load).",
        )
    if _NAMES not in state:
        raise error(
            f"load_optimizer_state_dict into {type(optimizer).__name__}",
            "the state has no parameter names: it was saved with optimizer.state_dict(), which "
            "maps by position, and positions change when a tensor is constrained or baked.",
            fix="save it with mp.optimizer_state_dict(optimizer, model).",
        )
    _check_structure(state, optimizer)
    saved_names: list[list[str]] = state[_NAMES]
    current_names = _group_names(optimizer, _names(model))
    if [sorted(g) for g in saved_names] != [sorted(g) for g in current_names]:
        raise error(
            f"load_optimizer_state_dict into {type(optimizer).__name__}",
            "the saved parameter groups hold other tensors than this optimizer's.",
            f"saved: {saved_names}",
            f"here:  {current_names}",
            fix="create the optimizer with the same parameter groups as the one that was saved.",
        )
    # Another optimizer's state (SGD's into Adam) would load, then fail inside torch with the
    # state half replaced: the options of its groups say which optimizer saved it.
    saved_options = {k for g in state["param_groups"] for k in g if k != "params"}
    own_options = {k for g in optimizer.param_groups for k in g if k != "params"}
    if not saved_options <= own_options | {"initial_lr"}:
        raise error(
            f"load_optimizer_state_dict ({type(optimizer).__name__})",
            "the state was saved by another kind of optimizer: its groups have options this "
            f"one does not ({sorted(saved_options - own_options)[:6]}); nothing was loaded.",
            fix="load it into an optimizer of the class that saved it (the same options).",
        )
    # Renumber the saved state so that position i holds the state of current_names[i].
    saved_ids = [list(g["params"]) for g in state["param_groups"]]
    by_name = {
        name: pid
        for names, ids in zip(saved_names, saved_ids, strict=True)
        for name, pid in zip(names, ids, strict=True)
    }
    position = 0
    new_state: dict[int, Any] = {}
    groups = []
    for group, saved_group, names in zip(
        optimizer.param_groups, state["param_groups"], current_names, strict=True
    ):
        ids = []
        for parameter, name in zip(group["params"], names, strict=True):
            old = by_name[name]
            if old in state["state"]:
                entry = state["state"][old]
                if elementwise(optimizer):
                    new_state[position] = _laid_out(name, entry, parameter, model)
                else:  # its state is not one value per entry: it must fit as it is
                    _check_not_elementwise(name, entry, parameter, group["params"], optimizer)
                    new_state[position] = dict(entry)
            ids.append(position)
            position += 1
        groups.append({**saved_group, "params": ids})
    optimizer.load_state_dict({"state": new_state, "param_groups": groups})


def _check_structure(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse a damaged state (a part missing, groups and names that do not pair up) before
    anything is loaded, with what is wrong."""
    problem = _structure_problem(state)
    if problem:
        raise error(
            f"load_optimizer_state_dict into {type(optimizer).__name__}",
            f"the state is damaged: {problem}; nothing was loaded.",
            fix="pass what mp.optimizer_state_dict(optimizer, model) returned, saved and loaded "
            "whole (torch.save / torch.load).",
        )


def _structure_problem(state: Mapping[str, Any]) -> str | None:
    names, groups, per_parameter = state.get(_NAMES), state.get("param_groups"), state.get("state")
    if not isinstance(per_parameter, Mapping):
        return "it has no 'state' mapping"
    if not isinstance(groups, list) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups
    ):
        return "its 'param_groups' is not a list of groups with 'params'"
    if not isinstance(names, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in names
    ):
        return f"its {_NAMES!r} is not a list of lists of names"
    if len(names) != len(groups):
        return f"it has {len(groups)} parameter groups but {len(names)} lists of names"
    for index, (group, group_names) in enumerate(zip(groups, names, strict=True)):
        if len(group["params"]) != len(group_names):
            return (
                f"group {index} holds {len(group['params'])} parameters but "
                f"{len(group_names)} names"
            )
    ids = [pid for g in groups for pid in g["params"]]
    if len(set(ids)) != len(ids):
        return "a parameter is listed twice in its groups"
    flat = [n for g in names for n in g]
    if len(set(flat)) != len(flat):
        return "a name is listed twice"
    stray = [key for key in per_parameter if key not in set(ids)]
    if stray:
        return f"it holds state for {stray[:3]}, which no group lists"
    odd = [key for key, value in per_parameter.items() if not isinstance(value, Mapping)]
    if odd:
        return f"the state of {odd[:3]} is not a mapping"
    return None


def _check_not_elementwise(
    name: str,
    entry: Mapping[str, Any],
    parameter: Tensor,
    group: list[Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    """The state of an optimizer that is not elementwise loads as torch loads it, where it fits
    the parameter: LBFGS's flat vectors span all its parameters; Adafactor's factors take the
    parameter's size or 1 in each dimension. Another layout's state cannot be laid out."""
    if isinstance(optimizer, torch.optim.LBFGS):
        numel = sum(p.numel() for p in group)
        tensors: list[object] = [v for v in entry.values() if isinstance(v, Tensor)]
        tensors += [t for v in entry.values() if isinstance(v, list) for t in v]
        odd = sorted(
            {
                t.numel()
                for t in tensors
                if isinstance(t, Tensor) and t.dim() == 1 and t.numel() != numel
            }
        )
        if odd:
            raise error(
                repr(name),
                f"LBFGS's saved history holds flat vectors of {odd} entries, but its parameters "
                f"hold {numel} now (another layout or other masks): it cannot be laid out again.",
                fix="create the LBFGS afresh (it rebuilds its history in a few steps), or apply "
                "the same rules with the same layout as when the state was saved.",
            )
        return
    shapes = sorted(
        {
            tuple(v.shape)
            for v in entry.values()
            if isinstance(v, Tensor)
            and v.dim()
            and (
                v.dim() != parameter.dim()
                or any(s not in (1, p) for s, p in zip(v.shape, parameter.shape, strict=True))
            )
        }
    )
    if shapes:
        raise error(
            repr(name),
            f"its saved {type(optimizer).__name__} state has shapes {shapes}, which do not fit the "
            f"parameter's {tuple(parameter.shape)} (saved in another layout, or for other masks).",
            fix="apply the same rules with the same layout as when the state was saved.",
        )


def _check_arguments(optimizer: object, model: object, caller: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise error(
            caller,
            f"the optimizer must be a torch.optim.Optimizer; got a {type(optimizer).__name__}.",
            fix=f"call {caller}(optimizer, model, ...).",
        )
    check_module(model, caller)


def _laid_out(
    name: str, entry: Mapping[str, Any], parameter: Tensor, model: nn.Module
) -> dict[str, Any]:
    """A copy of one parameter's saved state, laid out for its layout now: state saved for the
    full tensor fits its compact layout, and state saved compact (a vector of the free entries)
    fits the dense layout of the same mask, as on a model built on the meta device."""
    laid_out = dict(entry)
    first = _first_constraint(name, parameter, model)
    for key, value in entry.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape == parameter.shape:
            continue
        relaid = _other_layout(value, parameter, first)
        if relaid is None:
            raise error(
                repr(name),
                f"its saved optimizer state {key!r} has shape {tuple(value.shape)}, the parameter "
                f"{tuple(parameter.shape)}.",
                fix="apply the same rules as when the state was saved (the same masks).",
            )
        laid_out[key] = relaid
    return laid_out


def _first_constraint(name: str, parameter: Tensor, model: nn.Module) -> Constraint | None:
    for ref in find_tensors(model):
        if ref.name == name and ref.storage is parameter:
            constraints = maskparam_constraints(ref.module, ref.local_name)
            return constraints[0] if constraints else None
    return None


def _other_layout(value: Tensor, parameter: Tensor, first: Constraint | None) -> Tensor | None:
    """``value`` saved for the tensor's other layout, laid out for the one ``parameter`` has:
    full state into a compact layout keeps the free entries' state; compact state (one entry per
    free entry, in order) into the dense layout gets zeros elsewhere. None where neither fits."""
    if first is None:
        return None  # a plain tensor: the positions of compact state are not known here
    with torch.no_grad():
        positions = first.stored_positions()
        if positions is not None:
            full = first.mask_shape()
            return to_stored(value, positions) if value.shape == full else None
        if value.dim() != 1:
            return None
        free = first.free_entries(
            torch.ones(parameter.shape, dtype=torch.bool, device=parameter.device)
        )
        positions = free_positions(free, parameter.shape)
        if positions.numel() != value.numel():
            return None
        return to_full(value, positions, parameter.shape)
