"""``summary``: what is constrained, and how many entries still train (free) against the total.

``numel`` is not what trains: a 50% mask halves the free entries of a weight while its ``numel``
stays the same. PEFT users know the figure as ``print_trainable_parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskparam.constrain.distributed import refuse_sharded
from maskparam.core.parametrize import maskparam_constraints
from maskparam.core.tables import text_table
from maskparam.core.tensors import find_tensors
from maskparam.errors import check_module

__all__ = ["Summary", "TensorSummary", "summary"]


@dataclass(frozen=True)
class TensorSummary:
    """One constrained tensor: its name, its constraint(s), free entries and total entries."""

    name: str
    constraint: str
    free: int
    total: int
    #: What trains this tensor when its own entries do not: e.g. "θ of 'all' (12)".
    trained_through: str = ""


@dataclass(frozen=True)
class Summary:
    """The constrained tensors, and the model's free (trainable) entries against all its entries.

    ``str(summary)`` is a readable table; the fields are the structured data.
    """

    tensors: tuple[TensorSummary, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        header = ("tensor", "constraint", "free", "total", "free %")
        rows = [
            (
                t.name,
                t.constraint,
                t.trained_through or f"{t.free:,}",
                f"{t.total:,}",
                "-" if t.trained_through else _percent(t.free, t.total),
            )
            for t in self.tensors
        ]
        # Names and constraints align left, numbers right.
        lines = [text_table(header, rows, left=2)]
        lines.append(
            f"trainable entries: {self.trainable:,} of {self.total:,} "
            f"({_percent(self.trainable, self.total)})"
        )
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def summary(model: nn.Module) -> Summary:
    """Summarise the constraints on ``model``.

    >>> import torch, maskparam as mp
    >>> model = mp.apply_mask(torch.nn.Linear(4, 4), {"weight": mp.Triangular()})
    >>> print(mp.summary(model))
    tensor  constraint                     free  total  free %
    ------  -----------------------------  ----  -----  ------
    weight  Triangular(lower, diagonal=0)    10     16   62.5%
    trainable entries: 14 of 20 (70.0%)
    """
    check_module(model, "summary")
    refuse_sharded(model, "summary")
    rows: list[TensorSummary] = []
    trainable = total = 0
    for ref in find_tensors(model):
        ours = maskparam_constraints(ref.module, ref.local_name)
        trains = ref.storage.requires_grad
        if ours:
            shape = ref.value.shape
            free = torch.full(shape, trains, dtype=torch.bool, device=ref.storage.device)
            for parametrization in ours:
                free = parametrization.free_entries(free)
            n_free, numel = int(free.sum()), free.numel()
            through = [t for p in ours if (t := p.trained_through()) is not None]
            description = " + ".join(p.describe() for p in ours)
            rows.append(TensorSummary(ref.name, description, n_free, numel, ", ".join(through)))
            # Coordinates that the constraints themselves train (a learnable mask's scores).
            extra = sum(q.numel() for p in ours for q in p.parameters() if q.requires_grad)
            trainable += extra
            total += extra
        else:
            numel = ref.value.numel()
            n_free = numel if trains else 0
        if ref.is_parameter:
            trainable += n_free
            total += numel
    return Summary(tuple(rows), trainable, total)
