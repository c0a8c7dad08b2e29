"""``update_masks``: new masks for tensors maskparam already constrains, in place.

Gradual pruning and dynamic sparse training change a mask many times while the optimizer keeps
going. Removing and applying again would re-register the parametrization, and the optimizer's
state would then belong to other entries. This keeps the constraint modules and the stored
Parameter objects. It changes only the masks, the entries that change sides and their state.

Like :func:`~maskparam.apply_mask`, it works in two steps:

1. *plan*: match the rules, compute every new mask (one ranking per rule for a joint generator
   such as :func:`maskparam.masks.global_magnitude`) and check everything, the optimizers'
   state included;
2. *commit*: each constraint takes its mask (:meth:`~maskparam.Constraint.take_mask`); the
   stored entries and the optimizers' state follow what changed side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam.core.constraint import Constraint, MaskChange, Spec
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.match import Selector, TensorIndex, describe, match_rule, no_match_error
from maskparam.core.optimizer import (
    UNSET,
    Optimizers,
    as_optimizers,
    check_state_fits,
    holders,
    move_entries,
    reset_entries,
)
from maskparam.core.parametrize import parametrization_list, walk_stack
from maskparam.core.positions import stored_indices, to_full, to_stored
from maskparam.core.tensors import TensorRef
from maskparam.errors import check_bool, check_module, error
from maskparam.masks import generators as masks
from maskparam.masks.generators import MaskSource

__all__ = [
    "MaskRules",
    "MaskUpdate",
    "check_optimizers",
    "commit_update",
    "plan_updates",
    "run_update",
    "update_masks",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)
MaskRules: TypeAlias = Mapping[Selector, MaskSource | Spec]


@dataclass
class MaskUpdate:
    """One tensor's planned new mask."""

    ref: TensorRef
    level: int  # the constraint's position in the tensor's ParametrizationList
    constraint: Constraint
    source: MaskSource
    current: Tensor  # the tensor as the constraint outputs it now
    selected: Tensor | None = None  # the new mask, bool, broadcastable to ``current``
    free_after: Tensor | None = None  # the entries it leaves free, the tensor's shape

    def select(self, selected: Tensor) -> None:
        """Plan ``selected`` as the new mask; the constraint refuses one it cannot take."""
        self.selected = selected
        self.free_after = self.constraint.free_for_mask(selected).expand(self.current.shape)

    def changes_storage(self) -> bool:
        """Whether the stored entries or their optimizer state must change: entries become
        free, or a layout that stores positions stores others."""
        assert self.free_after is not None  # planned
        ones = torch.ones(self.current.shape, dtype=torch.bool, device=self.current.device)
        before = self.constraint.free_entries(ones)
        if self.constraint.stored_positions() is not None:
            return not torch.equal(self.free_after, before)
        return bool((self.free_after & ~before).any())


def update_masks(
    model: ModuleT, rules: MaskRules, *, optimizer: Optimizers | None = UNSET, strict: bool = True
) -> ModuleT:
    """Recompute the masks of tensors that ``Mask`` or ``Freeze(mask)`` already constrains; in
    place, returns ``model``.

    ``rules`` maps selectors to a mask source (any that :class:`~maskparam.Mask` takes: a
    generator such as :func:`maskparam.masks.global_magnitude`, a tensor or a callable), or to
    ``mp.Mask(source)`` / ``mp.Freeze(source)`` to say which constraint of a stack to update.
    The generator sees the tensor as the constraint outputs it now: pruned entries are zero, so
    they rank lowest and stay pruned while the sparsity grows.

    The constraint modules and the stored Parameter objects stay the same, so the optimizer
    keeps going, and the constraint is exact from the next forward. Entries that change side:

    * ``Mask``: a pruned entry becomes exactly 0. A *regrown* entry starts from 0 with fresh
      optimizer state, as dynamic sparse training expects. Fresh state is zeros, or what torch's
      optimizer starts from (Rprop's step size, Adagrad's initial accumulator).
    * ``Freeze``: a newly frozen entry holds its current value, bit for bit. An unfrozen entry
      trains on from its frozen value, with fresh optimizer state.
    * A compact layout stays compact. It shrinks or grows to the new number of free entries,
      and the optimizer state follows each entry by position. A dense layout stays dense.
      LBFGS, whose history is one flat vector over all its parameters, restarts it when a
      compact tensor changes size.

    ``optimizer``: the optimizer (or list of them) that trains these tensors; its state is laid
    out at once for the entries that change side. Where an update changes what is stored
    (entries become free, or a compact tensor stores others), leaving it out is refused:
    maskparam does not know which optimizers exist. Pass ``optimizer=None`` where none holds
    state for these tensors (pruning before training, or a new optimizer afterwards).

    A tensor selected by a wildcard without a ``Mask`` or ``Freeze(mask)`` constraint is passed
    over. Naming one exactly is an error. Everything is checked before anything changes.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> _ = mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5))})
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> _ = mp.update_masks(
    ...     model, {"*.weight": mp.masks.global_magnitude(0.75)}, optimizer=optimizer
    ... )
    >>> sum(int((layer.weight == 0).sum()) for layer in model)
    96
    """
    refuse_inference_mode("update_masks")
    check_module(model, "update_masks")
    check_bool(strict, "update_masks", "strict")
    run_update(model, rules, optimizer=optimizer, strict=strict, caller="update_masks")
    return model


