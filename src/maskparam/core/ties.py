"""A tied, constrained tensor in the state_dict: saved once, under its first holder.

``apply_mask`` registers the same constraint objects on every module that holds a tied tensor
(an embedding that is also the output layer), so every holder computes one tensor. torch's
state_dict would save that tensor's original and the constraints' buffers once per holder (the
same tensors under two names), which safetensors refuses, and with it ``save_pretrained`` and
every Hugging Face Trainer checkpoint. Hugging Face saves one key of a plain tie; maskparam saves
a constrained one once too:

* a :class:`Tie` lists the holders (the first one's keys are saved); every holder keeps it in a
  plain attribute, which a deep copy carries (mapping the modules to their copies);
* an *alias* holder (not the first) leaves its keys out of a state_dict that also holds the
  first holder's tensors (a state_dict of a submodule that holds only the alias keeps them);
* loading, an alias holder takes its absent keys from the first holder's current tensors (torch
  loads the first holder before, and ``assign=True`` gives both the same new tensor);
* baking one holder without the others would split the tie: :func:`refuse_split_tie_bake`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from maskparam.core.parametrize import maskparam_constraints, parametrization_list
from maskparam.errors import error

__all__ = ["Tie", "forget_ties", "refuse_split_tie_bake", "tie_holders"]

# The module attribute: tensor name -> the Tie it belongs to.
_TIES = "_maskparam_ties"
# The module attribute: the ids of the two hooks an alias holder carries.
_HOOKS = "_maskparam_tie_hooks"


@dataclass(eq=False)
class Tie:
    """The (module, tensor name) pairs that hold one tied, constrained tensor; the first one's
    keys are the ones saved, and ``names`` are their qualified names (for messages)."""

    holders: list[tuple[nn.Module, str]]
    names: list[str] = field(default_factory=list)


def tie_holders(holders: list[tuple[nn.Module, str]], names: list[str]) -> None:
    """Record that ``holders`` hold one constrained tensor (the first saves it)."""
    tie = Tie(list(holders), list(names))
    for position, (module, local) in enumerate(holders):
        module.__dict__.setdefault(_TIES, {})[local] = tie
        if position and _HOOKS not in module.__dict__:
            saving = module.register_state_dict_post_hook(_drop_alias_keys)  # type: ignore[no-untyped-call]
            loading = module.register_load_state_dict_pre_hook(_fill_alias_keys)  # type: ignore[no-untyped-call]
            object.__setattr__(module, _HOOKS, (saving.id, loading.id))


def forget_ties(module: nn.Module) -> None:
    """Forget the ties of ``module``'s tensors that are no longer constrained (baked), and drop
    its hooks once it is no tie's alias: a baked model holds nothing of maskparam."""
    ties: dict[str, Tie] = module.__dict__.get(_TIES, {})
    for local in [n for n in ties if not maskparam_constraints(module, n)]:
        del ties[local]
    if not ties:
        module.__dict__.pop(_TIES, None)
    if not _aliases(module):
        hooks = module.__dict__.pop(_HOOKS, None)
        if hooks is not None:
            module._state_dict_hooks.pop(hooks[0], None)
            module._load_state_dict_pre_hooks.pop(hooks[1], None)


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


def _aliases(module: nn.Module) -> list[tuple[str, Tie]]:
    """The tensors ``module`` holds as a tie's alias (not its first holder)."""
    ties: dict[str, Tie] = module.__dict__.get(_TIES, {})
    return [(local, tie) for local, tie in ties.items() if tie.holders[0][0] is not module]


def _first_state(tie: Tie) -> dict[str, Any]:
    """The first holder's parametrization entries, as tensors (not copies), by local key."""
    module, local = tie.holders[0]
    return parametrization_list(module, local).state_dict(keep_vars=True)


def _drop_alias_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for local, _tie in _aliases(module):
        if not maskparam_constraints(module, local):
            continue
        here = f"{prefix}parametrizations.{local}."
        original = parametrization_list(module, local).original
        if original.is_meta:  # no storage to tell the holders apart by: keep both
            continue
        # The first holder was saved in this call (before, in torch's order) where its original
        # is in the state_dict under another key: the same storage.
        saved_first = any(
            isinstance(value, Tensor)
            and not key.startswith(here)
            and value.shape == original.shape
            and value.data_ptr() == original.data_ptr()
            for key, value in state_dict.items()
        )
        if saved_first:
            for key in [k for k in state_dict if k.startswith(here)]:
                del state_dict[key]


def _fill_alias_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # Runs before the module's children load, on the dict their entries are taken from.
    for local, tie in _aliases(module):
        if not maskparam_constraints(module, local):
            continue
        here = f"{prefix}parametrizations.{local}."
        for key, value in _first_state(tie).items():
            state_dict.setdefault(here + key, value)
