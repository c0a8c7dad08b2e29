"""Devices: build a constrained model on the meta device, materialize it with to_empty, load a
checkpoint: it computes what the trained model computes. (The compact layout needs real tensors
and says so: constraints/test_compact.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


@pytest.mark.parametrize(
    "make",
    [
        lambda: mp.Freeze(dim=0, index=[1]),
        lambda: mp.Subspace(3),
        lambda: mp.Subspace(3, projection="sparse"),
        lambda: mp.Subspace(3, projection="fastfood"),
    ],
    ids=["freeze-slices", "subspace-gaussian", "subspace-sparse", "subspace-fastfood"],
)
def test_meta_build_then_load_with_assign_computes_what_the_checkpoint_did(make):
    # assign=True makes parameters and buffers real; fixed tensors (indices, seeds, bases) are
    # not state, so the load itself must bring them off the meta device.
    source = mp.apply_mask(nn.Linear(4, 3), {"weight": make()})
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    mp.apply_mask(model, {"weight": make()})
    model.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 4)
    assert torch.equal(model(x), source(x))
    assert mp.verify(model) == []
