"""An optimizer created before ``apply_mask`` (or kept after baking) keeps working, or is refused
with a clear error: never a silent or cryptic failure.

The compact layout shrinks the stored Parameter in place (``set_``), keeping its identity, so an
optimizer created before ``apply_mask`` still holds it; baking grows it back, and a load or a new
``apply_mask`` may move its free entries. The optimizer's state (momentum, Adam's moments) must
move with them, by *position*: entry i of the state belongs to the entry the layout put at i.
So each optimizer's state is recorded with the positions it was laid out for, and laid out again
(through the full tensor) when they change: at once when maskparam reshapes a Parameter an
optimizer has state for, else before that optimizer's next step. Entries that come back (baked,
or free in a new mask) start from fresh state: zeros, or what torch's optimizer starts from
(Rprop's step size, Adagrad's initial accumulator). State laid out for unknown positions is
refused, not guessed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from types import EllipsisType
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from maskparam.errors import error

__all__ = [
    "ensure_watching_steps",
    "forget_unseen_move",
    "is_watched",
    "note_unseen_move",
    "relayout",
    "relayout_known_state",
    "reset_entries",
    "restart_flat_history",
    "seen_stepping",
    "watch_added_parameters",
    "watch_reshaped",
]

# Keyed by id(): a WeakKeyDictionary would compare tensors with == (elementwise). The weak
# reference drops the entry when the Parameter dies, before its id can be reused.
# id(parameter) -> (weak parameter, the positions of its free entries in the full tensor)
_reshaped: dict[int, tuple[weakref.ref[Tensor], _Layout]] = {}
# id(original) -> (weak original, tensor name, weak added parameters)
_added: dict[int, tuple[weakref.ref[Tensor], str, list[weakref.ref[Tensor]]]] = {}
# optimizer -> {id(original): versions of the added parameters at its last step}
_seen: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, list[int]]] = (
    weakref.WeakKeyDictionary()
)
_hook: Any = None
# Every optimizer seen stepping since the first apply_mask: where a regrown entry's state is.
_stepped: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
# Optimizers whose update depends on a tensor's shape: Adafactor factors the second moment of a
# matrix, and would silently run unfactored on the compact layout's vector. (Muon refuses a
# vector itself, when constructed.)
_SHAPE_AWARE = tuple(
    cls for cls in (getattr(torch.optim, n, None) for n in ("Adafactor",)) if cls is not None
)


class _Layout:
    """A compact Parameter's full shape, and where its free entries sit in it (flat)."""

    def __init__(self, name: str, full_shape: torch.Size, positions: Callable[[], Tensor]) -> None:
        self.name = name
        self.full_shape = full_shape
        self._positions = positions
        # Where the entries sat before maskparam moved them while no optimizer was known to step
        # this Parameter (a deep copy of a model and its optimizer, updated before its first
        # step): what the state of an optimizer seen later was laid out for.
        self.unseen_before: Tensor | None = None

    def current(self, parameter: Tensor) -> Tensor | None:
        """The positions ``parameter`` holds now; ``None`` for the full tensor (baked)."""
        if parameter.shape == self.full_shape:
            return None
        try:
            return self._positions()
        except ReferenceError:  # the constraint is gone, and the parameter is not full: unknown
            return None


# optimizer -> {id(parameter): (the positions its state is laid out for (None: the full tensor),
# id of the state dict then (None: no state yet, a step creates it for these positions))}
_laid_out: weakref.WeakKeyDictionary[
    torch.optim.Optimizer, dict[int, tuple[Tensor | None, int | None]]
] = weakref.WeakKeyDictionary()
# State an optimizer starts an entry from, where it is not zero.
_FRESH: dict[tuple[type, str], str] = {
    (torch.optim.Rprop, "step_size"): "lr",
    (torch.optim.Adagrad, "sum"): "initial_accumulator_value",
}


