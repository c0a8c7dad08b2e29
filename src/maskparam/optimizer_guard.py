"""A clear error instead of a size mismatch when an optimizer's state predates a compact layout.

``layout="compact"`` shrinks the stored Parameter in place (``set_``), keeping its identity, so an
optimizer created before ``apply_mask`` still holds it. Once that optimizer has taken a step, its
state (momentum, Adam's moments) has the old shape, and its next step would fail deep inside
torch with a size mismatch. One global step pre-hook, registered with the first compact layout,
checks the Parameters that maskparam made compact and names the fix.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from maskparam.errors import error

__all__ = ["watch"]

# Keyed by id(): a WeakKeyDictionary would compare tensors with == (elementwise). The weak
# reference drops the entry when the Parameter dies, before its id can be reused.
_compact: dict[int, tuple[weakref.ref[Tensor], str, torch.Size]] = {}
_hook: Any = None


def watch(parameter: Tensor, name: str, full_shape: torch.Size) -> None:
    """Check ``parameter`` (now compact, known as ``name``, once ``full_shape``) before each step."""
    global _hook  # noqa: PLW0603 - one process-wide hook, registered once
    key = id(parameter)
    _compact[key] = (weakref.ref(parameter, lambda _: _compact.pop(key, None)), name, full_shape)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def _check(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    if not _compact:
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _compact.get(id(parameter))
            watched = entry[0]() if entry is not None else None
            if entry is None or watched is None or watched is not parameter:
                continue
            _, name, full_shape = entry
            for key, value in optimizer.state.get(parameter, {}).items():
                # Only per-parameter state of the old shape: LBFGS keeps flat vectors over all
                # parameters under the first one, which are not this parameter's.
                if isinstance(value, Tensor) and value.shape == full_shape != watched.shape:
                    raise error(
                        repr(name),
                        f"{type(optimizer).__name__}'s state {key!r} has shape {tuple(value.shape)}, "
                        f"but layout='compact' now stores {tuple(watched.shape)} entries: the "
                        "optimizer took a step before apply_mask.",
                        fix="create the optimizer after apply_mask, or clear its state for this "
                        "parameter (optimizer.state.pop(parameter)).",
                    )
