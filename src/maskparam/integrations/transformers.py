"""Hugging Face ``transformers``: :class:`GradualPruningCallback` drives a
:class:`~maskparam.GradualPruning` from a ``Trainer``, and :class:`UpdateMasksCallback` any
``update_masks`` schedule (a function of the Trainer's step).

The schedule counts the Trainer's optimizer steps (``state.global_step``) and prunes at the end
of each scheduled one, before the Trainer logs, evaluates or saves, so every checkpoint holds the
masks and the step count of the step it was written at. ``resume_from_checkpoint`` restores both
with the model's weights: the schedule goes on from there, and never restarts. A constrained
model saves with ``save_pretrained`` (safetensors) at any point, tied embeddings included.

A plain checkpoint at the end of a run (``from_pretrained`` of the plain class gives the
effective weights): bake first, ``mp.remove_parametrizations(model)``, then
``trainer.save_model()``; mid-run, save a baked copy,
``mp.remove_parametrizations(copy.deepcopy(model)).save_pretrained(path)``.

Needs ``transformers`` (``pip install maskparam[transformers]``); importing this module imports it.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from maskparam.integrations._follow import (
    RulesAt,
    check_rules_at,
    check_schedule,
    check_trains,
    counter_offset,
    inner_optimizers,
    update_at,
)
from maskparam.prune.schedule import GradualPruning

__all__ = ["GradualPruningCallback", "UpdateMasksCallback"]


class GradualPruningCallback(TrainerCallback):  # type: ignore[misc]  # transformers is untyped here
    """Drive ``pruning`` (a :class:`~maskparam.GradualPruning` on the model the Trainer trains):
    ``Trainer(model, args, ..., callbacks=[GradualPruningCallback(pruning)])``.

    At the start of training the schedule takes the Trainer's optimizer (its state follows the
    masks; accelerate's wrapper is looked through). After each optimizer step it calls
    ``pruning.step(...)`` with the Trainer's step counter, so the masks tighten at the scheduled
    steps.

    A resumed run: the model's checkpoint holds the schedule's step count, equal to the
    Trainer's; a new Trainer that goes on training a pruned model counts on from the model's
    count. A Trainer that resumes *ahead* of the model's count (a checkpoint without it) is
    refused before the first step, rather than restarting the schedule.
    """

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = check_schedule(pruning, "GradualPruningCallback")
        self._offset = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Take the Trainer's optimizer, and line the schedule's count up with the Trainer's."""
        check_trains(self.pruning.model, model, "GradualPruningCallback")
        if optimizer is not None:
            self.pruning.optimizer = inner_optimizers([optimizer])[0]
        self._offset = counter_offset(self.pruning, state.global_step, "GradualPruningCallback")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After each optimizer step (before the Trainer saves): the scheduled masks."""
        self.pruning.step(state.global_step + self._offset)


class UpdateMasksCallback(TrainerCallback):  # type: ignore[misc]  # transformers is untyped here
    """Any ``update_masks`` schedule: after each optimizer step, ``mp.update_masks(model,
    rules_at(step), optimizer=<the Trainer's>)`` where ``rules_at(step)`` returns rules (None:
    nothing at that step). ``step`` is the Trainer's counter, so a resumed run updates at the same
    steps; the masks themselves are in the model's checkpoint.

    E.g. prune and regrow every 100 steps:
    ``UpdateMasksCallback(model, lambda step: {"*.weight": mp.masks.magnitude(0.9)} if step % 100
    == 0 else None)``.
    """

    def __init__(self, model: Any, rules_at: RulesAt) -> None:
        check_rules_at(model, rules_at, "UpdateMasksCallback")
        self.model = model
        self.rules_at = rules_at
        self._optimizers: list[Any] = []

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Take the Trainer's optimizer (its state follows the masks)."""
        check_trains(self.model, model, "UpdateMasksCallback")
        self._optimizers = inner_optimizers([optimizer]) if optimizer is not None else []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After each optimizer step (before the Trainer saves): the masks of that step, if any."""
        update_at(self.model, self.rules_at, state.global_step, self._optimizers)