def _fresh(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    key: str,
    like: Tensor,
    shape: torch.Size,
) -> Tensor:
    option = next(
        (o for (cls, k), o in _FRESH.items() if k == key and isinstance(optimizer, cls)), None
    )
    value = float(group[option]) if option is not None else 0.0
    return torch.full(shape, value, dtype=like.dtype, device=like.device)


def _moved(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    key: str,
    value: Tensor,
    was: Tensor | None,
    now: Tensor | None,
    full_shape: torch.Size,
) -> Tensor:
    """``value`` (laid out for positions ``was``) laid out for positions ``now``."""
    if was is None:
        full = value.reshape(full_shape)
    else:
        full = _fresh(optimizer, group, key, value, full_shape)
        full.view(-1).index_copy_(0, was.to(value.device), value.reshape(-1))
    if now is None:
        return full
    return full.reshape(-1).index_select(0, now.to(value.device))


def _lay_out(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], parameter: Tensor, layout: _Layout
) -> None:
    """Lay ``parameter``'s state in ``optimizer`` out for the positions it holds now."""
    now = layout.current(parameter)
    records = _laid_out.setdefault(optimizer, {})
    state = optimizer.state.get(parameter)
    key = id(parameter)
    entry = records.get(key)
    recorded: Tensor | EllipsisType | None = ... if entry is None else entry[0]
    if entry is not None and entry[1] is not None and id(state) != entry[1]:
        # The state dict was replaced since (optimizer.load_state_dict makes new ones; a step
        # fills the same one in place): it is the checkpoint's, laid out for the positions the
        # model holds now (loaded with it), not for the ones recorded before the load.
        recorded = ...
    if recorded is now and all(
        v.shape == parameter.shape
        for v in (state or {}).values()
        if isinstance(v, Tensor) and v.dim()
    ):
        return  # the usual step: laid out for these very positions already
    # Per-parameter state only: of the parameter's shape, the full one or the recorded layout's.
    # (LBFGS keeps flat vectors over all parameters under the first one: not this one's.)
    known = {parameter.shape, layout.full_shape}
    if entry is None and layout.unseen_before is not None:
        recorded = layout.unseen_before  # laid out before the move that this optimizer missed
    if recorded is not ...:
        known.add(_shape(recorded, layout))
    tensors = {k: v for k, v in (state or {}).items() if isinstance(v, Tensor) and v.shape in known}
    strays = [
        v
        for v in (state or {}).values()
        if isinstance(v, Tensor) and v.dim() == 1 and v.shape not in known
    ]
    if strays and not isinstance(optimizer, torch.optim.LBFGS):  # LBFGS: flat, over all params
        raise error(
            repr(layout.name),
            f"{type(optimizer).__name__}'s state for this tensor has {strays[0].numel()} entries, "
            f"laid out for free entries maskparam does not know (the parameter holds "
            f"{parameter.numel()} now): e.g. a deep copy of the optimizer made before its "
            "model's masks changed.",
            fix="copy the optimizer after update_masks (or through mp.optimizer_state_dict and "
            "mp.load_optimizer_state_dict), or clear its state for this parameter.",
        )
    if tensors and any(v.dim() > 0 for v in tensors.values()):
        shapes = {v.shape for v in tensors.values()}
        if recorded is not ... and shapes == {_shape(recorded, layout)}:
            was = recorded
        elif all(v.shape == parameter.shape for v in tensors.values()):
            # First seen (or replaced by a load), and of the parameter's shape: as it is.
            was = now
        elif all(v.shape == layout.full_shape for v in tensors.values()):
            was = None  # state from before apply_mask
        else:
            raise error(
                repr(layout.name),
                f"{type(optimizer).__name__}'s state for this tensor has shapes "
                f"{sorted({tuple(v.shape) for v in tensors.values()})}, laid out for free entries "
                "maskparam does not know (the parameter holds "
                f"{tuple(parameter.shape)} entries now).",
                fix="create the optimizer after apply_mask, or clear its state for this "
                "parameter (optimizer.state.pop(parameter)).",
            )
        if was is not now:
            with torch.no_grad():
                for k, v in tensors.items():
                    state[k] = _moved(optimizer, group, k, v, was, now, layout.full_shape)  # type: ignore[index]
    records[key] = (now, None if state is None else id(state))


