"""The exact selection kernels (constraints/kernels.py) Mask, Freeze and LearnableMask share:
masked entries stay exactly zero and frozen ones bit-identical where arithmetic would give NaN
(fp16 with adaptive optimizers: 0/0; a non-finite stored original: inf * 0)."""

from __future__ import annotations

import pytest
import torch
from helpers import square_sum_steps
from torch import Tensor, nn

import maskparam as mp

# A 4x4 keep-mask: columns 1 and 3 are masked (Mask) or frozen (Freeze takes True = frozen).
KEEP4 = torch.tensor([[True, False, True, False]] * 4)


ADAPTIVE = {
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
}


def _constrained_4x4(kind: str) -> tuple[nn.Linear, Tensor]:
    """A Linear(4, 4) under ``kind``; returns it and the bool tensor of its constrained entries
    (to hold their apply-time value: 0 where masked, the frozen value where frozen)."""
    layer = nn.Linear(4, 4)
    if kind == "mask":
        spec, constrained = mp.Mask(KEEP4, layout="dense"), ~KEEP4
    elif kind == "freeze_mask":
        spec, constrained = mp.Freeze(~KEEP4, layout="dense"), ~KEEP4
    elif kind == "mask_compact":
        spec, constrained = mp.Mask(KEEP4, layout="compact"), ~KEEP4
    elif kind == "triangular":
        spec, constrained = mp.Triangular(), torch.ones(4, 4, dtype=torch.bool).triu(1)
    elif kind == "freeze_dim":
        spec, constrained = mp.Freeze(dim=0, index=[1]), torch.zeros(4, 4, dtype=torch.bool)
        constrained[1] = True
    elif kind == "learnable_hard":  # found by helper: a hard LearnableMask has the same x*0
        spec, constrained = mp.LearnableMask(), ~KEEP4
    else:
        raise AssertionError(kind)
    mp.apply_mask(layer, {"weight": spec})
    if kind == "learnable_hard":
        with torch.no_grad():
            layer.parametrizations.weight[0].scores[~KEEP4] = -1.0
    return layer, constrained


# from the no-silent-failure attack on 0.1 (item 1: fp16 + adaptive optimizers -> NaN)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("optimizer", list(ADAPTIVE))
@pytest.mark.parametrize(
    "kind",
    ["mask", "freeze_mask", "triangular", "freeze_dim", "mask_compact", "learnable_hard"],
)
def test_half_adaptive_optimizers_masked_entries_stay_zero(kind, optimizer, dtype):
    layer, constrained = _constrained_4x4(kind)
    layer.to(dtype)
    before = layer.weight.detach().clone()
    params = [p for n, p in layer.named_parameters() if not n.endswith("scores")]
    square_sum_steps(layer, ADAPTIVE[optimizer](params), torch.randn(8, 4, dtype=dtype))
    after = layer.weight.detach()
    assert not after.isnan().any(), "NaN in the effective weight"
    assert torch.equal(after[constrained], before[constrained])  # masked 0, frozen bit-identical


# from the no-silent-failure attack on 0.1 (item 2: inf * 0 = NaN at a masked entry)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize(
    "kind", ["mask", "freeze_mask", "triangular", "freeze_dim", "learnable_hard"]
)
def test_nonfinite_original_at_constrained_entry_is_exact(kind, bad):
    layer, constrained = _constrained_4x4(kind)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.parametrizations.weight.original[constrained] = bad
    after = layer.weight.detach()
    # Masked entries exactly 0, frozen entries exactly their frozen values.
    assert torch.equal(after[constrained], before[constrained])
    assert not after[constrained].isnan().any()
