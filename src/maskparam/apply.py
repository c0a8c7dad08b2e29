"""``apply_mask`` and ``remove_parametrizations``: attach constraints to a model, and bake them.

``apply_mask`` works in three steps, so that bad input never leaves a half-changed model:

1. *plan*: match every rule against every tensor and check the matches;
2. *build*: let each spec validate its tensor and build its parametrization (nothing registered);
3. *register*: attach them with ``torch.nn.utils.parametrize``; should torch still refuse one,
   everything registered so far is removed again.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import optimizer_guard
from maskparam.errors import MaskparamError, error
from maskparam.parametrizations import ConstraintParametrization
from maskparam.selectors import Selector, check_selector, describe, is_exact_name, matches
from maskparam.specs import Spec
from maskparam.tensors import (
    TensorRef,
    find_tensors,
    own_parametrizations,
    parametrization_list,
    parametrized_names,
)

__all__ = ["Rules", "apply_mask", "remove_parametrizations"]

Rules: TypeAlias = Mapping[Selector, Spec | Sequence[Spec]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass
class _Target:
    ref: TensorRef
    selector: Selector
    specs: list[Spec]


def apply_mask(model: ModuleT, rules: Rules, *, strict: bool = True) -> ModuleT:
    """Constrain the tensors of ``model`` that ``rules`` select; in place, returns ``model``.

    ``rules`` maps selectors (see :mod:`maskparam.selectors`) to a spec or a list of specs; a
    list is stacked in order (each spec sees the tensor as the previous one leaves it). Each
    tensor may be selected by one rule only, and a tensor that maskparam already constrains is
    refused: to stack, put the specs in one list, or :func:`remove_parametrizations` first.

    Parameters and buffers can both be targets. Wildcards pass over tensors that cannot be
    constrained: integer and bool ones (``position_ids``, ``num_batches_tracked``) and BatchNorm's
    running statistics (updated in place); naming one exactly is an error. With
    ``strict=True`` a rule that selects nothing is an error that suggests the closest names.

    Apply before creating the optimizer: the original Parameter object stays the one the
    optimizer holds either way, but a constraint added later does not reset optimizer state.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = mp.apply_mask(model, {"0.weight": mp.Triangular(), "2.weight": mp.Mask(mp.masks.random(0.5))})
    >>> sorted(name for name, _ in model.named_parameters())  # doctest: +NORMALIZE_WHITESPACE
    ['0.bias', '0.parametrizations.weight.original', '2.bias', '2.parametrizations.weight.original']
    """
    if not isinstance(model, nn.Module):
        raise error(
            "apply_mask",
            f"the model must be a torch.nn.Module; got a {type(model).__name__}.",
            fix="pass the model itself, e.g. apply_mask(model, rules).",
        )
    targets = _plan(model, rules, strict=strict)
    _register(list(zip(targets, _build(targets), strict=True)))
    return model


def _spec_list(selector: Selector, specs: Spec | Sequence[Spec]) -> list[Spec]:
    spec_list = [specs] if isinstance(specs, Spec) else list(specs)
    if not spec_list or not all(isinstance(spec, Spec) for spec in spec_list):
        raise error(
            f"rule {describe(selector)}",
            f"the value must be a spec or a non-empty list of specs; got {specs!r}.",
            fix="map the selector to e.g. mp.Mask(...), or to [mp.Freeze(...), mp.Triangular()].",
        )
    return spec_list


def _plan(model: nn.Module, rules: Rules, *, strict: bool) -> list[_Target]:
    if not isinstance(rules, Mapping):
        raise error(
            "apply_mask",
            f"rules must be a mapping from selectors to specs; got a {type(rules).__name__}.",
            fix="pass e.g. {'fc.weight': mp.Triangular()}.",
        )
    refs = find_tensors(model)
    existing_groups = {
        p.group_name
        for ref in refs
        for p in own_parametrizations(ref.module, ref.local_name)
        if p.group_name is not None
    }
    targets: dict[int, _Target] = {}
    for selector, specs in rules.items():
        check_selector(selector)
        spec_list = _spec_list(selector, specs)
        for spec in spec_list:
            if spec.group_key() in existing_groups:
                raise error(
                    f"group {spec.group_key()!r}",
                    "the model already has a group of this name (from an earlier apply_mask).",
                    fix="select all of a group's tensors in one apply_mask call, or use a new name.",
                )
        selected = [ref for ref in refs if _selects(selector, ref)]
        trainable = [ref for ref in selected if ref.unconstrainable is None]
        if is_exact_name(selector) and len(trainable) < len(selected):
            ref = selected[0]
            raise error(
                f"rule {describe(selector)}",
                f"the tensor {ref.name!r} {ref.unconstrainable}.",
                fix="remove this rule (wildcards pass over such tensors).",
            )
        if not trainable and strict:
            raise _no_match_error(model, selector, refs, skipped=len(selected))
        for ref in trainable:
            _check_target(ref, selector, targets)
            _check_layouts(ref, spec_list)
            targets[id(ref)] = _Target(ref, selector, spec_list)
    return list(targets.values())


def _selects(selector: Selector, ref: TensorRef) -> bool:
    # Only a predicate looks at values; the others must not evaluate parametrizations.
    is_predicate = callable(selector) and not isinstance(selector, (str, re.Pattern, tuple))
    tensor = ref.value if is_predicate else ref.storage
    return matches(selector, ref.all_names, ref.module, tensor)


def _no_match_error(
    model: nn.Module, selector: Selector, refs: list[TensorRef], *, skipped: int
) -> MaskparamError:
    names = [name for ref in refs if ref.unconstrainable is None for name in ref.names]
    details = []
    if isinstance(selector, str):
        close = difflib.get_close_matches(selector, names, n=3, cutoff=0.4)
        if close:
            details.append(f"closest tensor names: {', '.join(map(repr, close))}")
    if not details:
        details.append(
            f"tensor names: {', '.join(map(repr, names[:8]))}{', ...' if len(names) > 8 else ''}"
        )
    if skipped:
        details.append(
            f"it matched {skipped} tensor(s) that cannot be constrained (integer, bool, running stats)"
        )
    return error(
        f"rule {describe(selector)}",
        f"matched no floating-point tensor in {type(model).__name__}.",
        *details,
        fix="correct the selector, or pass strict=False to allow rules that match nothing.",
    )


def _check_layouts(ref: TensorRef, spec_list: list[Spec]) -> None:
    compact_at = [i for i, spec in enumerate(spec_list) if spec.layout == "compact"]
    if compact_at and ref.tied:
        raise error(
            repr(ref.name),
            f"layout='compact' reshapes the stored tensor, which is tied to "
            f"{', '.join(map(repr, ref.tied_names))}.",
            fix="use the dense layout for tied weights.",
        )
    if compact_at and (compact_at != [0] or ref.is_parametrized):
        raise error(
            repr(ref.name),
            "layout='compact' changes what is stored, so it must be the first parametrization of "
            "the tensor" + (" (this one already has one)." if ref.is_parametrized else "."),
            fix="put the compact spec first in the list, or use the dense layout.",
        )


def _check_target(ref: TensorRef, selector: Selector, targets: dict[int, _Target]) -> None:
    earlier = targets.get(id(ref))
    if earlier is not None:
        raise error(
            repr(ref.name),
            f"selected by two rules, {describe(earlier.selector)} and {describe(selector)}.",
            fix="select each tensor with one rule; to stack constraints, map it to a list of specs.",
        )
    if ref.has_constraint:
        raise error(
            repr(ref.name),
            "maskparam already constrains this tensor (from an earlier apply_mask).",
            fix="pass all its specs as one list in one call, or call "
            "mp.remove_parametrizations(model) first.",
        )
    if ref.tied and any(parametrize.is_parametrized(m, local) for _, m, local in ref.tied):
        raise error(
            repr(ref.name),
            f"this tensor is tied to {', '.join(map(repr, ref.tied_names))}, which carries a "
            "parametrization of its own: the two sides would no longer compute the same tensor.",
            fix="remove that parametrization first, or untie the weights.",
        )
    if type(ref.storage).__name__ == "DTensor":
        raise error(
            repr(ref.name),
            "this tensor is already sharded (a DTensor: fully_shard or tensor parallelism ran "
            "first); a constraint must see the whole tensor.",
            fix="apply_mask before fully_shard / parallelize_module, then shard.",
        )
    if isinstance(ref.module, nn.RNNBase) and ref.local_name in ref.module._flat_weights_names:
        raise error(
            repr(ref.name),
            f"{type(ref.module).__name__} reads its weights from _flat_weights, so a parametrized "
            "weight would be silently ignored (pytorch issue 65688).",
            fix="leave RNN weights unconstrained, or build the RNN from nn.Linear cells.",
        )


def _build(targets: list[_Target]) -> list[list[ConstraintParametrization]]:
    """Build every target's stack level by level; specs with a group key are built together."""
    built: list[list[ConstraintParametrization]] = [[] for _ in targets]
    values = [target.ref.value for target in targets]
    group_levels: dict[str, int] = {}
    with torch.no_grad():
        for level in range(max((len(t.specs) for t in targets), default=0)):
            groups: dict[str, list[int]] = {}
            for i, target in enumerate(targets):
                if level >= len(target.specs):
                    continue
                spec = target.specs[level]
                key = spec.group_key()
                if key is None:
                    built[i].append(spec.build(target.ref.name, values[i]))
                else:
                    if group_levels.setdefault(key, level) != level:
                        raise error(
                            f"group {key!r}",
                            "its members stand at different places in their lists of specs.",
                            fix="put a grouped spec at the same position in every list (e.g. first).",
                        )
                    groups.setdefault(key, []).append(i)
            for members in groups.values():
                specs = [targets[i].specs[level] for i in members]
                pairs = [(targets[i].ref.name, values[i]) for i in members]
                for i, parametrization in zip(
                    members, specs[0].build_group(pairs, specs), strict=True
                ):
                    built[i].append(parametrization)
            for i, target in enumerate(targets):
                if level < len(target.specs):
                    # The next level sees this level's output for what it would store.
                    parametrization = built[i][level]
                    values[i] = parametrization(parametrization.right_inverse(values[i]))
    return built


