"""Checkpoints of either layout load into either (_layouts.py): dense <-> compact, with
torch's loader and mp.load_state_dict, outputs and masks equal; what cannot be translated is
refused and nothing loads."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUT_SPECS, is_compact, mlp

import maskparam as mp


@pytest.mark.parametrize("load", ["torch", "mp"])
@pytest.mark.parametrize(("saved", "loaded"), [("dense", "compact"), ("compact", "dense")])
@pytest.mark.parametrize("kind", list(LAYOUT_SPECS))
def test_a_checkpoint_of_either_layout_loads_into_either(kind, saved, loaded, load, train):
    torch.manual_seed(0)
    source = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind](saved)})
    train(source, torch.randn(5, 8), steps=3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    torch.manual_seed(1)  # other weights, and (for Mask and Freeze) the checkpoint's masks rule
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind](loaded)})
    assert is_compact(target) == (loaded == "compact")
    before = {k: v.clone() for k, v in state.items()}
    if load == "torch":
        target.load_state_dict(state)
    else:
        mp.load_state_dict(target, state)
    assert all(torch.equal(state[k], before[k]) for k in state)  # the caller's dict is untouched
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert torch.equal(mp.kept_entries(target, "0.weight"), mp.kept_entries(source, "0.weight"))
    assert mp.verify(target) == []
    train(target, x, steps=1)  # and it trains on
    assert mp.verify(target) == []


def test_a_compact_checkpoint_of_another_triangle_is_refused_and_nothing_loads():
    # (A dense Triangular stores no state: its checkpoint cannot say which triangle it was.)
    source = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Triangular(lower=False, layout="compact")})
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Triangular(layout="dense")})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises((mp.MaskparamError, RuntimeError)):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(mp.MaskparamError):
        mp.load_state_dict(target, source.state_dict())


def test_a_corrupt_mask_is_refused_after_translation_and_nothing_loads():
    source = mp.apply_mask(
        mlp(8, 8, 3), {"0.weight": mp.Mask(mp.masks.random(0.5), layout="dense")}
    )
    state = source.state_dict()
    state["0.parametrizations.weight.0.mask"][0, 0] = 2
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Mask(mp.masks.random(0.5))})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(mp.MaskparamError, match=r"mask: 1 values are neither 0 nor 1"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
