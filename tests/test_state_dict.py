"""A constrained model's state_dict carries everything needed to restore it exactly."""

from __future__ import annotations

import io

import torch
from torch import nn

import maskparam as mp


def _rules() -> mp.Rules:
    return {
        "conv.weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9]),
        "fc1.weight": mp.Mask(mp.masks.magnitude(0.6)),  # depends on the weights: differs per seed
        "fc2.weight": [mp.Triangular(), mp.Freeze(mp.masks.random(0.3, seed=3))],
        "head.*": mp.Mask(mp.masks.random(0.5, seed=7)),
    }


def _train(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_fresh_model_with_other_seeds_restores_bit_identical_outputs(make_tiny, tiny_input):
    torch.manual_seed(1)
    trained = mp.apply_mask(make_tiny(), _rules())
    _train(trained, tiny_input)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(2)
    fresh = mp.apply_mask(make_tiny(), _rules())
    assert not torch.equal(fresh.fc1.weight, trained.fc1.weight)
    fresh.load_state_dict(state)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tiny_input), trained(tiny_input))
    # The masks themselves came from the checkpoint, not from the fresh weights.
    assert torch.equal(
        fresh.fc1.parametrizations.weight[0].mask, trained.fc1.parametrizations.weight[0].mask
    )


def test_state_dict_holds_masks_and_frozen_values_compactly(tiny):
    mp.apply_mask(tiny, _rules())
    state = tiny.state_dict()
    assert state["fc1.parametrizations.weight.0.mask"].dtype == torch.uint8  # 1 byte per entry
    frozen = state["conv.parametrizations.weight.0.frozen_values"]
    assert frozen.shape == (5, 3, 3, 3)  # only the frozen filters are stored
    assert torch.equal(state["conv.parametrizations.weight.0.index"], torch.tensor([5, 6, 7, 8, 9]))
    assert "fc2.parametrizations.weight.1.keep" in state
