"""How far a pruning schedule has gone, kept *in the model* so that every checkpoint of the
model carries it: a trainer that saves and restores the model's ``state_dict`` (HF Trainer,
Lightning, a plain loop) resumes the schedule where it stopped, and never restarts it at step 0
(which would lower the sparsity and regrow pruned entries).

The state is one int64 buffer of the model ``GradualPruning`` drives,
``maskparam_pruning_steps``: the optimizer steps the schedule counted. A buffer, not a
submodule: ``nn.Sequential`` and ``nn.ModuleList`` models call every submodule they hold. Two
plain attributes say whose it is: the model's names the schedule's tensors (a schedule built
again over them goes on with the count, another one is refused), and each holding module's
names the model whose schedule drives its tensor (a schedule on a submodule, or on an enclosing
model, over the same tensor is refused).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskparam.errors import error

__all__ = [
    "PROGRESS_BUFFER",
    "PruningProgress",
    "check_count_owner",
    "claim",
    "counted_tensors",
    "drop_progress",
]

#: The model's buffer that holds its schedule's step count (its state_dict key, under the
#: model's prefix).
PROGRESS_BUFFER = "maskparam_pruning_steps"

# The model attribute naming the tensors of the schedule whose count the buffer is (a plain
# attribute: a deep copy carries it; a new process builds its schedule before loading).
_COUNTED = "_maskparam_counted_tensors"
# The holding module's attribute: tensor name -> the model whose schedule drives it.
_CLAIMED = "_maskparam_scheduled_by"


class PruningProgress:
    """Reads and writes the step count that ``model`` keeps in its ``maskparam_pruning_steps``
    buffer (the one owner of the count: this object holds no count of its own).

    Reading it each training step must not synchronise with an accelerator, so the last value
    read or written is remembered together with the buffer object, its version counter and its
    storage (a load, ``model.to(...)``, DDP's broadcast or ``buffer.data = ...`` replaces or
    writes the buffer, and the count is read from it again).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> progress = PruningProgress(model, device=torch.device("cpu"), tensors=("0.weight",))
    >>> progress.advance(30)
    >>> progress.steps, model.state_dict()["maskparam_pruning_steps"].item()
    (30, 30)
    >>> _ = model.load_state_dict({**model.state_dict(), "maskparam_pruning_steps": torch.tensor(7)})
    >>> progress.steps
    7
    """

    def __init__(
        self, model: nn.Module, *, device: torch.device | None, tensors: tuple[str, ...]
    ) -> None:
        check_count_owner(model, tensors, "GradualPruning")
        self.model = model
        object.__setattr__(model, _COUNTED, tensors)
        if PROGRESS_BUFFER not in model._buffers:
            count = torch.zeros((), dtype=torch.int64, device=device)
            model.register_buffer(PROGRESS_BUFFER, count)
        # (the buffer, its version counter, its storage address, the count): a reference, not
        # an id, which a new tensor could reuse once the old one is freed.
        self._seen: tuple[Tensor, int, int, int] | None = None

    @staticmethod
    def held_by(model: nn.Module) -> bool:
        """Whether ``model`` holds a schedule's step count."""
        return isinstance(model._buffers.get(PROGRESS_BUFFER), Tensor)

    def _buffer(self, *, reading: bool = True) -> Tensor:
        buffer = self.model._buffers.get(PROGRESS_BUFFER)
        if not isinstance(buffer, Tensor):
            # Baked (remove_parametrizations drops it) or deleted by hand.
            raise error(
                "GradualPruning",
                f"the model no longer holds its {PROGRESS_BUFFER!r} buffer (its masks were "
                "baked, or it was deleted): the schedule has nothing left to drive.",
                fix="create a new GradualPruning on a model with masks.",
            )
        if buffer.dtype != torch.int64 and reading:
            raise error(
                "GradualPruning",
                f"the model's {PROGRESS_BUFFER!r} buffer was cast to {buffer.dtype} (as "
                "Module.type(dtype) casts integer buffers too): the step count may have lost "
                "its value.",
                fix="cast the model with .to(dtype) or .half(), which leave integer buffers "
                "alone, or give the count back: pruning.load_state_dict({'steps': ..., "
                "'sparsity': ...}).",
            )
        return buffer

    @property
    def steps(self) -> int:
        """The optimizer steps counted, as the model's buffer holds them."""
        buffer = self._buffer()
        seen = self._seen
        if seen is None or not (
            seen[0] is buffer and seen[1] == buffer._version and seen[2] == buffer.data_ptr()
        ):
            if buffer.is_meta:  # built on the meta device: a checkpoint brings the count
                return 0
            seen = (buffer, buffer._version, buffer.data_ptr(), int(buffer))
            self._seen = seen
        return seen[3]

    def advance(self, steps: int) -> None:
        """Record that the schedule has counted ``steps`` optimizer steps."""
        buffer = self._buffer(reading=False)
        if buffer.dtype != torch.int64:  # cast by Module.type: the count is written anew
            buffer = torch.zeros((), dtype=torch.int64, device=buffer.device)
            self.model._buffers[PROGRESS_BUFFER] = buffer
        with torch.no_grad():
            buffer.fill_(steps)
        self._seen = (buffer, buffer._version, buffer.data_ptr(), steps)


