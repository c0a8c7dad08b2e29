"""Checkpoints of either layout load into either (_layouts.py): dense <-> compact, with
torch's loader and mp.load_state_dict, outputs and masks equal; what cannot be translated is
refused and nothing loads."""

from __future__ import annotations

import copy

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


def _net(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return mlp(8, 8, 3)


def _run(model, optimizer, x, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("load", ["torch", "mp"])
@pytest.mark.parametrize(("saved", "here"), [("compact", "dense"), ("dense", "compact")])
@pytest.mark.parametrize("kind", list(LAYOUT_SPECS))
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),  # HF Trainer's default
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    ],
    ids=["adam", "fused_adamw", "sgd"],
)
def test_a_resume_takes_the_checkpoints_layout_so_its_optimizer_state_fits(
    make_optimizer, kind, saved, here, load
):
    # The same rules meet other weights (or a meta model): layout="auto" may choose the other
    # layout here. The checkpoint's layout wins, so that the optimizer's own checkpoint (torch's
    # positional optimizer.load_state_dict, as Lightning and HF Trainer call it) fits.
    x = torch.randn(5, 8)
    source = mp.apply_mask(_net(0), {"0.weight": LAYOUT_SPECS[kind](saved)})
    optimizer = make_optimizer(source.parameters())
    _run(source, optimizer, x, 3)
    model_state = {k: v.clone() for k, v in source.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    target = mp.apply_mask(_net(1), {"0.weight": LAYOUT_SPECS[kind](here)})
    stored = target[0].parametrizations.weight.original
    resumed = make_optimizer(target.parameters())  # built before the load, on the same objects
    if load == "torch":
        target.load_state_dict(model_state)
    else:
        mp.load_state_dict(target, model_state)
    assert target[0].parametrizations.weight.original is stored
    assert is_compact(target) == (saved == "compact")
    assert stored.shape == source[0].parametrizations.weight.original.shape
    assert target.state_dict().keys() == source.state_dict().keys()
    assert mp.summary(target) == mp.summary(source)
    resumed.load_state_dict(optimizer_state)
    _run(source, optimizer, x, 2)
    _run(target, resumed, x, 2)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert mp.verify(target) == []


def _full_state(model, optimizer, key):
    """The optimizer's state ``key`` of 0.weight laid out in full (zeros where not stored)."""
    stack = model[0].parametrizations.weight
    value = optimizer.state[stack.original][key]
    return stack[0].to_full(value) if stack[0].stored_positions() is not None else value


@pytest.mark.parametrize(("saved", "here"), [("compact", "dense"), ("dense", "compact")])
@pytest.mark.parametrize("kind", ["mask", "freeze"])
def test_an_optimizer_passed_to_a_load_of_the_other_layout_keeps_each_entrys_state(
    kind, saved, here
):
    # mp.load_state_dict(optimizer=): the optimizer goes on with its own state, laid out for the
    # layout the checkpoint brings (here with the same masks: the same rules and weights).
    x = torch.randn(5, 8)
    source = mp.apply_mask(_net(0), {"0.weight": LAYOUT_SPECS[kind](saved)})
    target = mp.apply_mask(_net(0), {"0.weight": LAYOUT_SPECS[kind](here)})
    optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    _run(target, optimizer, x, 2)
    before = {k: _full_state(target, optimizer, k) for k in ("exp_avg", "exp_avg_sq")}
    if kind == "mask":
        free = mp.kept_entries(target, "0.weight")
    else:
        free = ~mp.frozen_entries(target, "0.weight")[0]
    mp.load_state_dict(target, source.state_dict(), optimizer=optimizer)
    stored = target[0].parametrizations.weight.original
    assert stored.shape == source[0].parametrizations.weight.original.shape
    for key, full in before.items():
        assert optimizer.state[stored][key].shape == stored.shape
        after = _full_state(target, optimizer, key)
        assert torch.equal(after[free], full[free])  # each free entry keeps its state
        assert not after[~free].any()
    _run(target, optimizer, x, 1)
    assert mp.verify(target) == []


def test_a_tensor_that_cannot_be_compact_keeps_its_layout_and_loads_a_compact_checkpoint():
    # Compact only where apply_mask would store it so: here a frozen Parameter (no optimizer
    # state to fit), so the checkpoint is translated into the dense layout instead.
    source = mp.apply_mask(_net(0), {"0.weight": LAYOUT_SPECS["mask"]("compact")})
    target = _net(1)
    target[0].weight.requires_grad_(False)
    mp.apply_mask(target, {"0.weight": LAYOUT_SPECS["mask"]("auto")})
    assert not is_compact(target)
    target.load_state_dict(source.state_dict())
    assert not is_compact(target)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
