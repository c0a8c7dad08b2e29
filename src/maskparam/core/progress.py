"""How far a pruning schedule has gone, kept *in the model* so that every checkpoint of the
model carries it: a trainer that saves and restores the model's ``state_dict`` (HF Trainer,
Lightning, a plain loop) resumes the schedule where it stopped, and never restarts it at step 0
(which would lower the sparsity and regrow pruned entries).

The state is one int64 buffer of the model ``GradualPruning`` drives,
``maskparam_pruning_steps``: the optimizer steps the schedule counted. A buffer, not a
submodule: ``nn.Sequential`` and ``nn.ModuleList`` models call every submodule they hold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskparam.errors import error

__all__ = ["PROGRESS_BUFFER", "PruningProgress", "drop_progress"]

#: The model's buffer that holds its schedule's step count (its state_dict key, under the
#: model's prefix).
PROGRESS_BUFFER = "maskparam_pruning_steps"


class PruningProgress:
    """Reads and writes the step count that ``model`` keeps in its ``maskparam_pruning_steps``
    buffer (the one owner of the count: this object holds no count of its own).

    Reading it each training step must not synchronise with an accelerator, so the last value
    read or written is remembered together with the buffer's identity and version counter (a
    load, ``model.to(...)`` or DDP's broadcast replaces or writes the buffer, and the count is
    read from it again).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> progress = PruningProgress(model, device=torch.device("cpu"))
    >>> progress.advance(30)
    >>> progress.steps, model.state_dict()["maskparam_pruning_steps"].item()
    (30, 30)
    >>> _ = model.load_state_dict({**model.state_dict(), "maskparam_pruning_steps": torch.tensor(7)})
    >>> progress.steps
    7
    """

    def __init__(self, model: nn.Module, *, device: torch.device | None) -> None:
        self.model = model
        if PROGRESS_BUFFER not in model._buffers:
            count = torch.zeros((), dtype=torch.int64, device=device)
            model.register_buffer(PROGRESS_BUFFER, count)
        self._seen: tuple[int, int, int] | None = None  # (id, version, value)

    @staticmethod
    def held_by(model: nn.Module) -> bool:
        """Whether ``model`` holds a schedule's step count."""
        return isinstance(model._buffers.get(PROGRESS_BUFFER), Tensor)

    def _buffer(self) -> Tensor:
        buffer = self.model._buffers.get(PROGRESS_BUFFER)
        if not isinstance(buffer, Tensor):
            # Baked (remove_parametrizations drops it) or deleted by hand.
            raise error(
                "GradualPruning",
                f"the model no longer holds its {PROGRESS_BUFFER!r} buffer (its masks were "
                "baked, or it was deleted): the schedule has nothing left to drive.",
                fix="create a new GradualPruning on a model with masks.",
            )
        return buffer

    @property
    def steps(self) -> int:
        """The optimizer steps counted, as the model's buffer holds them."""
        buffer = self._buffer()
        if self._seen is None or self._seen[:2] != (id(buffer), buffer._version):
            if buffer.is_meta:  # built on the meta device: a checkpoint brings the count
                return 0
            self._seen = (id(buffer), buffer._version, int(buffer))
        return self._seen[2]

    def advance(self, steps: int) -> None:
        """Record that the schedule has counted ``steps`` optimizer steps."""
        buffer = self._buffer()
        with torch.no_grad():
            buffer.fill_(steps)
        self._seen = (id(buffer), buffer._version, steps)


def drop_progress(model: nn.Module) -> None:
    """Remove every schedule's step count from ``model`` (baking ends the schedules)."""
    for module in model.modules():
        module._buffers.pop(PROGRESS_BUFFER, None)
