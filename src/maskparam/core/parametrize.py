"""Workarounds for ``torch.nn.utils.parametrize`` internals, kept apart from the lifecycle.

* torch injects one class per parametrized module, and ``copy.deepcopy`` (``AveragedModel``
  too) gives the copy that *same* class: :func:`give_own_class` keeps copies apart (and gives a
  constrained RNN the methods of ``_rnn``);
* a parametrized module cannot be pickled: :func:`refuse_pickling` says what to do instead;
* removal re-registers a baked tensor last, reordering ``parameters()`` and the state_dict
  (optimizer state_dicts map by position): :func:`remember_key_order` and
  :func:`restore_key_order` put each tensor back in its place;
* lookups of the ``ParametrizationList`` and of maskparam's constraints in it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam.core.constraint import Constraint
from maskparam.core.rnn import rnn_methods
from maskparam.errors import error

__all__ = [
    "give_own_class",
    "link_stack",
    "maskparam_constraints",
    "parametrization_list",
    "parametrized_names",
    "refuse_pickling",
    "remember_key_order",
    "restore_key_order",
    "walk_stack",
]

# The module attribute that holds its parameter and buffer names in their order before
# maskparam first constrained one of them. A plain attribute: deepcopy carries it along.
_KEY_ORDER = "_maskparam_key_order"


def parametrized_names(module: nn.Module) -> list[str]:
    """Names of the parametrized tensors of ``module`` (empty when it has none)."""
    if not parametrize.is_parametrized(module):
        return []
    return list(cast(nn.ModuleDict, module.parametrizations).keys())


def parametrization_list(module: nn.Module, tensor_name: str) -> parametrize.ParametrizationList:
    """The ``ParametrizationList`` that holds ``module.<tensor_name>``'s originals."""
    plists = cast(nn.ModuleDict, module.parametrizations)
    return cast(parametrize.ParametrizationList, plists[tensor_name])


def maskparam_constraints(module: nn.Module, tensor_name: str) -> list[Constraint]:
    """maskparam's constraints on ``module.<tensor_name>``, in order (empty when none)."""
    if not parametrize.is_parametrized(module, tensor_name):
        return []
    plist = parametrization_list(module, tensor_name)
    return [p for p in plist if isinstance(p, Constraint)]


def link_stack(module: nn.Module, tensor_name: str) -> None:
    """Tell each maskparam constraint on the tensor what stands before it in the stack."""
    plist = list(parametrization_list(module, tensor_name))
    for position, parametrization in enumerate(plist):
        if isinstance(parametrization, Constraint):
            # A plain attribute, not a submodule: the list already owns these modules.
            object.__setattr__(parametrization, "stack_before", tuple(plist[:position]))


def give_own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its properties change.

    ``register_parametrization`` adds a property to the injected class and
    ``remove_parametrizations`` deletes one from it; on a deep copy, which shares that class,
    changing the copy would change the original (a removed property breaks it). A fresh
    subclass per apply or removal keeps them apart. An RNN whose weights maskparam constrains
    gets the methods that make it compute with them (see ``_rnn``).
    """
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    namespace["__setattr__"] = _setattr
    rnn_methods(module, namespace, cls.__bases__)
    _constraint_forward(module, namespace)
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _constraint_forward(module: nn.Module, namespace: dict[str, Any]) -> None:
    """Put the forward a constraint on ``module`` computes with (the CSR layout's) in the
    ``namespace`` of its new class, and take an earlier one out once no constraint asks."""
    if getattr(namespace.get("forward"), "maskparam_forward", False):
        del namespace["forward"]
    for name in parametrized_names(module):
        for constraint in maskparam_constraints(module, name):
            forward = constraint.module_forward()
            if forward is not None:
                namespace["forward"] = forward


def _setattr(self: nn.Module, name: str, value: object) -> None:
    """``module.weight = nn.Parameter(w)`` on a constrained tensor: torch would raise a KeyError
    ("attribute 'weight' already exists"); take the values like an assigned tensor instead (they
    go through the constraint, and the stored Parameter object, which optimizers hold, stays)."""
    if isinstance(value, nn.Parameter) and maskparam_constraints(self, name):
        with torch.no_grad():
            nn.Module.__setattr__(self, name, value.detach())
        return
    nn.Module.__setattr__(self, name, value)  # type: ignore[arg-type]  # torch checks it


def refuse_pickling(module: nn.Module) -> None:
    """Replace torch's pickling error for parametrized modules with one that names the fix."""
    cls = type(module)
    if cls.__dict__.get("__getstate__") is not _getstate:
        cls.__getstate__ = _getstate  # type: ignore[method-assign]


def _getstate(self: nn.Module) -> object:
    raise error(
        f"torch.save of {type(self).__name__}",
        "a parametrized module is an instance of a class that torch creates at run time, which "
        "cannot be pickled; save the state_dict instead.",
        fix="torch.save(model.state_dict()), then apply the same rules to a new model and "
        "load_state_dict; or save a baked copy: "
        "torch.save(mp.remove_parametrizations(copy.deepcopy(model))).",
    )


def remember_key_order(module: nn.Module) -> None:
    """Record the module's parameter and buffer order, unless an earlier constraint did."""
    if _KEY_ORDER not in module.__dict__:
        order = {"parameters": tuple(module._parameters), "buffers": tuple(module._buffers)}
        object.__setattr__(module, _KEY_ORDER, order)


def restore_key_order(module: nn.Module) -> None:
    """Put the module's parameters and buffers back in their recorded order.

    Names recorded first, in their order; names maskparam's removal left that were not there
    (none, normally) after them. The record is dropped once no maskparam constraint is left.
    """
    order: dict[str, tuple[str, ...]] | None = module.__dict__.get(_KEY_ORDER)
    if order is None:
        return
    for kind in ("parameters", "buffers"):
        tensors: dict[str, Any] = module._parameters if kind == "parameters" else module._buffers
        recorded = [name for name in order[kind] if name in tensors]
        seen = set(recorded)
        names = [*recorded, *(name for name in tensors if name not in seen)]
        reordered = {name: tensors[name] for name in names}
        tensors.clear()
        tensors.update(reordered)
    if not any(maskparam_constraints(module, name) for name in parametrized_names(module)):
        del module.__dict__[_KEY_ORDER]


def walk_stack(
    module: nn.Module, tensor_name: str, *, through: int | None = None
) -> tuple[list[tuple[nn.Module, Tensor]], Tensor]:
    """The one walk of a parametrization stack: each parametrization on
    ``module.<tensor_name>`` in order with the value entering it (the stored original for the
    first), and the value the last one walked outputs; ``through`` stops after that level. No
    gradient: the value a constraint sees is what the ones before it output."""
    plist = parametrization_list(module, tensor_name)
    value: Tensor = plist.original
    levels: list[tuple[nn.Module, Tensor]] = []
    with torch.no_grad():
        for position, parametrization in enumerate(plist):
            levels.append((parametrization, value))
            value = parametrization(value)
            if position == through:
                break
    return levels, value
