"""Distributed training: keep DDP from re-broadcasting maskparam's constant buffers every step.

``DistributedDataParallel(broadcast_buffers=True)`` (the default) broadcasts every buffer from
rank 0 before each forward, so that BatchNorm statistics agree. maskparam's masks and frozen values (and
a subspace basis of your own) are buffers too, but they never change: re-sending them each step costs as
much bandwidth as the masked weights themselves (1 byte per entry for a mask, 4-5 for frozen
values). :func:`exclude_constants_from_ddp` broadcasts them once, then tells DDP to skip them.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from maskparam.core.constraint import Constraint
from maskparam.errors import check_module

__all__ = ["constant_buffer_names", "exclude_constants_from_ddp"]


def constant_buffer_names(model: nn.Module) -> list[str]:
    """Qualified names of the buffers of maskparam's constraints in ``model``."""
    return [
        f"{module_name}.{buffer_name}".lstrip(".")
        for module_name, module in model.named_modules()
        if isinstance(module, Constraint)
        for buffer_name, _ in module.named_buffers()
    ]


def exclude_constants_from_ddp(model: nn.Module) -> list[str]:
    """Call after ``apply_mask`` and before wrapping ``model`` in ``DistributedDataParallel``.

    When a process group is initialized, the constant buffers are broadcast from rank 0 once, so
    every rank holds rank 0's masks even if they were computed from different weights; then
    DDP is told to ignore them, so that it does not send them again before every forward. Other
    buffers (BatchNorm statistics) are still broadcast as usual. Returns the ignored names.
    """
    check_module(model, "exclude_constants_from_ddp")
    names = constant_buffer_names(model)
    if dist.is_available() and dist.is_initialized():
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for name in names:
            if not buffers[name].is_sparse:  # sparse bases regenerate from their seed anyway
                dist.broadcast(buffers[name], src=0)
        for module in model.modules():
            if isinstance(module, Constraint):  # e.g. positions derived from rank 0's masks
                module.refresh()
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    # DDP's documented-by-code hook for excluding parameters and buffers by name.
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))  # type: ignore[no-untyped-call]
    return names
