"""``update_masks``: new masks for tensors maskparam already constrains, in place.

Gradual pruning and dynamic sparse training change a mask many times while the optimizer keeps
going. Removing and applying again would re-register the parametrization, and the optimizer's
state would then belong to other entries. This keeps the constraint modules and the stored
Parameter objects. It changes only the masks, the entries that change sides and their state.

Like :func:`~maskparam.apply_mask`, it works in two steps:

1. *plan*: select the tensors and compute every new mask (one ranking per rule for a joint
   generator such as :func:`maskparam.masks.global_magnitude`), checking everything;
2. *commit*: write the masks, and move or reset what changes side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _optimizer_guard, masks
from maskparam._apply import _no_match_error, _selects
from maskparam._selectors import Selector, check_selector, describe, is_exact_name
from maskparam._tensors import TensorRef, find_tensors
from maskparam._torch_parametrize import parametrization_list
from maskparam.constraints.base import Constraint
from maskparam.constraints.compact import CompactScatter
from maskparam.constraints.freeze import Freeze, FreezeEntries, FreezeSlices
from maskparam.constraints.mask import Mask, MaskMultiply
from maskparam.constraints.triangular import TriangularPart
from maskparam.errors import check_bool, check_module, error
from maskparam.masks import MaskSource

__all__ = ["MaskRules", "update_masks"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)
MaskRules: TypeAlias = Mapping[Selector, MaskSource | Mask | Freeze]

# Constraints an updated one may stand behind: each passes every entry of its input through or
# fixes it, so the stored original still holds each entry the updated constraint sees.
_SELECTIONS = (MaskMultiply, FreezeEntries, FreezeSlices, CompactScatter, TriangularPart)


def _selects_what(constraint: nn.Module) -> str | None:
    """``"mask"`` (its mask selects the kept entries), ``"freeze"`` (the frozen ones), or None
    for a constraint without a mask to update."""
    if isinstance(constraint, MaskMultiply):
        return "mask"
    if isinstance(constraint, FreezeEntries):
        return "freeze"
    if isinstance(constraint, CompactScatter):
        return constraint.selects
    return None


@dataclass
class _Update:
    ref: TensorRef
    level: int  # the constraint's position in the tensor's ParametrizationList
    constraint: Constraint
    selects: str
    source: MaskSource
    before: Tensor  # the tensor as the constraint outputs it now
    selected: Tensor | None = None  # the new mask, bool, broadcastable to ``before``


def update_masks(model: ModuleT, rules: MaskRules, *, strict: bool = True) -> ModuleT:
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

    A tensor selected by a wildcard without a ``Mask`` or ``Freeze(mask)`` constraint is passed
    over. Naming one exactly is an error. Fresh state reaches the optimizers that have stepped
    since the first :func:`~maskparam.apply_mask`. Everything is checked before anything
    changes.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> _ = mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5))})
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> _ = mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.75)})
    >>> sum(int((layer.weight == 0).sum()) for layer in model)
    96
    """
    check_module(model, "update_masks")
    check_bool(strict, "update_masks", "strict")
    if parametrize._cache_enabled:
        raise error(
            "update_masks",
            "called inside torch.nn.utils.parametrize.cached(), whose cache keeps serving the "
            "tensors computed with the old masks until the context exits.",
            fix="update the masks outside the cached() block.",
        )
    updates = _plan(model, rules, strict=strict)
    for update in updates:
        _commit(update)
    return model


def _rule_value(selector: Selector, value: object) -> tuple[str | None, MaskSource]:
    """(which constraint the rule updates: "mask", "freeze" or None for the only one, source)."""
    if isinstance(value, Mask):
        return "mask", value.mask
    if isinstance(value, Freeze):
        if value.mask is None:
            raise error(
                f"rule {describe(selector)}",
                "update_masks takes a Freeze with a mask; Freeze(dim=..., index=...) freezes "
                "slices, which it does not update.",
                fix="pass mp.Freeze(mask), or remove_parametrizations and apply_mask again.",
            )
        return "freeze", value.mask
    if isinstance(value, (Tensor, masks.MaskGenerator)) or callable(value):
        return None, value
    raise error(
        f"rule {describe(selector)}",
        f"update_masks maps selectors to a mask source, mp.Mask(source) or mp.Freeze(source); "
        f"got a {type(value).__name__}.",
        fix="pass e.g. {'*.weight': mp.masks.global_magnitude(0.9)}.",
    )


