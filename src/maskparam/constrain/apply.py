"""``apply_mask``: attach constraints to a model's tensors.

It works in three steps, so that bad input never leaves a half-changed model:

1. *plan*: match every rule against every tensor and check the matches;
2. *build*: let each spec validate its tensor and build its parametrization (nothing registered);
3. *register*: attach them with ``torch.nn.utils.parametrize``; should torch still refuse one,
   everything registered so far is removed again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam.constrain.distributed import refuse_ddp_wrapper
from maskparam.constrain.remove import remove_constraints
from maskparam.core.constraint import Constraint, Spec
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.load_guard import guard_loads
from maskparam.core.match import (
    Selector,
    TensorIndex,
    describe,
    match_rule,
    no_match_error,
)
from maskparam.core.optimizer import (
    Optimizers,
    as_optimizers,
    check_state_fits,
    holders,
    move_entries,
)
from maskparam.core.parametrize import (
    give_own_class,
    link_stack,
    maskparam_constraints,
    refuse_pickling,
    remember_key_order,
)
from maskparam.core.rnn import reset_flat_weights
from maskparam.core.tables import text_table
from maskparam.core.tensors import TensorRef
from maskparam.core.ties import tie_holders
from maskparam.errors import MaskparamError, check_bool, check_module, error
from maskparam.masks import generators as masks

__all__ = ["ModuleT", "Preview", "Rules", "apply_mask", "preview"]

Rules: TypeAlias = Mapping[Selector, Spec | Sequence[Spec]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass
class _Target:
    ref: TensorRef
    selector: Selector
    specs: list[Spec]


def apply_mask(
    model: ModuleT, rules: Rules, *, strict: bool = True, optimizer: Optimizers | None = None
) -> ModuleT:
    """Constrain the tensors of ``model`` that ``rules`` select; in place, returns ``model``.

    ``rules`` maps selectors (see docs/rules.md) to a spec or a list of specs; a
    list is stacked in order (each spec sees the tensor as the previous one leaves it). Each
    tensor may be selected by one rule only, and a tensor that maskparam already constrains is
    refused: to stack, put the specs in one list, or :func:`remove_parametrizations` first.

    Parameters and buffers can both be targets. Wildcards pass over tensors that cannot be
    constrained: integer and bool ones (``position_ids``, ``num_batches_tracked``) and BatchNorm's
    running statistics (updated in place); naming one exactly is an error. With
    ``strict=True`` a rule that selects nothing is an error that suggests the closest names.

    Apply before creating the optimizer. An optimizer that already trains the model may be
    passed as ``optimizer`` (one or a list): the state it holds for a tensor stored compact is
    laid out for the free entries at once, and one that cannot train a constrained tensor (it
    holds a subspace's frozen original without its θ, or treats the compact vector as a matrix)
    is refused. An optimizer that is not passed is never looked at: its state would no longer
    fit a compact tensor.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> _ = mp.apply_mask(model, {"0.weight": mp.Triangular(), "2.weight": mp.Mask(mp.masks.random(0.5))})
    >>> sorted(name for name, _ in model.named_parameters())  # doctest: +NORMALIZE_WHITESPACE
    ['0.bias', '0.parametrizations.weight.original', '2.bias', '2.parametrizations.weight.original']
    """
    check_module(model, "apply_mask")
    refuse_ddp_wrapper(model, "apply_mask")
    refuse_inference_mode("apply_mask")
    check_bool(strict, "apply_mask", "strict")
    optimizers = as_optimizers(optimizer, "apply_mask")
    targets = _plan(model, rules, strict=strict)
    for target in targets:
        check_state_fits(optimizers, target.ref.storage, target.ref.name)
    _register(
        list(zip(targets, _build(model, targets, evaluate_last=False), strict=True)), optimizers
    )
    guard_loads(model)
    for target in targets:  # a load into one constrained submodule is checked first too
        for module, _ in target.ref.holders:
            guard_loads(module)
    return model


def _spec_list(selector: Selector, specs: object) -> list[Spec]:
    if isinstance(specs, Spec):
        spec_list: list[object] = [specs]
    elif isinstance(specs, (list, tuple)):
        spec_list = list(specs)
    else:
        spec_list = []
    if not spec_list or not all(isinstance(spec, Spec) for spec in spec_list):
        raise error(
            f"rule {describe(selector)}",
            f"the value must be a spec or a non-empty list of specs; got {specs!r}.",
            fix="map the selector to e.g. mp.Mask(...), or to [mp.Freeze(...), mp.Triangular()].",
        )
    return spec_list  # type: ignore[return-value]  # checked just above


def _plan(
    model: nn.Module,
    rules: Rules,
    *,
    strict: bool,
    passed_over: list[tuple[Selector, str, str]] | None = None,
) -> list[_Target]:
    if not isinstance(rules, Mapping):
        raise error(
            "apply_mask",
            f"rules must be a mapping from selectors to specs; got a {type(rules).__name__}.",
            fix="pass e.g. {'fc.weight': mp.Triangular()}.",
        )
    index = TensorIndex(model)
    existing_groups = {
        p.group_key()
        for ref in index.refs
        for p in maskparam_constraints(ref.module, ref.local_name)
        if p.group_key() is not None
    }
    targets: dict[int, _Target] = {}
    for selector, specs in rules.items():
        found = match_rule(selector, index)
        spec_list = _spec_list(selector, specs)
        for spec in spec_list:
            if spec.group_key() in existing_groups:
                raise error(
                    f"group {spec.group_key()!r}",
                    "the model already has a group of this name (from an earlier apply_mask).",
                    fix="select all of a group's tensors in one apply_mask call, or use a new name.",
                )
        if passed_over is not None:
            passed_over += [(selector, ref.name, why) for ref, why in found.passed_over]
        if not found.targets and strict:
            raise no_match_error(index, selector, skipped=len(found.passed_over))
        trainable = found.targets
        for ref in trainable:
            _check_target(ref, selector, targets)
            targets[id(ref)] = _Target(ref, selector, _resolve_layouts(ref, spec_list))
    return list(targets.values())


def _resolve_layouts(ref: TensorRef, spec_list: list[Spec]) -> list[Spec]:
    """``spec_list`` with ``layout="auto"`` turned into ``"dense"`` wherever compact is not
    possible or cannot pay; an explicit ``"compact"`` that is not possible is refused.

    Compact reshapes the stored Parameter, so it must be the first constraint of an untied
    tensor; it needs real values for the positions, and pays only through an optimizer, so only
    for a Parameter that trains. Where it is possible, the spec's build decides by density.
    """
    for spec in spec_list:
        spec.check_holder(repr(ref.name), ref.module, ref.local_name, len(spec_list))
    compact_at = [i for i, spec in enumerate(spec_list) if spec.layout in ("compact", "csr")]
    if compact_at and ref.tied:
        raise error(
            repr(ref.name),
            f"layout={spec_list[compact_at[0]].layout!r} reshapes the stored tensor, which is tied to "
            f"{', '.join(map(repr, ref.tied_names))}.",
            fix="use the dense layout for tied weights.",
        )
    if compact_at and (compact_at != [0] or ref.is_parametrized):
        raise error(
            repr(ref.name),
            f"layout={spec_list[compact_at[0]].layout!r} changes what is stored, so it must be the "
            "first parametrization of "
            "the tensor" + (" (this one already has one)." if ref.is_parametrized else "."),
            fix="put the compact spec first in the list, or use the dense layout.",
        )
    storage = ref.storage
    compact_possible = (
        not ref.tied
        and not ref.is_parametrized
        and not storage.is_meta
        and isinstance(storage, nn.Parameter)
        and storage.requires_grad
    )
    return [
        spec
        if spec.layout != "auto" or (i == 0 and compact_possible)
        else dataclasses.replace(spec, layout="dense")  # type: ignore[type-var]
        for i, spec in enumerate(spec_list)
    ]


def _check_target(ref: TensorRef, selector: Selector, targets: dict[int, _Target]) -> None:
    earlier = targets.get(id(ref))
    if earlier is not None:
        raise error(
            repr(ref.name),
            f"selected by two rules, {describe(earlier.selector)} and {describe(selector)}.",
            fix="select each tensor with one rule; to stack constraints, map it to a list of specs.",
        )
    if ref.local_aliases:
        names = ", ".join(repr(a) for a in [ref.local_name, *ref.local_aliases])
        raise error(
            repr(ref.name),
            f"this Parameter is registered under several names of one module ({names}): a "
            "constraint can replace only one of them, and the others would stay unconstrained.",
            fix="keep one name (e.g. del module.<alias> and use a property for the other).",
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
    for module, local in ref.holders:
        if isinstance(module, nn.Embedding) and module.sparse and local == "weight":
            raise error(
                repr(ref.name),
                "nn.Embedding(sparse=True) produces sparse gradients, which cannot flow through a "
                "parametrization (it would fail at backward).",
                fix="build the embedding with sparse=False (and a dense optimizer).",
            )


def _build(
    model: nn.Module, targets: list[_Target], *, evaluate_last: bool
) -> list[list[Constraint]]:
    """Build every target's stack level by level; specs with a group key are built together.

    Each level but the last is evaluated on its input, for the next level to see its output; the
    last only with ``evaluate_last`` (:func:`preview`): :func:`apply_mask`'s registration
    evaluates it anyway, and twice would be a second pass over every weight.
    """
    built: list[list[Constraint]] = [[] for _ in targets]
    values = [target.ref.value for target in targets]
    group_levels: dict[str, int] = {}
    with torch.no_grad():
        for level in range(max((len(t.specs) for t in targets), default=0)):
            groups: dict[str, list[int]] = {}
            joint: dict[int, list[int]] = {}  # id(selector) -> targets of a joint generator
            for i, target in enumerate(targets):
                if level >= len(target.specs):
                    continue
                spec = target.specs[level]
                key = spec.group_key()
                if key is None and spec.joint_source() is not None:
                    joint.setdefault(id(target.selector), []).append(i)
                elif key is None:
                    built[i].append(_built(spec, target.ref.name, values[i]))
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
                    built[i].append(_checked(specs[0], parametrization))
            for members in joint.values():
                pairs = [(targets[i].ref.name, values[i]) for i in members]
                for i, selected in zip(
                    members,
                    joint_masks(targets[members[0]].specs[level], pairs, model),
                    strict=True,
                ):
                    spec = targets[i].specs[level]
                    built[i].append(_built(spec, targets[i].ref.name, values[i], selected=selected))
            for i, target in enumerate(targets):
                if level < len(target.specs) - (0 if evaluate_last else 1):
                    # The next level sees this level's output for what it would store.
                    parametrization = built[i][level]
                    values[i] = parametrization(parametrization.right_inverse(values[i]))
    return built


def joint_masks(
    spec: Spec, members: list[tuple[str, torch.Tensor]], model: nn.Module
) -> list[torch.Tensor]:
    """The masks ``spec``'s joint generator selects for ``members`` (every tensor of its rule at
    one level, in ``model``)."""
    source = spec.joint_source()
    assert source is not None  # grouped by it
    return masks.build_joint_checked(source, members, model=model)


def _built(
    spec: Spec, name: str, tensor: torch.Tensor, *, selected: torch.Tensor | None = None
) -> Constraint:
    """``spec.build`` with anything but a MaskparamError turned into one naming the tensor."""
    try:
        if selected is None:
            built = spec.build(name, tensor)
        else:
            built = spec.build_selected(name, tensor, selected)
    except MaskparamError:
        raise
    except Exception as failure:
        raise error(
            f"{type(spec).__name__} for {name!r}",
            f"its build raised {type(failure).__name__}: {failure}",
            fix="fix the spec (a spec of your own implements build(name, tensor) -> Constraint).",
        ) from failure
    return _checked(spec, built)


def _checked(spec: Spec, built: object) -> Constraint:
    if isinstance(built, Constraint):
        missing = [
            m for m in ("pins", "describe") if getattr(type(built), m) is getattr(Constraint, m)
        ]
        if missing:
            raise error(
                f"{type(spec).__name__}.build",
                f"returned a {type(built).__name__} without {' and '.join(missing)}: mp.verify "
                "and mp.summary need the constraint's invariant and description.",
                fix="implement pins(value) -> Pins | None and describe() -> str.",
            )
    if not isinstance(built, Constraint):
        raise error(
            f"{type(spec).__name__}.build",
            f"returned a {type(built).__name__}, not a maskparam Constraint.",
            fix="subclass mp.Constraint for the module your spec builds (see docs/extending.md).",
        )
    return built


def _register(
    built: list[tuple[_Target, list[Constraint]]], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    touched: list[TensorRef] = []
    # A compact layout shrinks the stored Parameter in place: keep its full values for a
    # rollback. An alias, not a copy: torch's registration points the Parameter at new storage
    # (set_, or swap_tensors) and never writes into the old one, which the alias keeps alive
    # until apply returns. A clone was a full extra copy of every compact weight (memory and a
    # pass over them); the alias also gives a rollback the very storage it had, views included.
    full_values = {
        id(target.ref): target.ref.storage.detach()
        for target, constraints in built
        if constraints[0].reshapes_original
    }
    full_grads = {
        id(target.ref): target.ref.storage.grad
        for target, constraints in built
        if constraints[0].reshapes_original
    }
    full_shapes = {id(target.ref): target.ref.storage.shape for target, _ in built}
    own_class_given: set[int] = set()
    failing: TensorRef | None = None
    try:
        for target, constraints in built:
            ref = target.ref
            failing = ref
            for module, _ in ref.holders:
                remember_key_order(module)
                if id(module) not in own_class_given:
                    give_own_class(module)
                    own_class_given.add(id(module))
            for constraint in constraints:
                # Tied weights: the same constraint on every module that holds the tensor, so
                # that all of them compute the same constrained tensor and the tie holds.
                for module, local in ref.holders:
                    parametrize.register_parametrization(module, local, constraint)
                    refuse_pickling(module)
                    if not touched or touched[-1] is not ref:
                        touched.append(ref)
                constraint.on_registered(ref.storage)
                constraint.awaits_state = ref.storage.is_meta and bool(constraint._buffers)
            link_stack(ref.module, ref.local_name)
            if ref.tied:  # the state_dict holds the tie once
                tie_holders(ref.holders, [ref.name, *ref.tied_names])
            _check_optimizers(ref, constraints, optimizers)
        # Once per module, now that torch has injected its class: ours adds the __setattr__
        # that lets `module.weight = nn.Parameter(w)` go through the constraint, and makes an
        # RNN compute with its constrained weights (see _rnn).
        done: set[int] = set()
        for target, _ in built:
            for module, _local in target.ref.holders:
                if id(module) not in done:
                    give_own_class(module)
                    refuse_pickling(module)
                    reset_flat_weights(module)  # an RNN's list holds the constrained tensors
                    done.add(id(module))
        for target, constraints in built:  # nothing can fail now: state follows the layout
            positions = constraints[0].stored_positions()
            if positions is not None:
                shape = full_shapes[id(target.ref)]
                move_entries(
                    optimizers, target.ref.storage, was=None, now=positions, full_shape=shape
                )
    except Exception as failure:
        # Dense layouts store the tensor unchanged, so removing without baking restores each
        # original; a compact one gets its full values back.
        for ref in reversed(touched):
            for module, local in ref.holders:
                if maskparam_constraints(module, local):
                    remove_constraints(module, local, leave_parametrized=False)
            if id(ref) in full_values:
                stored = getattr(ref.module, ref.local_name)
                with torch.no_grad():
                    stored.set_(full_values[id(ref)])
                stored.grad = full_grads[id(ref)]  # compacted at registration: the full one back
        if isinstance(failure, MaskparamError):
            raise
        raise error(
            repr(failing.name) if failing is not None else "apply_mask",
            f"torch refused the parametrization ({type(failure).__name__}: {failure}); "
            "everything registered so far was removed again.",
            fix="a constraint's forward must run on its input and return a tensor of the "
            "input's shape and dtype.",
        ) from failure


def _check_optimizers(
    ref: TensorRef, constraints: list[Constraint], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Refuse an optimizer passed to apply_mask that cannot train the constrained tensor."""
    stored = ref.storage
    for optimizer, _ in holders(optimizers, stored):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for constraint in constraints:
            problem = constraint.optimizer_problem(optimizer)
            if problem:
                raise error(repr(ref.name), problem[0], fix=problem[1])
            added = constraint.trained_parameters()
            # Only where the constraint froze the original (a subspace): an optimizer holding it
            # without what trains instead trains nothing. Learnable scores may live in an
            # optimizer of their own.
            if added and not stored.requires_grad and not any(id(p) in held for p in added):
                raise error(
                    repr(ref.name),
                    f"this {type(optimizer).__name__} holds the tensor's original, which its "
                    f"{constraint.describe()} froze, but not the parameters that train instead: "
                    "it would train nothing here.",
                    fix="create the optimizer after apply_mask, or add the new parameters: "
                    "optimizer.add_param_group({'params': [...]}).",
                )