def counted_tensors(module: nn.Module) -> tuple[str, ...]:
    """The tensors (names under ``module``) of the schedule whose count ``module`` holds."""
    counted: tuple[str, ...] = module.__dict__.get(_COUNTED, ())
    return counted


def check_count_owner(model: nn.Module, tensors: tuple[str, ...], caller: str) -> None:
    """Refuse a second schedule on ``model``: its count belongs to the schedule of ``tensors``
    (one built again on the same tensors goes on with it, as a resumed run does)."""
    counted: tuple[str, ...] | None = model.__dict__.get(_COUNTED)
    if PROGRESS_BUFFER in model._buffers and counted is not None and set(counted) != set(tensors):
        raise error(
            caller,
            f"the model's step count ({PROGRESS_BUFFER!r}) is a GradualPruning's that prunes "
            f"{', '.join(map(repr, counted[:4]))}{' ...' if len(counted) > 4 else ''}; this one "
            f"selects {', '.join(map(repr, tensors[:4]))}{' ...' if len(tensors) > 4 else ''}: "
            "two schedules would count each step twice.",
            fix="drive every tensor from one GradualPruning (one rules mapping), or rebuild that "
            "schedule with its own rules to go on with it.",
        )


def claim(
    model: nn.Module, holders: list[tuple[str, nn.Module, str]], caller: str, *, mark: bool
) -> None:
    """Mark each (name, module, tensor name) of ``holders`` as driven by the schedule whose count
    ``model`` holds; refuse one that another model's schedule drives (a schedule on a submodule
    or on an enclosing model: the two would each undo the other's masks). The mark is a plain
    attribute of the holding module, a reference to ``model`` (a deep copy maps it)."""
    for name, module, local in holders:
        owner = module.__dict__.get(_CLAIMED, {}).get(local)
        if owner is not None and owner is not model:
            raise error(
                caller,
                f"{name!r} is pruned already by the GradualPruning of a "
                f"{type(owner).__name__} (a submodule, or a model that holds this one): two "
                "schedules would each undo the other's masks.",
                fix="drive every tensor from one GradualPruning (one rules mapping), on the "
                "model you train.",
            )
    for _, module, local in holders if mark else ():
        module.__dict__.setdefault(_CLAIMED, {})[local] = model


def drop_progress(model: nn.Module) -> None:
    """Remove every schedule's step count from ``model`` (baking ends the schedules)."""
    for module in model.modules():
        module._buffers.pop(PROGRESS_BUFFER, None)
        module.__dict__.pop(_COUNTED, None)
        module.__dict__.pop(_CLAIMED, None)