def _register(built: list[tuple[_Target, list[ConstraintParametrization]]]) -> None:
    touched: list[TensorRef] = []
    # A compact layout shrinks the stored Parameter in place: keep its values for a rollback.
    full_values = {
        id(target.ref): target.ref.storage.detach().clone()
        for target, parametrizations in built
        if parametrizations[0].compact
    }
    full_shapes = {id(target.ref): target.ref.storage.shape for target, _ in built}
    try:
        for target, parametrizations in built:
            ref = target.ref
            # Removal re-registers the tensor last; remember its place to put it back there.
            parametrizations[0].slot_orders = _slot_orders(ref.module)
            for parametrization in parametrizations:
                # Tied weights: the same parametrization on every module that holds the tensor,
                # so that all of them compute the same constrained tensor and the tie holds.
                for module, local in ref.slots:
                    _own_class(module)
                    parametrize.register_parametrization(module, local, parametrization)
                    _refuse_pickling(module)
                    if not touched or touched[-1] is not ref:
                        touched.append(ref)
                parametrization.on_registered(ref.storage)
                brought = parametrization.trained_parameters()
                # Only where the constraint froze the original (a subspace): then an optimizer
                # holding it without θ is surely a mistake. Learnable scores may legitimately
                # live in an optimizer of their own.
                if brought and not ref.storage.requires_grad:
                    optimizer_guard.watch_new_parameters(ref.storage, ref.name, brought)
                if parametrization.compact:
                    optimizer_guard.watch(ref.storage, ref.name, full_shapes[id(ref)])
    except Exception:
        # Dense layouts store the tensor unchanged, so removing without baking restores each
        # original; a compact one gets its full values back.
        for ref in reversed(touched):
            for module, local in ref.slots:
                if own_parametrizations(module, local):
                    _remove_own(module, local, leave_parametrized=False)
            if id(ref) in full_values:
                with torch.no_grad():
                    getattr(ref.module, ref.local_name).set_(full_values[id(ref)])
        raise


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its properties change.

    torch injects one class per parametrized module, and ``copy.deepcopy`` (``AveragedModel``
    too) gives the copy that *same* class. ``register_parametrization`` adds a property to it and
    ``remove_parametrizations`` deletes one from it, so changing the copy would change the
    original (a removed property breaks it). A fresh subclass per change keeps them apart.
    """
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _refuse_pickling(module: nn.Module) -> None:
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


def _slot_orders(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """The module's slot orders before maskparam's first constraint on it (recorded then)."""
    for tensor_name in parametrized_names(module):
        for parametrization in own_parametrizations(module, tensor_name):
            if parametrization.slot_orders:
                return parametrization.slot_orders
    return {"parameters": tuple(module._parameters), "buffers": tuple(module._buffers)}


def _slots(module: nn.Module, is_parameter: bool) -> dict[str, Any]:
    """The module's own parameter (or buffer) dict, whose order state_dict and parameters() follow."""
    return module._parameters if is_parameter else module._buffers