def _shape(positions: Tensor | None, layout: _Layout) -> torch.Size:
    return layout.full_shape if positions is None else torch.Size([positions.numel()])


def relayout_known_state(parameter: Tensor) -> None:
    """Lay out at once the state of every optimizer seen stepping ``parameter`` (maskparam has
    just reshaped it: baked, or applied a compact layout again), so that a checkpoint saved
    before the next step holds state of the parameter's shape."""
    entry = _reshaped.get(id(parameter))
    if entry is None or entry[0]() is not parameter:
        return
    for optimizer in list(_laid_out):
        if id(parameter) not in _laid_out[optimizer]:
            continue
        for group in optimizer.param_groups:
            if any(p is parameter for p in group["params"]):
                _lay_out(optimizer, group, parameter, entry[1])


def _ensure_hook() -> None:
    global _hook  # noqa: PLW0603 - one process-wide hook, registered once
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def watch_reshaped(
    parameter: Tensor, name: str, full_shape: torch.Size, positions: Callable[[], Tensor]
) -> None:
    """Lay out optimizer state again before each step where ``parameter`` (now compact, once
    ``full_shape``, known as ``name``; ``positions()`` gives where its entries sit, flat) changed
    shape under it.

    It stays watched after baking (full shape again), when state of the compact shape appears.
    """
    key = id(parameter)
    layout = _Layout(name, full_shape, positions)
    _reshaped[key] = (weakref.ref(parameter, lambda _: _reshaped.pop(key, None)), layout)
    _ensure_hook()


def seen_stepping(parameter: Tensor) -> bool:
    """Whether any optimizer was seen stepping ``parameter`` (its state is laid out by record)."""
    return any(id(parameter) in records for records in list(_laid_out.values()))


def note_unseen_move(parameter: Tensor, before: Tensor) -> None:
    """``parameter``'s entries left positions ``before`` while no optimizer was known to step it
    (see ``_Layout.unseen_before``); it must be watched already."""
    entry = _reshaped.get(id(parameter))
    if entry is not None and entry[0]() is parameter:
        entry[1].unseen_before = before


def forget_unseen_move(parameter: Tensor) -> None:
    """A checkpoint was loaded into ``parameter``: optimizer state that comes now is its own."""
    entry = _reshaped.get(id(parameter))
    if entry is not None and entry[0]() is parameter:
        entry[1].unseen_before = None


def is_watched(parameter: Tensor) -> bool:
    """Whether ``parameter``'s optimizer state is laid out by this guard (one dict lookup)."""
    entry = _reshaped.get(id(parameter))
    return entry is not None and entry[0]() is parameter


def watch_added_parameters(original: Tensor, name: str, new: Sequence[Tensor]) -> None:
    """Refuse the steps of an optimizer that holds ``original`` while nothing trains ``new``."""
    key = id(original)
    _added[key] = (
        weakref.ref(original, lambda _: _added.pop(key, None)),
        name,
        [weakref.ref(p) for p in new],
    )
    _ensure_hook()


def forget(original: Tensor) -> None:
    """Stop watching ``original`` for added parameters (its constraint was removed)."""
    _added.pop(id(original), None)