def _plan(model: nn.Module, rules: MaskRules, *, strict: bool) -> list[_Update]:
    if not isinstance(rules, Mapping):
        raise error(
            "update_masks",
            f"rules must be a mapping from selectors to mask sources; got a "
            f"{type(rules).__name__}.",
            fix="pass e.g. {'*.weight': mp.masks.global_magnitude(0.9)}.",
        )
    refs = find_tensors(model)
    by_name = {name: ref for ref in refs for name in ref.all_names}
    chosen: dict[int, Selector] = {}
    updates: list[_Update] = []
    for selector, value in rules.items():
        check_selector(selector)
        wanted, source = _rule_value(selector, value)
        exact = is_exact_name(selector)
        if exact:
            found = by_name.get(selector) if isinstance(selector, str) else None
            selected = [found] if found is not None else []
        else:
            selected = [ref for ref in refs if _selects(selector, ref)]
        rule_updates = []
        for ref in selected:
            located = _locate(ref, selector, wanted, exact=exact)
            if located is None:
                continue
            if id(ref) in chosen:
                raise error(
                    repr(ref.name),
                    f"selected by two rules, {describe(chosen[id(ref)])} and {describe(selector)}.",
                    fix="select each tensor with one rule.",
                )
            chosen[id(ref)] = selector
            level, constraint, selects = located
            rule_updates.append(
                _Update(ref, level, constraint, selects, source, _output(ref, level))
            )
        if not rule_updates and strict:
            if exact and not selected:
                raise _no_match_error(model, selector, refs, skipped=0)
            raise error(
                f"rule {describe(selector)}",
                "matched no tensor that Mask or Freeze(mask) constrains.",
                fix="apply_mask the tensors first, correct the selector, or pass strict=False.",
            )
        _select(rule_updates)
        updates += rule_updates
    return updates


def _locate(
    ref: TensorRef, selector: Selector, wanted: str | None, *, exact: bool
) -> tuple[int, Constraint, str] | None:
    """The constraint of ``ref`` this rule updates: (its level, it, what it selects); None where
    a wildcard passes over the tensor."""
    plist = list(parametrization_list(ref.module, ref.local_name)) if ref.is_parametrized else []
    found = [
        (level, p, what)
        for level, p in enumerate(plist)
        if (what := _selects_what(p)) is not None and wanted in (None, what)
    ]
    if not found:
        if not exact:
            return None
        kinds = ", ".join(_described(p) for p in plist) or "no constraint"
        raise error(
            f"rule {describe(selector)}",
            f"{ref.name!r} has {kinds}; update_masks updates "
            f"{'a ' + wanted.capitalize() if wanted else 'a Mask or Freeze(mask)'} constraint.",
            fix="apply_mask it first (mp.Mask(...) or mp.Freeze(mask)), or correct the selector.",
        )
    if len(found) > 1:
        raise error(
            repr(ref.name),
            f"it has {len(found)} constraints whose masks could be updated.",
            fix="say which: map the selector to mp.Mask(source) or mp.Freeze(source).",
        )
    level, constraint, what = found[0]
    earlier = [p for p in plist[:level] if not isinstance(p, _SELECTIONS)]
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
    return level, constraint, what  # type: ignore[return-value]  # a Constraint by _selects_what


def _described(parametrization: nn.Module) -> str:
    if isinstance(parametrization, Constraint):
        return parametrization.describe()
    return type(parametrization).__name__


def _output(ref: TensorRef, level: int) -> Tensor:
    """The tensor as the constraint at ``level`` outputs it now (no gradient)."""
    plist = parametrization_list(ref.module, ref.local_name)
    with torch.no_grad():
        value: Tensor = plist.original
        for parametrization in list(plist)[: level + 1]:
            value = parametrization(value)
    return value


def _select(updates: list[_Update]) -> None:
    """Compute the new masks of one rule's tensors (one joint call where the source is joint)."""
    if not updates:
        return
    source = updates[0].source
    if isinstance(source, masks.JointMaskGenerator):
        found = masks.build_joint_checked(source, [(u.ref.name, u.before) for u in updates])
        for update, mask in zip(updates, found, strict=True):
            update.selected = masks.as_binary(mask, update.before, _subject(update))
    else:
        for update in updates:
            update.selected = masks.resolve(source, update.before, _subject(update))


def _subject(update: _Update) -> str:
    return f"update_masks for {update.ref.name!r}"