def remove_parametrizations(model: ModuleT, *, leave_parametrized: bool = True) -> ModuleT:
    """Bake maskparam's constraints into plain tensors, for export; in place, returns ``model``.

    Removes only maskparam's own parametrizations: a user's ``weight_norm`` stays. Where
    maskparam was the only one on a module, the module gets back its class and its state_dict
    keys; the baked Parameter is the same object the optimizer held, and its values equal the
    effective tensor bit for bit. With ``leave_parametrized=False`` the stored originals come back
    unconstrained instead (masked entries reappear).

    >>> import torch, maskparam as mp
    >>> layer = mp.apply_mask(torch.nn.Linear(3, 3), {"weight": mp.Triangular()})
    >>> effective = layer.weight.detach().clone()
    >>> layer = mp.remove_parametrizations(layer)
    >>> type(layer).__name__, torch.equal(layer.weight, effective)
    ('Linear', True)
    """
    owners = [
        (module, tensor_name)
        for module in model.modules()
        for tensor_name in parametrized_names(module)
        if own_parametrizations(module, tensor_name)
    ]
    for module, tensor_name in owners:  # check all before changing any
        _check_removable(module, tensor_name, leave_parametrized=leave_parametrized)
    baked: set[int] = set()
    for module, tensor_name in owners:
        plist = parametrization_list(module, tensor_name)
        original = id(plist.original) if plist.is_tensor else None
        # A tied tensor is baked once; its other slots then just get the baked tensor back.
        again = original in baked
        _remove_own(module, tensor_name, leave_parametrized=leave_parametrized and not again)
        if original is not None:
            baked.add(original)
    return model


