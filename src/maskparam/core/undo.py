"""``Undo``: the writes one multi-tensor call has made so far, taken back if a later one fails.

``update_masks`` (and the loads that take masks the same way) check everything before they
write, so that nothing should fail once writing starts. What remains (a constraint of your own
whose ``take_mask`` raises, an out-of-memory error halfway) must not leave the first tensors
with new masks and the rest with old ones: each write is recorded first, and on failure
undone in reverse order. Records are small where they can be: the old storage of a tensor that
is swapped (``set_``), the old values at the positions that are overwritten, the old dict of an
optimizer's state, a copy of a constraint's buffers.

>>> import torch
>>> weight = torch.zeros(4)
>>> undo = Undo()
>>> undo.entries(weight, torch.tensor([1, 2]))
>>> weight[1:3] = 7.0
>>> undo.run()
>>> weight.tolist()
[0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from maskparam.core.positions import write_at

__all__ = ["Undo"]


class Undo:
    """A log of writes, each recorded before it is made; :meth:`run` takes them back."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def module(self, module: nn.Module) -> None:
        """Before ``module``'s buffers or attributes change (a constraint takes a mask)."""
        attrs = dict(module.__dict__)
        buffers = dict(module._buffers)
        saved = {n: b.detach().clone() for n, b in buffers.items() if b is not None}

        def undo() -> None:
            module.__dict__.update(attrs)
            module._buffers.clear()
            module._buffers.update(buffers)
            with torch.no_grad():
                for name, value in saved.items():
                    kept = buffers[name]
                    assert kept is not None
                    if kept.shape != value.shape:
                        kept.set_(value)  # type: ignore[call-overload]
                    else:
                        kept.copy_(value)

        self._steps.append(undo)

    def storage(self, parameter: Tensor) -> None:
        """Before ``parameter`` is given other storage (``set_``) or another gradient."""
        data, grad = parameter.data, parameter.grad

        def undo() -> None:
            with torch.no_grad():
                parameter.set_(data)  # type: ignore[call-overload]
            parameter.grad = grad

        self._steps.append(undo)

    def entries(self, tensor: Tensor, positions: Tensor) -> None:
        """Before ``tensor``'s entries at the flat ``positions`` are overwritten in place."""
        if not positions.numel():
            return
        at = positions.to(tensor.device, torch.int64)
        old = tensor.detach().reshape(-1).index_select(0, at).clone()

        def undo() -> None:
            with torch.no_grad():
                write_at(tensor, at, old)

        self._steps.append(undo)

    def values(self, tensor: Tensor) -> None:
        """Before every entry of ``tensor`` is overwritten in place (``copy_``)."""
        old = tensor.detach().clone()

        def undo() -> None:
            with torch.no_grad():
                tensor.copy_(old)

        self._steps.append(undo)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, parameter: Tensor) -> None:
        """Before ``optimizer``'s state for ``parameter`` is replaced or dropped (entries
        overwritten in place are recorded with :meth:`entries`)."""
        had = parameter in optimizer.state
        saved = dict(optimizer.state[parameter]) if had else {}
        numel_cache = getattr(optimizer, "_numel_cache", None)

        def undo() -> None:
            if had:
                optimizer.state[parameter] = saved
            else:
                optimizer.state.pop(parameter, None)
            if hasattr(optimizer, "_numel_cache"):
                optimizer._numel_cache = numel_cache  # LBFGS's cached total size

        self._steps.append(undo)

    def call(self, undo: Callable[[], None]) -> None:
        """Before a write that ``undo`` takes back (swapping a module in a stack)."""
        self._steps.append(undo)

    def run(self) -> None:
        """Take every recorded write back, the last first."""
        for step in reversed(self._steps):
            step()
        self._steps.clear()