@dataclass(frozen=True)
class Preview:
    """What :func:`preview` found: the tensors each rule would constrain, and those it passes over.

    ``selected``: (tensor name, rule, specs) per tensor; ``passed_over``: (rule, tensor name, why).
    ``str(preview)`` is a readable table.
    """

    selected: tuple[tuple[str, str, str], ...]
    passed_over: tuple[tuple[str, str, str], ...]

    def __str__(self) -> str:
        lines = [text_table(("tensor", "rule", "specs"), self.selected, left=3)]
        if self.passed_over:
            lines += ["", "passed over:"]
            lines.append(text_table(("rule", "tensor", "why"), self.passed_over, left=3))
        return "\n".join(lines)


def preview(model: nn.Module, rules: Rules, *, strict: bool = True) -> Preview:
    """A dry run of :func:`apply_mask`: the same checks (each spec is built, not registered),
    nothing changed. Says which tensors each rule would constrain and which it passes over, and why.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> found = mp.preview(model, {"1.*": mp.Mask(mp.masks.random(0.5))})
    >>> [name for name, _, _ in found.selected]
    ['1.weight', '1.bias']
    >>> [(name, why.split(":")[0]) for _, name, why in found.passed_over][-1]
    ('1.num_batches_tracked', 'has dtype torch.int64; only floating-point and complex tensors can be constrained')
    """
    check_module(model, "preview")
    refuse_inference_mode("preview")
    check_bool(strict, "preview", "strict")
    skipped: list[tuple[Selector, str, str]] = []
    targets = _plan(model, rules, strict=strict, passed_over=skipped)
    # The specs' own checks (shapes, dtypes, memory), and each constraint run once, as the
    # registration would run it; nothing is registered. In a forked RNG: a mask drawn from
    # torch's generator (mp.masks.random without a seed) must not shift the apply_mask after.
    devices = sorted({t.ref.storage.device.index or 0 for t in targets if t.ref.storage.is_cuda})
    with torch.random.fork_rng(devices=devices):
        _build(model, targets, evaluate_last=True)
    selected = tuple(
        (t.ref.name, describe(t.selector), " + ".join(repr(spec) for spec in t.specs))
        for t in targets
    )
    passed = tuple((describe(sel), name, why) for sel, name, why in skipped)
    return Preview(selected, passed)