def _check_removable(module: nn.Module, tensor_name: str, *, leave_parametrized: bool) -> None:
    plist = parametrization_list(module, tensor_name)
    users = [p for p in plist if not isinstance(p, ConstraintParametrization)]
    if leave_parametrized and users and not all(hasattr(p, "right_inverse") for p in users):
        raise error(
            repr(tensor_name),
            f"baking maskparam's constraint leaves {type(users[0]).__name__} in place, which has no "
            "right_inverse to take the constrained value.",
            fix="remove that parametrization first, or pass leave_parametrized=False.",
        )


def _remove_own(module: nn.Module, tensor_name: str, *, leave_parametrized: bool) -> None:
    _own_class(module)
    plist = parametrization_list(module, tensor_name)
    own = own_parametrizations(module, tensor_name)
    original = plist.original if plist.is_tensor else None
    # A compact original holds only the free entries: the full tensor is the effective one.
    leave_parametrized = leave_parametrized or any(p.compact for p in own)
    if len(own) == len(plist):
        slot_orders = own[0].slot_orders or {}
        # torch bakes with set_(), keeping the Parameter object, and restores the class.
        parametrize.remove_parametrizations(
            module, tensor_name, leave_parametrized=leave_parametrized
        )
        is_parameter = tensor_name in module._parameters
        slots = _slots(module, is_parameter)
        order = slot_orders.get("parameters" if is_parameter else "buffers", ())
        in_place = [name for name in order if name in slots]
        later = [name for name in slots if name not in in_place]
        reordered = {name: slots[name] for name in [*in_place, *later]}
        slots.clear()
        slots.update(reordered)
        for parametrization in own:
            if original is not None:
                parametrization.on_removed(original)
        return
    # A user's parametrization stays: drop ours, then let theirs take the constrained value
    # through its right_inverse (exact when theirs is; weight_norm's is up to rounding).
    with torch.no_grad():
        effective = getattr(module, tensor_name)
        for i in reversed(range(len(plist))):
            if isinstance(plist[i], ConstraintParametrization):
                del plist[i]
        for parametrization in own:
            if original is not None:
                parametrization.on_removed(original)
        if leave_parametrized:
            plist.right_inverse(effective)