def run_update(
    model: nn.Module,
    rules: MaskRules,
    *,
    optimizer: Optimizers | None,
    strict: bool,
    caller: str,
) -> None:
    """:func:`update_masks` for ``caller`` (named in its refusals): plan, check, commit."""
    if parametrize._cache_enabled:
        raise error(
            "update_masks",
            "called inside torch.nn.utils.parametrize.cached(), whose cache keeps serving the "
            "tensors computed with the old masks until the context exits.",
            fix="update the masks outside the cached() block.",
        )
    optimizers = [] if optimizer is UNSET else as_optimizers(optimizer, caller)
    updates = plan_updates(model, rules, strict=strict)
    check_optimizers(updates, optimizers, given=optimizer is not UNSET, caller=caller)
    for update in updates:
        commit_update(update, optimizers)


def check_optimizers(
    updates: Sequence[MaskUpdate],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    given: bool,
    caller: str,
) -> None:
    """Refuse, before anything changes, an update whose optimizer state is unknown or unfit."""
    for update in updates:
        stored = update.ref.storage
        if not given and stored.requires_grad and update.changes_storage():
            raise error(
                repr(update.ref.name),
                "the new mask changes what is stored (entries become free, or the compact "
                "layout stores others), and the state of the optimizer that trains it must "
                "follow, but no optimizer was passed.",
                fix=f"pass the optimizer: {caller}(..., optimizer=optimizer)"
                + (" or set its .optimizer" if caller == "GradualPruning" else "")
                + "; optimizer=None where no optimizer holds state for these tensors.",
            )
        check_state_fits(optimizers, stored, update.ref.name)
        for holder, _ in holders(optimizers, stored):
            problem = update.constraint.optimizer_problem(holder)
            if problem:
                raise error(repr(update.ref.name), problem[0], fix=problem[1])


def _rule_value(selector: Selector, value: object) -> tuple[Spec | None, MaskSource]:
    """(the spec that says which constraint the rule updates, or None for the only one; the
    source)."""
    if isinstance(value, Spec):
        return value, value.mask_source(describe(selector))
    if isinstance(value, (Tensor, masks.MaskGenerator)) or callable(value):
        return None, value
    raise error(
        f"rule {describe(selector)}",
        f"update_masks maps selectors to a mask source, mp.Mask(source) or mp.Freeze(source); "
        f"got a {type(value).__name__}.",
        fix="pass e.g. {'*.weight': mp.masks.global_magnitude(0.9)}.",
    )


def plan_updates(model: nn.Module, rules: MaskRules, *, strict: bool) -> list[MaskUpdate]:
    """Match ``rules`` and compute every new mask; nothing changes."""
    if not isinstance(rules, Mapping):
        raise error(
            "update_masks",
            f"rules must be a mapping from selectors to mask sources; got a "
            f"{type(rules).__name__}.",
            fix="pass e.g. {'*.weight': mp.masks.global_magnitude(0.9)}.",
        )
    index = TensorIndex(model)
    chosen: dict[int, Selector] = {}
    updates: list[MaskUpdate] = []
    for selector, value in rules.items():
        found = match_rule(selector, index)
        wanted, source = _rule_value(selector, value)
        rule_updates = []
        for ref in found.targets:
            located = _locate(ref, selector, wanted, exact=found.exact)
            if located is None:
                continue
            if id(ref) in chosen:
                raise error(
                    repr(ref.name),
                    f"selected by two rules, {describe(chosen[id(ref)])} and {describe(selector)}.",
                    fix="select each tensor with one rule.",
                )
            chosen[id(ref)] = selector
            level, constraint = located
            _, current = walk_stack(ref.module, ref.local_name, through=level)
            rule_updates.append(MaskUpdate(ref, level, constraint, source, current))
        if not rule_updates and strict:
            if found.exact and not found.targets:
                raise no_match_error(index, selector, skipped=0)
            raise error(
                f"rule {describe(selector)}",
                "matched no tensor that Mask or Freeze(mask) constrains.",
                fix="apply_mask the tensors first, correct the selector, or pass strict=False.",
            )
        _select(rule_updates)
        updates += rule_updates
    return updates


