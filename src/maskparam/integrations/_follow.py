"""What the trainer callbacks share: following a trainer's step counter with a schedule whose
count lives in the model, and mask updates as a function of that counter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import torch
from torch import nn

from maskparam.errors import check_module, error
from maskparam.prune.schedule import GradualPruning
from maskparam.prune.update import MaskRules, update_masks

__all__ = [
    "RulesAt",
    "check_rules_at",
    "check_schedule",
    "check_trains",
    "counter_offset",
    "inner_optimizers",
    "update_at",
]


def check_schedule(pruning: object, callback: str) -> GradualPruning:
    """``pruning`` if it is a :class:`~maskparam.GradualPruning`; refused otherwise."""
    if not isinstance(pruning, GradualPruning):
        raise error(
            callback,
            f"takes the GradualPruning to drive; got a {type(pruning).__name__}.",
            fix=f"pass mp.GradualPruning(model, rules, sparsity=..., end=...) to {callback}(...).",
        )
    return pruning


def check_trains(pruned: nn.Module, trained: nn.Module | None, callback: str) -> None:
    """Refuse a trainer whose model does not contain the model the callback prunes."""
    if trained is None or any(m is pruned for m in trained.modules()):
        return
    raise error(
        callback,
        f"the trainer trains a {type(trained).__name__} that does not contain the "
        f"{type(pruned).__name__} this callback prunes.",
        fix="build the callback on the model you give the trainer (or on a submodule).",
    )


#: The rules of ``update_masks`` to apply after an optimizer step, as a function of the trainer's
#: step counter (None: nothing at that step).
RulesAt: TypeAlias = Callable[[int], "MaskRules | None"]


def check_rules_at(model: object, rules_at: object, callback: str) -> None:
    """Refuse what is not a model and a function of the step."""
    check_module(model, callback)
    if not callable(rules_at):
        raise error(
            callback,
            f"rules_at must be a function from the trainer's step to update_masks rules (or "
            f"None); got a {type(rules_at).__name__}.",
            fix="pass e.g. lambda step: {'*.weight': mp.masks.magnitude(0.9)} if step % 100 == 0 "
            "else None.",
        )


def update_at(
    model: nn.Module, rules_at: RulesAt, step: int, optimizers: Sequence[torch.optim.Optimizer]
) -> bool:
    """``update_masks`` with ``rules_at(step)``, if it gives rules; whether it did."""
    rules = rules_at(step)
    if rules is None:
        return False
    update_masks(model, rules, optimizer=list(optimizers))
    return True


def counter_offset(pruning: GradualPruning, global_step: int, callback: str) -> int:
    """How far the schedule's count (from the model) is ahead of the trainer's counter at the
    start of training: 0 when both come from the same checkpoint, the steps already counted when
    a new trainer goes on training a pruned model. Behind is refused: the model's checkpoint did
    not carry the count, and going on would restart the schedule."""
    offset = pruning.steps - global_step
    if offset < 0:
        raise error(
            callback,
            f"the trainer resumes at step {global_step}, but the model's state_dict holds "
            f"{pruning.steps} steps of the schedule (its 'maskparam_pruning_steps' buffer): the "
            "model's checkpoint does not carry the schedule, which would start again and regrow "
            "pruned weights.",
            fix="resume from a checkpoint saved with this schedule on the model (its "
            "state_dict holds the count), or load the count yourself: "
            "pruning.load_state_dict({'steps': ..., 'sparsity': ...}) before training.",
        )
    return offset


def inner_optimizers(optimizers: Sequence[object]) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind a trainer's (accelerate wraps HF's in an
    ``AcceleratedOptimizer``, whose ``optimizer`` is the torch one the state lives in)."""
    found = []
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)
        found.append(inner if isinstance(inner, torch.optim.Optimizer) else optimizer)
    return found  # type: ignore[return-value]  # anything else: update_masks names it
