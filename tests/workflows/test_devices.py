"""Devices: build a constrained model on the meta device, materialize it with to_empty, load a
checkpoint: it computes what the trained model computes. (The compact layout needs real tensors
and says so: constraints/test_compact.py.)"""

from __future__ import annotations

import pytest
import torch

import maskparam as mp


@pytest.mark.parametrize(
    "kind",
    [
        "mask",
        "freeze",
        "freeze-slices",
        "triangular",
        "learnable",
        "subspace-fastfood",
        "subspace-gaussian",
    ],
)
def test_meta_device_construction_then_load(constrained, make_mlp, rules):
    trained = constrained
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    with torch.device("meta"):
        model = make_mlp()
    mp.apply_mask(model, rules())
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(model(x), trained(x))
    assert mp.verify(model) == []
