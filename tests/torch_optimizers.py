"""Every optimizer in torch.optim, with momentum and (decoupled) weight decay where it has them:
the one table the optimizer tests and the matrix share; and the optimizers of the pruning loops
(imported, not collected)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class _Pair(torch.optim.Optimizer):
    """Two optimizers stepped as one (Muon takes matrices only; the usual recipe adds AdamW)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss


def _muon(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    if not matrices:
        return torch.optim.AdamW(others, lr=0.05)
    return _Pair(torch.optim.Muon(matrices, lr=0.05), torch.optim.AdamW(others, lr=0.05))


OPTIMIZERS: dict[str, Factory] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD-nesterov-wd": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5, fused=True),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.05, weight_decay=0.1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.05, weight_decay=0.1),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=0.05, weight_decay=0.1),
    "Muon": _muon,
}
# Optimizers whose state at an entry that never had a gradient is their fresh state (no coupled
# weight decay): there the dense layout and the compact one must train identically, bit for bit,
# through apply, bake and a new mask, with one optimizer.
PRUNING_LOOP_OPTIMIZERS = {
    "SGD(momentum)": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "SGD(nesterov)": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "Adam(amsgrad)": lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, fused=True),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
}

# SparseAdam needs sparse gradients (nn.Embedding(sparse=True)); a parametrized tensor's gradient
# flows through the parametrization and is dense, so SparseAdam cannot train it at all.
NOT_APPLICABLE = {"SparseAdam"}


def uncovered() -> set[str]:
    """Optimizers in torch.optim that the table misses (empty when it is complete)."""
    in_torch = {
        name
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)
    } - {"Optimizer"}
    return in_torch - {name.split("-")[0] for name in OPTIMIZERS} - NOT_APPLICABLE