def reset_entries(parameter: Tensor, positions: Tensor) -> None:
    """Give the entries at flat ``positions`` of ``parameter`` fresh state in every optimizer seen
    stepping it (a regrown or unfrozen entry starts as a new one: zeros, Rprop's step size,
    Adagrad's initial accumulator). State of another shape than the parameter's is left alone."""
    if not positions.numel():
        return
    for optimizer in list(_stepped):
        for group in optimizer.param_groups:
            if not any(p is parameter for p in group["params"]):
                continue
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() and value.shape == parameter.shape:
                    fresh = _fresh(optimizer, group, key, value, torch.Size([1]))
                    with torch.no_grad():
                        value.view(-1).index_put_((positions.to(value.device),), fresh)


def restart_flat_history(parameter: Tensor) -> None:
    """Clear the history of every LBFGS seen stepping ``parameter``: it keeps flat vectors over
    all its parameters, which no longer line up once a compact ``parameter`` changed size (its
    curvature pairs belong to the old variables). LBFGS then starts afresh, as on its first step.
    """
    for optimizer in list(_stepped):
        if not isinstance(optimizer, torch.optim.LBFGS):
            continue
        params = optimizer.param_groups[0]["params"]
        if any(p is parameter for p in params):
            optimizer.state.pop(params[0], None)
            optimizer._numel_cache = None  # its cached total size


def ensure_watching_steps() -> None:
    """Record every optimizer that steps from now on (for :func:`reset_entries`)."""
    _ensure_hook()


def _check(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    _stepped.add(optimizer)
    if _added:
        _check_added_parameters(optimizer)
    if not _reshaped:
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _reshaped.get(id(parameter))
            watched = entry[0]() if entry is not None else None
            if entry is None or watched is None or watched is not parameter:
                continue
            layout = entry[1]
            if isinstance(optimizer, _SHAPE_AWARE) and watched.shape != layout.full_shape:
                raise error(
                    repr(layout.name),
                    f"{type(optimizer).__name__} treats a matrix as a matrix, but the compact "
                    "layout stores this tensor as the vector of its free entries: it would run "
                    "another algorithm on it, or fail.",
                    fix="pass layout='dense' to this tensor's spec (the default 'auto' chose "
                    "compact), or train it with an elementwise optimizer (SGD, Adam, AdamW).",
                )
            _lay_out(optimizer, group, watched, layout)


def relayout(parameter: Tensor, value: object) -> Tensor | None:
    """``value`` (saved optimizer state) laid out for ``parameter``'s current shape, where it has
    the shape of the parameter's other layout (full, or the compact one it holds now); ``None``
    where nothing is to do.

    Only per-parameter state of the other shape: LBFGS keeps flat vectors over all parameters
    under the first one, which are not this parameter's.
    """
    entry = _reshaped.get(id(parameter))
    if entry is None or entry[0]() is not parameter or not isinstance(value, Tensor):
        return None
    layout = entry[1]
    now = layout.current(parameter)
    if now is None or value.shape == parameter.shape or value.shape != layout.full_shape:
        return None  # compact state into the full tensor: its positions are not known here
    with torch.no_grad():
        return value.reshape(-1).index_select(0, now.to(value.device))


def _check_added_parameters(optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    seen = _seen.setdefault(optimizer, {})
    for key in held & _added.keys():
        original_ref, name, new_refs = _added[key]
        new = [p for p in (r() for r in new_refs) if p is not None]
        if original_ref() is None or not new or any(id(p) in held for p in new):
            continue
        # θ may well live in another optimizer (a different learning rate, Muon for matrices
        # and AdamW for the rest): only when nothing has changed θ since this optimizer's last
        # step is this one surely the only optimizer, created before apply_mask.
        versions = [p._version for p in new]
        if seen.get(key) == versions:
            raise error(
                repr(name),
                f"this {type(optimizer).__name__} holds the tensor's original, which its subspace "
                "froze, and nothing has trained the θ that trains instead since its last step: it "
                "was created before apply_mask, so it trains nothing here.",
                fix="create the optimizer after apply_mask, or add the new parameters: "
                "optimizer.add_param_group({'params': [...]}).",
            )
        seen[key] = versions
