"""An optimizer created before ``apply_mask`` (or kept after baking) keeps working, or is refused
with a clear error: never a silent or cryptic failure.

The compact layout shrinks the stored Parameter in place (``set_``), keeping its identity, so an
optimizer created before ``apply_mask`` still holds it; baking grows it back. An optimizer that
has taken a step then holds state (momentum, Adam's moments) of the other shape, and its next
step would fail deep inside torch with a size mismatch. One global step pre-hook, registered
with the first compact layout, lays that state out again before the step: full-shape state
keeps the free entries' values (what the dense layout would train with), compact state comes
back in full with zeros at the fixed entries (what a dense layout holds there under Adam: their
gradient was zero). State of any other shape is left to the optimizer.

A constraint that freezes the original and trains parameters of its own instead (a Subspace's θ)
has the opposite trap: an optimizer created before ``apply_mask`` holds the frozen Parameter but
not θ, so it would silently train nothing. The same hook catches that.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from maskparam.errors import error

__all__ = ["relayout", "watch_added_parameters", "watch_reshaped"]

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
# Optimizers whose update depends on a tensor's shape: Adafactor factors the second moment of a
# matrix, and would silently run unfactored on the compact layout's vector. (Muon refuses a
# vector itself, when constructed.)
_SHAPE_AWARE = tuple(
    cls for cls in (getattr(torch.optim, n, None) for n in ("Adafactor",)) if cls is not None
)


class _Layout:
    """A compact Parameter's two shapes, and where its free entries sit in the full one.

    The positions come from the constraint while it is registered (a load may change them) and
    from the last ones seen once it is gone (baked).
    """

    def __init__(self, name: str, full_shape: torch.Size, positions: Callable[[], Tensor]) -> None:
        self.name = name
        self.full_shape = full_shape
        self._positions: Callable[[], Tensor] | None = positions
        self._last = positions()

    def positions(self) -> Tensor:
        if self._positions is not None:
            try:
                self._last = self._positions()
            except ReferenceError:  # the constraint is gone: the parameter was baked
                self._positions = None
        return self._last

    def relayout(self, value: Tensor, shape: torch.Size) -> Tensor:
        """``value`` (state of the other layout) laid out in ``shape``."""
        positions = self.positions().to(value.device)
        if shape == self.full_shape:
            full = value.new_zeros(self.full_shape)
            return full.view(-1).index_copy_(0, positions, value.reshape(-1)).view(shape)
        return value.reshape(-1).index_select(0, positions).view(shape)


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


def _check(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
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
            state = optimizer.state.get(parameter, {})
            for key, value in list(state.items()):
                relaid = relayout(watched, value)
                if relaid is not None:
                    state[key] = relaid


def relayout(parameter: Tensor, value: object) -> Tensor | None:
    """``value`` (optimizer state) laid out for ``parameter``'s current shape, where it has the
    shape of the parameter's other layout (full or compact); ``None`` where nothing is to do.

    Only per-parameter state of the other shape: LBFGS keeps flat vectors over all parameters
    under the first one, which are not this parameter's.
    """
    entry = _reshaped.get(id(parameter))
    if entry is None or entry[0]() is not parameter or not isinstance(value, Tensor):
        return None
    layout = entry[1]
    shapes = (layout.full_shape, torch.Size([layout.positions().numel()]))
    if value.shape == parameter.shape or value.shape not in shapes or parameter.shape not in shapes:
        return None
    with torch.no_grad():
        return layout.relayout(value, parameter.shape)


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
