"""A tied, constrained tensor in the state_dict: saved once, under the holder torch saves first.

``apply_mask`` registers the same constraint objects on every module that holds a tied tensor
(an embedding that is also the output layer), so every holder computes one tensor. torch's
state_dict would save that tensor's original and the constraints' buffers once per holder (the
same tensors under two names), which safetensors refuses, and with it ``save_pretrained`` and
every Hugging Face Trainer checkpoint. Hugging Face saves one key of a plain tie; maskparam saves
a constrained one once too:

* a :class:`Tie` lists the holders; every holder keeps it in a plain attribute, which a deep
  copy carries (mapping the modules to their copies);
* a holder leaves its keys out of a state_dict that already holds the tie's original (the same
  storage, saved by a holder torch reached before: a state_dict of a submodule that holds one
  side keeps it);
* loading, the load guard (``core/load_guard.py``, a pre-hook of the model ``apply_mask`` was
  given, which sees the whole checkpoint) gives a holder whose keys are absent the entries of a
  holder that has them (:func:`fill_tied_keys`): a checkpoint without any holder's keys still
  reports them missing. A tie that ``to_empty`` split (it gives each module a Parameter of its
  own, as it does to plain ties) is tied again before the load, and one that ``assign=True``
  split (a Parameter per key) after it, by :func:`restore_ties`;
* baking one holder without the others would split the tie: :func:`refuse_split_tie_bake`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from maskparam.core.parametrize import maskparam_constraints, parametrization_list
from maskparam.errors import error

__all__ = [
    "Tie",
    "fill_tied_keys",
    "forget_ties",
    "refuse_split_tie_bake",
    "restore_ties",
    "tie_holders",
]

# The module attribute: tensor name -> the Tie it belongs to.
_TIES = "_maskparam_ties"
# The module attribute: the id of the state_dict hook a holder carries.
_HOOKS = "_maskparam_tie_hook"


@dataclass(eq=False)
class Tie:
    """The (module, tensor name) pairs that hold one tied, constrained tensor, in the order
    ``apply_mask`` found them, and their qualified names (for messages)."""

    holders: list[tuple[nn.Module, str]]
    names: list[str] = field(default_factory=list)


def tie_holders(holders: list[tuple[nn.Module, str]], names: list[str]) -> None:
    """Record that ``holders`` hold one constrained tensor."""
    tie = Tie(list(holders), list(names))
    for module, local in holders:
        module.__dict__.setdefault(_TIES, {})[local] = tie
        if _HOOKS not in module.__dict__:
            saving = module.register_state_dict_post_hook(_drop_second_copy)  # type: ignore[no-untyped-call]
            object.__setattr__(module, _HOOKS, saving.id)


def forget_ties(module: nn.Module) -> None:
    """Forget the ties of ``module``'s tensors that are no longer constrained (baked), and drop
    its hooks once it holds no tie: a baked model holds nothing of maskparam."""
    ties: dict[str, Tie] = module.__dict__.get(_TIES, {})
    for local in [n for n in ties if not maskparam_constraints(module, n)]:
        del ties[local]
    if not ties:
        module.__dict__.pop(_TIES, None)
        hook = module.__dict__.pop(_HOOKS, None)
        if hook is not None:
            module._state_dict_hooks.pop(hook, None)


def refuse_split_tie_bake(model: nn.Module, caller: str) -> None:
    """Refuse to bake a tied tensor in ``model`` while a holder of it lies outside ``model``: the
    baked holders would get a plain tensor of their own, and the tie would split."""
    inside = {id(m) for m in model.modules()}
    for module in model.modules():
        for tie in module.__dict__.get(_TIES, {}).values():
            sides = list(zip(tie.holders, tie.names, strict=True))
            outside = [name for (holder, _), name in sides if id(holder) not in inside]
            if outside:
                within = [name for (holder, _), name in sides if id(holder) in inside]
                raise error(
                    caller,
                    f"{within[0]!r} is tied to {', '.join(map(repr, outside))}, outside the "
                    "module given: baking one side would split the tie; nothing was baked.",
                    fix="call it on a module that holds every side of the tie (the whole model).",
                )


def restore_ties(model: nn.Module) -> None:
    """Give every holder of each tie in ``model`` the first holder's original again, where
    ``to_empty`` (or another ``_apply`` that makes new Parameters) gave each its own: the values
    it held are uninitialised memory, which the load then fills once."""
    for module in model.modules():
        for tie in module.__dict__.get(_TIES, {}).values():
            first_module, first_local = tie.holders[0]
            if first_module is not module or not maskparam_constraints(module, first_local):
                continue
            original = parametrization_list(first_module, first_local).original
            for holder, local in tie.holders[1:]:
                if not maskparam_constraints(holder, local):
                    continue
                plist = parametrization_list(holder, local)
                if plist.original is not original and plist.original.shape == original.shape:
                    plist._parameters["original"] = original  # type: ignore[assignment]


def _ties(module: nn.Module) -> list[tuple[str, Tie]]:
    """The constrained tensors ``module`` holds as a side of a tie."""
    ties: dict[str, Tie] = module.__dict__.get(_TIES, {})
    return [(local, tie) for local, tie in ties.items() if maskparam_constraints(module, local)]


def _refuse_differing_copies(tie: Tie, sides: list[str], present: list[dict[str, Any]]) -> None:
    """A checkpoint with more than one holder's entries (saved by maskparam 0.2) must hold the
    same tensor under each: torch would copy each into the one shared tensor, the last winning."""
    copies = [(side, entries) for side, entries in zip(sides, present, strict=True) if entries]
    first_side, first = copies[0]
    for side, entries in copies[1:]:
        differ = sorted(
            key
            for key in first.keys() | entries.keys()
            if not (
                isinstance(first.get(key), Tensor)
                and isinstance(entries.get(key), Tensor)
                and first[key].shape == entries[key].shape
                and torch.equal(first[key], entries[key])
            )
        )
        if differ:
            raise error(
                f"load_state_dict of the tied {tie.names[0]!r}",
                f"the checkpoint holds the tie under {first_side!r} and {side!r}, with other "
                f"values in {differ[0]!r}: they are one tensor here, and torch would keep "
                "whichever it copies last; nothing was loaded.",
                fix="keep one holder's entries in the checkpoint (the one that is right), or "
                "load it into a model whose weights are not tied.",
            )


def _drop_second_copy(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for local, _tie in _ties(module):
        here = f"{prefix}parametrizations.{local}."
        original = parametrization_list(module, local).original
        if original.is_meta:  # no storage to tell the holders apart by: keep both
            continue
        # Another holder was saved in this call (before, in torch's order) where the original
        # is in the state_dict under another key: the same storage.
        saved_before = any(
            isinstance(value, Tensor)
            and not key.startswith(here)
            and value.shape == original.shape
            and value.data_ptr() == original.data_ptr()
            for key, value in state_dict.items()
        )
        if saved_before:
            for key in [k for k in state_dict if k.startswith(here)]:
                del state_dict[key]


def fill_tied_keys(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Give each holder of a tie in ``model`` whose entries ``state_dict`` lacks those of a
    holder it has (the same tensors: torch then loads one value into the shared tensor)."""
    paths = {id(m): path for path, m in model.named_modules(prefix=prefix.rstrip("."))}
    done: set[int] = set()
    for module in model.modules():
        for tie in module.__dict__.get(_TIES, {}).values():
            if id(tie) in done:
                continue
            done.add(id(tie))
            held = [
                (paths[id(m)], n)
                for m, n in tie.holders
                if id(m) in paths and maskparam_constraints(m, n)
            ]
            sides = [f"{path}.parametrizations.{n}.".lstrip(".") for path, n in held]
            plains = [f"{path}.{n}".lstrip(".") for path, n in held]
            present = [
                {k[len(side) :]: v for k, v in state_dict.items() if k.startswith(side)}
                for side in sides
            ]
            given = next((entries for entries in present if entries), None)
            if given is None:
                continue  # no holder's entries: torch reports them missing
            _refuse_differing_copies(tie, sides, present)
            for side, plain, entries in zip(sides, plains, present, strict=True):
                if not entries and plain not in state_dict:  # (a plain one: the guard refuses)
                    state_dict.update({side + k: v for k, v in given.items()})
