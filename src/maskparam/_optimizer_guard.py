"""Clear errors for an optimizer created before ``apply_mask``, instead of silent or cryptic ones.

``layout="compact"`` shrinks the stored Parameter in place (``set_``), keeping its identity, so an
optimizer created before ``apply_mask`` still holds it. Once that optimizer has taken a step, its
state (momentum, Adam's moments) has the old shape, and its next step would fail deep inside
torch with a size mismatch. One global step pre-hook, registered with the first compact layout,
checks the Parameters that maskparam made compact and names the fix.

A constraint that freezes the original and trains parameters of its own instead (a Subspace's θ)
has the opposite trap: an optimizer created before ``apply_mask`` holds the frozen Parameter but
not θ, so it would silently train nothing. The same hook catches that.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from maskparam.errors import error

__all__ = ["watch_added_parameters", "watch_reshaped"]

# Keyed by id(): a WeakKeyDictionary would compare tensors with == (elementwise). The weak
# reference drops the entry when the Parameter dies, before its id can be reused.
# id(parameter) -> (weak parameter, tensor name, the shapes it has had: full and compact)
_reshaped: dict[int, tuple[weakref.ref[Tensor], str, tuple[torch.Size, torch.Size]]] = {}
# id(original) -> (weak original, tensor name, weak added parameters)
_added: dict[int, tuple[weakref.ref[Tensor], str, list[weakref.ref[Tensor]]]] = {}
# optimizer -> {id(original): versions of the added parameters at its last step}
_seen: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, list[int]]] = (
    weakref.WeakKeyDictionary()
)
_hook: Any = None


def _ensure_hook() -> None:
    global _hook  # noqa: PLW0603 - one process-wide hook, registered once
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def watch_reshaped(parameter: Tensor, name: str, full_shape: torch.Size) -> None:
    """Check ``parameter`` (now compact, known as ``name``, once ``full_shape``) before each step.

    It stays watched after baking (full shape again), when state of the compact shape is the trap.
    """
    key = id(parameter)
    shapes = (full_shape, parameter.shape)
    _reshaped[key] = (weakref.ref(parameter, lambda _: _reshaped.pop(key, None)), name, shapes)
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
            _, name, shapes = entry
            for key, value in optimizer.state.get(parameter, {}).items():
                # Only per-parameter state of the other shape: LBFGS keeps flat vectors over all
                # parameters under the first one, which are not this parameter's.
                if (
                    isinstance(value, Tensor)
                    and value.shape != watched.shape
                    and value.shape in shapes
                ):
                    raise error(
                        repr(name),
                        f"{type(optimizer).__name__}'s state {key!r} has shape {tuple(value.shape)}, "
                        f"but the parameter now holds {tuple(watched.shape)} entries: layout="
                        "'compact' changed what is stored after this optimizer took a step.",
                        fix="create the optimizer after apply_mask (or after baking), or clear its "
                        "state for this parameter (optimizer.state.pop(parameter)).",
                    )


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
