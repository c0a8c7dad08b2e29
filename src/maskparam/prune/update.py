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

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam.constrain import distributed
from maskparam.constrain.apply import apply_mask
from maskparam.constraints.mask import Mask
from maskparam.core.constraint import Constraint, MaskChange, Spec
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.match import Selector, TensorIndex, describe, match_rule, no_match_error
from maskparam.core.optimizer import (
    UNSET,
    Optimizers,
    as_optimizers,
    check_state_fits,
    holders,
    known_elementwise,
    move_entries,
    reset_entries,
)
from maskparam.core.parametrize import link_stack, parametrization_list, walk_stack
from maskparam.core.positions import stored_indices, to_full, to_stored, write_at
from maskparam.core.tensors import TensorRef
from maskparam.core.undo import Undo
from maskparam.errors import MaskparamWarning, check_bool, check_module, error
from maskparam.masks import generators as masks
from maskparam.masks.generators import MaskSource

__all__ = [
    "MaskRules",
    "MaskUpdate",
    "NewMask",
    "check_optimizers",
    "commit_all",
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
    relayout: Constraint | None = None  # the constraint in the layout "auto" chooses now
    kept: Tensor | None = None  # what its Mask keeps now (set when the new mask is computed)
    layout_given: bool = False  # the rule's spec names a layout ("dense" or "compact")

    def select(self, selected: Tensor) -> None:
        """Plan ``selected`` as the new mask; the constraint refuses one it cannot take."""
        self.selected = selected
        self.free_after = self.constraint.free_for_mask(selected).expand(self.current.shape)

    def changes_storage(self) -> bool:
        """Whether the stored entries or their optimizer state must change: entries become
        free, or a layout that stores positions stores others."""
        assert self.free_after is not None  # planned
        if self.relayout is not None:  # the other layout stores other entries
            return True
        ones = torch.ones(self.current.shape, dtype=torch.bool, device=self.current.device)
        before = self.constraint.free_entries(ones)
        if self.constraint.stored_positions() is not None:
            return not torch.equal(self.free_after, before)
        return bool((self.free_after & ~before).any())


@dataclass
class NewMask:
    """A tensor without a mask yet that ``apply_missing=True`` masks: its planned mask."""

    ref: TensorRef
    source: MaskSource
    current: Tensor  # the tensor's value
    selected: Tensor | None = None

    def select(self, selected: Tensor) -> None:
        self.selected = selected


def update_masks(
    model: ModuleT,
    rules: MaskRules,
    *,
    optimizer: Optimizers | None = UNSET,
    strict: bool = True,
    apply_missing: bool = False,
    rewrap_ddp: bool = False,
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
    * A compact layout shrinks or grows to the new number of free entries, and the optimizer
      state follows each entry by position. A ``Mask`` whose layout ``"auto"`` chose (the
      default) is chosen again for the new density, as ``apply_mask`` would have stored it:
      pruned far enough it goes compact, regrown past it dense again (the same Parameter; the
      state follows each entry), where ``optimizer`` is given and every optimizer passed is one
      of torch's that step each entry alone (not Adafactor, Muon or one of your own); an
      explicit ``layout=`` stays (a rule's spec naming another is refused). LBFGS, whose
      history is one flat vector over all its parameters, restarts it when a tensor stores
      other entries (another size, or a compact one at other positions).

    ``optimizer``: the optimizer (or list of them) that trains these tensors; its state is laid
    out at once for the entries that change side. Where an update changes what is stored
    (entries become free, or a compact tensor stores others), leaving it out is refused:
    maskparam does not know which optimizers exist. Pass ``optimizer=None`` where none holds
    state for these tensors (pruning before training, or a new optimizer afterwards).

    A tensor selected by a wildcard without a ``Mask`` or ``Freeze(mask)`` constraint is passed
    over. Naming one exactly is an error. With ``apply_missing=True``, a selected tensor that
    has no constraint at all gets a ``Mask`` (``apply_mask``, layout ``"auto"`` for its new
    density) in the same call: one call serves every round of iterative pruning, the first
    included, and a joint generator ranks the masked and the new tensors together.

    Everything is checked before anything changes, and the call is all or nothing: if a
    tensor fails while it takes its mask, the ones before it are taken back (their masks,
    stored entries and optimizer state).

    Distributed training (``docs/integrations.md``): pass the model inside the
    ``DistributedDataParallel`` wrapper. While a process group is initialized, this is a
    collective: call it on every rank; every rank takes rank 0's new masks. A change that
    resizes a compact tensor (another number of free entries) is refused there (DDP would stop
    averaging its gradient) unless ``rewrap_ddp=True`` says that a new
    ``DistributedDataParallel`` wraps the model afterwards; the dense layout, and a compact one
    that keeps its number of free entries, need neither. A model that ``fully_shard`` sharded is
    refused.

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
    check_bool(apply_missing, "update_masks", "apply_missing")
    check_bool(rewrap_ddp, "update_masks", "rewrap_ddp")
    run_update(
        model,
        rules,
        optimizer=optimizer,
        strict=strict,
        caller="update_masks",
        apply_missing=apply_missing,
        rewrap_ddp=rewrap_ddp,
    )
    return model


def run_update(
    model: nn.Module,
    rules: MaskRules,
    *,
    optimizer: Optimizers | None,
    strict: bool,
    caller: str,
    apply_missing: bool = False,
    rewrap_ddp: bool = False,
    only_tighten: bool = False,
) -> None:
    """:func:`update_masks` for ``caller`` (named in its refusals): plan, check, commit.
    ``only_tighten``: refuse new masks that keep more entries, over all the updated tensors,
    than the masks keep now (a schedule that only raises the sparsity)."""
    refuse_inference_mode(caller)
    distributed.refuse_ddp_wrapper(model, caller)
    distributed.refuse_sharded(model, caller)
    if parametrize._cache_enabled:
        raise error(
            "update_masks",
            "called inside torch.nn.utils.parametrize.cached(), whose cache keeps serving the "
            "tensors computed with the old masks until the context exits.",
            fix="update the masks outside the cached() block.",
        )
    optimizers = [] if optimizer is UNSET else as_optimizers(optimizer, caller)
    updates, new = plan_updates(model, rules, strict=strict, apply_missing=apply_missing)
    distributed.refuse_distributed_apply(new, caller, rewrap_ddp=rewrap_ddp)
    distributed.take_rank0_masks([*updates, *new], caller)  # where a process group is initialized
    if only_tighten:
        _refuse_loosening(updates, caller)
    given = optimizer is not UNSET
    if given and (rewrap_ddp or not distributed.process_group_initialized()):
        # The layout "auto" chose is chosen again only where the caller said which optimizers
        # hold state (their state moves with it), and not behind DDP's back (a switch resizes
        # the Parameter) unless rewrap_ddp says DDP is wrapped again.
        _plan_layouts(updates, optimizers)
    check_optimizers(updates, optimizers, given=given, caller=caller)
    distributed.refuse_ddp_resize(updates, caller, rewrap_ddp=rewrap_ddp)
    trained = [n for n in new if n.ref.storage.requires_grad]
    if trained and not given:
        raise error(
            repr(trained[0].ref.name),
            "apply_missing masks this tensor now, and the state of the optimizer that trains "
            "it must follow (a compact layout stores fewer entries), but no optimizer was passed.",
            fix=f"pass the optimizer: {caller}(..., optimizer=optimizer); optimizer=None where "
            "no optimizer holds state for these tensors.",
        )
    if caller == "update_masks":  # (GradualPruning only ever raises the sparsity)
        _warn_regrowth_by_value(updates)  # once everything is checked: it will happen
    commit_all(updates, optimizers, then=lambda: _apply_new(model, new, optimizers))


def _refuse_loosening(updates: Sequence[MaskUpdate], caller: str) -> None:
    """Refuse masks that keep more entries in all than now: a schedule that only tightens asked
    for a lower sparsity than its masks have (they were tightened outside it, or its count was
    lost), and would regrow pruned entries."""
    kept = [(u.kept, u.free_after) for u in updates if u.kept is not None]
    before = sum(int(now.sum()) for now, _ in kept)
    after = sum(int(new.sum()) for _, new in kept if new is not None)
    if after > before:
        total = sum(now.numel() for now, _ in kept)
        raise error(
            caller,
            f"the masks keep {before:,} of {total:,} entries ({1 - before / total:.2%} pruned), "
            f"and this step's sparsity would keep {after:,} ({1 - after / total:.2%} pruned): "
            "the schedule is behind its masks, and pruned entries would grow back. Either the "
            "masks were tightened outside the schedule (update_masks), or its step count was "
            "lost. Nothing was changed.",
            fix="give the schedule the count of the step its masks belong to: "
            "pruning.load_state_dict({'steps': ..., 'sparsity': ...}), or pruning.step(k) with "
            "that step k; a run resumed from a checkpoint of the model gets it from there.",
        )


def _apply_new(
    model: nn.Module, new: Sequence[NewMask], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """``apply_mask`` the planned masks of tensors that had none (atomic by itself)."""
    if not new:
        return
    rules: dict[Selector, Spec] = {}
    for planned in new:
        assert planned.selected is not None  # set by _select
        rules[planned.ref.name] = Mask(planned.selected.expand(planned.current.shape).clone())
    apply_mask(model, rules, optimizer=list(optimizers))
    for planned in new:
        for p in parametrization_list(planned.ref.module, planned.ref.local_name):
            if isinstance(p, Constraint):
                # Applying the rules to the base model would not give this mask back.
                p.mask_changed = True


def commit_all(
    updates: Sequence[MaskUpdate],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    then: Callable[[], None] | None = None,
) -> None:
    """Commit every planned update, then run ``then`` (itself all or nothing), or none of it:
    a failure halfway (a constraint of your own that raises, memory) takes back what the
    earlier ones wrote, the optimizers' state included."""
    undo = Undo()
    try:
        for update in updates:
            commit_update(update, optimizers, undo)
        if then is not None:
            then()
    except BaseException:
        undo.run()
        raise


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
        trained_elsewhere = optimizers and not holders(optimizers, stored)
        if trained_elsewhere and stored.requires_grad and update.changes_storage():
            raise error(
                repr(update.ref.name),
                "the new mask changes what is stored, and its optimizer state must follow, "
                f"but none of the {len(optimizers)} optimizer(s) passed trains this tensor: "
                "the one that does would keep state for the old entries.",
                fix=f"pass every optimizer that trains it: {caller}(..., optimizer=[...]); "
                "optimizer=None where no optimizer holds state for it.",
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


def plan_updates(
    model: nn.Module, rules: MaskRules, *, strict: bool, apply_missing: bool = False
) -> tuple[list[MaskUpdate], list[NewMask]]:
    """Match ``rules`` and compute every new mask (and, with ``apply_missing``, those of the
    selected tensors without a constraint); nothing changes."""
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
    new: list[NewMask] = []
    for selector, value in rules.items():
        found = match_rule(selector, index)
        wanted, source = _rule_value(selector, value)
        rule_updates: list[MaskUpdate] = []
        rule_new: list[NewMask] = []
        for ref in found.targets:
            if apply_missing and not ref.is_parametrized:
                _claim(chosen, ref, selector)
                rule_new.append(NewMask(ref, source, ref.value.detach()))
                continue
            located = _locate(ref, selector, wanted, exact=found.exact)
            if located is None:
                continue
            _claim(chosen, ref, selector)
            level, constraint = located
            _, current = walk_stack(ref.module, ref.local_name, through=level)
            update = MaskUpdate(ref, level, constraint, source, current)
            layout = getattr(wanted, "layout", "auto")
            if wanted is not None and layout != "auto" and level == 0:
                update.layout_given = True
                now = "dense" if constraint.stored_positions() is None else "compact"
                if layout != now:
                    raise error(
                        repr(ref.name),
                        f"the rule's spec says layout={layout!r}, but the tensor is stored "
                        f"{now}, and update_masks does not switch an explicit layout.",
                        fix=f"leave layout out of the rule (layout='auto', the default, lets "
                        f"update_masks choose where apply_mask chose), or give layout={now!r}; "
                        "to store it otherwise, remove_parametrizations and apply_mask again.",
                    )
            rule_updates.append(update)
        if not rule_updates and not rule_new and strict:
            if found.exact and not found.targets:
                raise no_match_error(index, selector, skipped=0)
            raise error(
                f"rule {describe(selector)}",
                "matched no tensor that Mask or Freeze(mask) constrains.",
                fix="apply_mask the tensors first, correct the selector, or pass strict=False.",
            )
        _select([*rule_updates, *rule_new], model)
        updates += rule_updates
        new += rule_new
    return updates, new


def _claim(chosen: dict[int, Selector], ref: TensorRef, selector: Selector) -> None:
    """Record that ``selector`` selects ``ref``; a tensor two rules select is refused."""
    if id(ref) in chosen:
        raise error(
            repr(ref.name),
            f"selected by two rules, {describe(chosen[id(ref)])} and {describe(selector)}.",
            fix="select each tensor with one rule.",
        )
    chosen[id(ref)] = selector


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


def _select(updates: Sequence[MaskUpdate | NewMask], model: nn.Module) -> None:
    """Compute the new masks of one rule's tensors (one joint call where the source is joint)."""
    if not updates:
        return
    source = updates[0].source
    # What each Mask keeps now: a generator re-ranks as torch's prune does when it prunes again
    # (pruned entries stay pruned; ties among the kept ones broken among those alone).
    kept = [_kept_now(u) for u in updates]
    for update, now in zip(updates, kept, strict=True):
        if isinstance(update, MaskUpdate):
            update.kept = now
    if isinstance(source, masks.JointMaskGenerator):
        members = [(u.ref.name, u.current) for u in updates]
        known = None if any(k is None for k in kept) else [k for k in kept if k is not None]
        found = masks.build_joint_checked(source, members, kept=known, model=model)
        for update, mask in zip(updates, found, strict=True):
            update.select(masks.as_binary(mask, update.current, _subject(update)))
    else:
        for update, now in zip(updates, kept, strict=True):
            update.select(masks.resolve(source, update.current, _subject(update), kept=now))


def _kept_now(update: MaskUpdate | NewMask) -> Tensor | None:
    """The entries the tensor's Mask keeps now (all, for a tensor masked now); None for
    another constraint (a Freeze's mask says what is frozen)."""
    ones = torch.ones(update.current.shape, dtype=torch.bool, device=update.current.device)
    if isinstance(update, NewMask):
        return ones
    if update.constraint.mask_spec is not Mask:
        return None
    return update.constraint.free_entries(ones).expand(ones.shape)


def _subject(update: MaskUpdate | NewMask) -> str:
    return f"update_masks for {update.ref.name!r}"


def commit_update(
    update: MaskUpdate, optimizers: Sequence[torch.optim.Optimizer], undo: Undo
) -> None:
    """Give the constraint its new mask; the stored entries, their gradient and the
    optimizers' state follow what changed side. Checked beforehand (:func:`plan_updates`);
    every write is recorded in ``undo`` before it is made (see :func:`commit_all`)."""
    constraint, ref = update.constraint, update.ref
    assert update.selected is not None  # set by _select
    stored = ref.storage
    shape = update.current.shape
    was = constraint.stored_positions()
    # What each constraint behind this one sees now (only a stack has any).
    behind = len(parametrization_list(ref.module, ref.local_name)) > update.level + 1
    stack_before = walk_stack(ref.module, ref.local_name)[0] if behind else []
    undo.module(constraint)
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
            values = to_stored(change.start, now).to(stored.dtype)
            same = values.shape == stored.shape  # then in place: DDP's gradient hooks stay on it
            undo.storage(stored)
            if same:
                undo.values(stored)
                stored.copy_(values)
            else:
                stored.set_(values)  # type: ignore[call-overload]
            if stored.grad is not None and stored.grad.shape == was.shape:
                grad = to_stored(to_full(stored.grad, was, shape), now)
                if same:
                    undo.values(stored.grad)
                    stored.grad.copy_(grad)
                else:
                    stored.grad = grad
            move_entries(optimizers, stored, was=was, now=now, full_shape=shape, undo=undo)
        else:
            _write_arriving(update, change.arriving, change.start, optimizers, undo)
        if stack_before:
            _tell_later_levels(update, [value for _, value in stack_before], undo)
        if update.relayout is not None:
            _switch_layout(update, optimizers, undo)


def _warn_regrowth_by_value(updates: Sequence[MaskUpdate]) -> None:
    """Warn where a generator that ranks by value regrows pruned entries of a Mask: they are all
    0, so which come back is a matter of position. Mostly an absolute sparsity below the
    tensor's, meant as a fraction of what remains."""
    for update in updates:
        if not getattr(update.source, "ranks_by_value", False) or update.selected is None:
            continue
        kept = update.kept
        if kept is None:
            continue
        regrown = int((update.selected.expand(kept.shape) & ~kept).sum())
        if regrown:
            pruned = 1 - float(kept.float().mean())
            warnings.warn(
                f"update_masks: {update.ref.name!r} is {100 * pruned:.3g}% pruned; "
                f"{masks.describe_source(update.source)} asks for fewer pruned entries of the "
                f"whole tensor, so {regrown} pruned entries regrow from 0, chosen among equal "
                "zeros by position. For a fraction of what remains, pass of='remaining' "
                "(mp.masks.magnitude(0.2, of='remaining')); to regrow on purpose, use a "
                "generator that does not rank by value (mp.masks.random, a mask of your own).",
                MaskparamWarning,
                stacklevel=4,
            )


def _plan_layouts(
    updates: Sequence[MaskUpdate], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Where "auto" chose a first constraint's layout, choose again for the new density (a run
    pruned from 80% kept down to 5% goes compact, as apply_mask would have stored it), unless
    an optimizer that trains the tensor could not train the other layout (Adafactor)."""
    for update in updates:
        if update.level != 0 or update.free_after is None:
            continue
        if update.layout_given:
            continue  # the rule's spec names its layout: it stays
        twin = update.constraint.relayout(update.free_after)
        held = [o for o, _ in holders(optimizers, update.ref.storage)]
        # Only optimizers known to step each entry alone: one of your own (or Muon, Adafactor)
        # may treat a matrix as a matrix, which the other layout's vector is not.
        if twin is None:
            continue
        if all(known_elementwise(o) and not twin.optimizer_problem(o) for o in held):
            update.relayout = twin


def _switch_layout(
    update: MaskUpdate, optimizers: Sequence[torch.optim.Optimizer], undo: Undo
) -> None:
    """Swap the first constraint for its twin in the other layout: the stored Parameter (the
    same object) holds the entries as the twin stores them, its gradient and the optimizers'
    state follow each entry, and an entry the twin stores that was not stored starts fresh."""
    old, ref = update.constraint, update.ref
    assert update.free_after is not None
    # Built again now that the constraint took its mask (its description says the new one).
    twin = old.relayout(update.free_after)
    if twin is None:
        return
    stack = parametrization_list(ref.module, ref.local_name)
    stored = stack.original
    shape = update.current.shape
    was, now = old.stored_positions(), twin.stored_positions()
    full = old.to_full(stored.detach())
    if was is not None:  # going dense: in the memory format the tensor had (channels_last)
        full = full.contiguous(memory_format=old.full_memory_format() or torch.contiguous_format)
    twin.mask_changed = True
    twin.train(old.training)

    def put_back() -> None:
        stack[0] = old
        link_stack(ref.module, ref.local_name)

    undo.storage(stored)
    undo.call(put_back)
    stack[0] = twin
    link_stack(ref.module, ref.local_name)
    with torch.no_grad():
        # right_inverse, as registration stores a value: a compact twin also records the full
        # tensor's memory format for the way back.
        stored.set_(twin.right_inverse(full).to(stored.dtype))  # type: ignore[call-overload]
        if stored.grad is not None:
            stored.grad = twin.to_stored(old.to_full(stored.grad))
    move_entries(optimizers, stored, was=was, now=now, full_shape=shape, undo=undo)


def _tell_later_levels(update: MaskUpdate, inputs_before: list[Tensor], undo: Undo) -> None:
    """Each constraint behind the updated one learns where its input changed (in order, so that
    what one recaptures reaches the next): a Freeze behind a Mask holds 0 where the Mask now
    prunes."""
    for level in range(update.level + 1, len(inputs_before)):
        layers, _ = walk_stack(update.ref.module, update.ref.local_name, through=level)
        later, now = layers[level]
        before = inputs_before[level]
        same = ((before == now) & (before.signbit() == now.signbit())) | (
            before.isnan() & now.isnan()
        )
        if isinstance(later, Constraint) and not bool(same.all()):
            undo.module(later)
            later.input_changed(~same, now)


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
    undo: Undo,
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
    undo.entries(stored, at)
    write_at(stored, at, values.index_select(0, at))
    reset_entries(optimizers, stored, at, undo=undo)