def _commit(update: _Update) -> None:
    constraint, before = update.constraint, update.before
    assert update.selected is not None  # set by _select
    shape = before.shape
    full = update.selected.expand(shape)
    # What becomes free (trains), and what it starts from.
    if update.selects == "mask":
        now_free = full
        start = torch.zeros((), dtype=before.dtype, device=before.device).expand(shape)
    else:
        now_free = ~full
        start = before  # an unfrozen entry trains on from its frozen value
    what = masks.describe_source(update.source)
    constraint.mask_changed = True  # no longer what the rule computed at apply time
    with torch.no_grad():
        if isinstance(constraint, CompactScatter):
            _commit_compact(update, constraint, now_free, what)
            return
        was_free = constraint.free_entries(
            torch.ones(shape, dtype=torch.bool, device=before.device)
        )
        arriving = now_free & ~was_free
        if isinstance(constraint, MaskMultiply):
            constraint.mask = _fit(constraint.mask, update.selected)
            constraint.description = f"Mask(keeps {what})"
        elif isinstance(constraint, FreezeEntries):
            constraint.keep = _fit(constraint.keep, ~update.selected)
            constraint.frozen_values.copy_(torch.where(full, before, 0))
            constraint.description = f"Freeze(freezes {what})"
        _write_original(update, arriving, start)


def _commit_compact(
    update: _Update, constraint: CompactScatter, now_free: Tensor, what: str
) -> None:
    """A compact layout (the first constraint): the stored Parameter holds the new free
    entries, and every optimizer's state follows them by position."""
    stored = update.ref.storage
    before = update.before
    was = constraint.positions()
    # No optimizer seen stepping it (e.g. a deep copy of a model and its optimizer): one that
    # steps it later moves its state from the positions it holds now.
    unseen = not _optimizer_guard.seen_stepping(stored)
    if not _optimizer_guard.is_watched(stored):
        constraint.watch(stored, update.ref.name)
    if constraint.fill.numel():
        constraint.fill.copy_(torch.where(now_free, 0, before))
    assert update.selected is not None
    free = update.selected if update.selects == "mask" else ~update.selected
    constraint.free = _fit(constraint.free, free)
    now = constraint.positions(refresh=True)
    kind = "Mask(keeps" if update.selects == "mask" else "Freeze(freezes"
    constraint.description = f"{kind} {what}, compact)"
    # `before` holds each entry's value: 0 where a Mask regrows one, the frozen value where a
    # Freeze lets one go.
    values = before.reshape(-1).index_select(0, now).contiguous()
    stored.set_(values)  # type: ignore[call-overload]  # torch's stubs lack set_(Tensor)
    if stored.grad is not None and stored.grad.shape == was.shape:
        grad = torch.zeros(before.numel(), dtype=stored.grad.dtype, device=stored.grad.device)
        grad.index_copy_(0, was.to(grad.device), stored.grad)
        stored.grad = grad.index_select(0, now.to(grad.device))
    _optimizer_guard.relayout_known_state(stored)
    if unseen:
        _optimizer_guard.note_unseen_move(stored, was)
    if was.numel() != now.numel():
        _optimizer_guard.restart_flat_history(stored)


def _fit(buffer: Tensor, selected: Tensor) -> Tensor:
    """``selected`` as a uint8 0/1 mask: written into ``buffer`` where it fits its shape (the
    buffer stays the same object: DDP and a deep copy's references keep working), else new."""
    new = selected.to(device=buffer.device, dtype=torch.uint8)
    try:
        expanded = new.expand(buffer.shape)
    except RuntimeError:
        return new.contiguous()
    buffer.copy_(expanded)
    return buffer


def _write_original(update: _Update, entries: Tensor, values: Tensor) -> None:
    """Give the stored original ``values`` at ``entries`` (full shape, bool) and the optimizer
    fresh state there: the entries that become free start from these values."""
    if not bool(entries.any()):
        return
    stored = update.ref.storage
    first = parametrization_list(update.ref.module, update.ref.local_name)[0]
    if isinstance(first, CompactScatter):  # the constraint stands behind a compact one
        positions = first.positions()
        inside = entries.reshape(-1).index_select(0, positions)
        at = inside.nonzero().reshape(-1)
        stored.index_copy_(
            0, at, values.reshape(-1).index_select(0, positions[at]).to(stored.dtype)
        )
    else:
        at = entries.reshape(-1).nonzero().reshape(-1)
        stored.view(-1).index_copy_(0, at, values.reshape(-1).index_select(0, at).to(stored.dtype))
    _optimizer_guard.reset_entries(stored, at)