def _locate(
    ref: TensorRef, selector: Selector, wanted: Spec | None, *, exact: bool
) -> tuple[int, Constraint] | None:
    """The constraint of ``ref`` this rule updates, and its level; None where a wildcard passes
    over the tensor."""
    plist = list(parametrization_list(ref.module, ref.local_name)) if ref.is_parametrized else []
    found = [
        (level, p)
        for level, p in enumerate(plist)
        if isinstance(p, Constraint)
        and p.mask_spec is not None
        and (wanted is None or wanted.updates(p))
    ]
    if not found:
        if not exact:
            return None
        kinds = ", ".join(_described(p) for p in plist) or "no constraint"
        which = f"a {type(wanted).__name__}" if wanted else "a Mask or Freeze(mask)"
        raise error(
            f"rule {describe(selector)}",
            f"{ref.name!r} has {kinds}; update_masks updates {which} constraint.",
            fix="apply_mask it first (mp.Mask(...) or mp.Freeze(mask)), or correct the selector.",
        )
    if len(found) > 1:
        raise error(
            repr(ref.name),
            f"it has {len(found)} constraints whose masks could be updated.",
            fix="say which: map the selector to mp.Mask(source) or mp.Freeze(source).",
        )
    level, constraint = found[0]
    earlier = [p for p in plist[:level] if not getattr(p, "selects_entries", False)]
    if earlier:
        raise error(
            repr(ref.name),
            f"its {_described(constraint)} stands behind {_described(earlier[0])}: an entry "
            "that changes side could not be given its new value in the stored original.",
            fix="update masks that stand first, or behind other Mask, Freeze or Triangular "
            "constraints only.",
        )
    if constraint.awaits_state or ref.storage.is_meta:
        raise error(
            repr(ref.name),
            "its constraint holds no real mask yet (built on the meta device).",
            fix="load the checkpoint (or to_empty and apply again) before updating masks.",
        )
    return level, constraint


def _described(parametrization: nn.Module) -> str:
    if isinstance(parametrization, Constraint):
        return parametrization.describe()
    return type(parametrization).__name__


def _select(updates: list[MaskUpdate]) -> None:
    """Compute the new masks of one rule's tensors (one joint call where the source is joint)."""
    if not updates:
        return
    source = updates[0].source
    if isinstance(source, masks.JointMaskGenerator):
        found = masks.build_joint_checked(source, [(u.ref.name, u.current) for u in updates])
        for update, mask in zip(updates, found, strict=True):
            update.select(masks.as_binary(mask, update.current, _subject(update)))
    else:
        for update in updates:
            update.select(masks.resolve(source, update.current, _subject(update)))


def _subject(update: MaskUpdate) -> str:
    return f"update_masks for {update.ref.name!r}"


def commit_update(update: MaskUpdate, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Give the constraint its new mask; the stored entries, their gradient and the
    optimizers' state follow what changed side. Checked beforehand (:func:`plan_updates`)."""
    constraint, ref = update.constraint, update.ref
    assert update.selected is not None  # set by _select
    stored = ref.storage
    shape = update.current.shape
    was = constraint.stored_positions()
    with torch.no_grad():
        change = _full(
            constraint.take_mask(
                update.selected, update.current, masks.describe_source(update.source)
            ),
            shape,
            ref.name,
        )
        constraint.mask_changed = True  # no longer what the rule computed at apply time
        now = constraint.stored_positions()
        if was is not None and now is not None:  # it stores positions: the stored entries move
            stored.set_(to_stored(change.start, now).to(stored.dtype))  # type: ignore[call-overload]
            if stored.grad is not None and stored.grad.shape == was.shape:
                stored.grad = to_stored(to_full(stored.grad, was, shape), now)
            move_entries(optimizers, stored, was=was, now=now, full_shape=shape)
            return
        _write_arriving(update, change.arriving, change.start, optimizers)


def _full(change: MaskChange, shape: torch.Size, name: str) -> MaskChange:
    """``change`` with each tensor of the tensor's full ``shape`` (a constraint may return masks
    that broadcast to it, such as one per row)."""
    try:
        return MaskChange(
            change.free_before.expand(shape).to(torch.bool),
            change.free_after.expand(shape).to(torch.bool),
            change.start.expand(shape),
        )
    except (RuntimeError, AttributeError) as failure:
        raise error(
            repr(name),
            f"its constraint's take_mask returned a MaskChange that does not fit the tensor's "
            f"shape {tuple(shape)} ({failure}).",
            fix="return bool masks and start values of the tensor's shape (or broadcastable).",
        ) from failure


def _write_arriving(
    update: MaskUpdate,
    arriving: Tensor,
    start: Tensor,
    optimizers: Sequence[torch.optim.Optimizer],
) -> None:
    """The entries that become free take their start values in the stored original (through a
    first constraint that stores positions), with fresh optimizer state."""
    if not bool(arriving.any()):
        return
    stored = update.ref.storage
    first = parametrization_list(update.ref.module, update.ref.local_name)[0]
    positions = first.stored_positions() if isinstance(first, Constraint) else None
    at = stored_indices(arriving, positions)
    values = start.reshape(-1) if positions is None else to_stored(start, positions)
    stored.view(-1).index_copy_(0, at, values.index_select(0, at).to(stored.dtype))
    reset_entries(optimizers, stored, at)
