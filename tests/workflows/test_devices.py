"""Devices: build a constrained model on the meta device (or under torch.device("meta")),
materialize it with to_empty, load a checkpoint: it computes what the trained model computes, or
is refused clearly. (The compact layout needs real tensors and says so:
constraints/test_compact.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import mlp, refusal_of, subspace_linear
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


# from the no-silent-failure attack on 0.1 (crashes: the meta device)
@pytest.mark.parametrize("projection", ["gaussian", "fastfood"])
def test_meta_subspace_load_with_assign_works_or_refuses(projection):
    source = subspace_linear(projection)
    model = nn.Linear(4, 3, device="meta")
    mp.apply_mask(model, {"weight": mp.Subspace(3, projection=projection)})
    x = torch.randn(2, 4)

    def load_and_run() -> None:
        model.load_state_dict(source.state_dict(), assign=True)
        assert torch.equal(model(x), source(x))

    refusal = refusal_of(load_and_run)
    assert refusal is None or "'weight'" in str(refusal)


def _loads_to_the_same_outputs(model: nn.Module, source: nn.Module) -> None:
    """A model built on meta, once materialised and loaded, computes what ``source`` computes."""
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(model(x), source(x))


# from the no-silent-failure attack on 0.1 (crashes: the meta device)
def test_meta_sparse_subspace_applies_or_refuses():
    source = subspace_linear("sparse")
    model = nn.Linear(4, 3, device="meta")
    refusal = refusal_of(
        lambda: mp.apply_mask(model, {"weight": mp.Subspace(3, projection="sparse")})
    )
    if refusal is not None:
        assert "'weight'" in str(refusal)
        return
    _loads_to_the_same_outputs(model, source)


# from the no-silent-failure attack on 0.1 (crashes: the meta device, found by a helper)
def test_fastfood_applied_under_meta_device_context_works_or_refuses():
    """Found by helper: the README's order ("apply under torch.device('meta')") crashes for
    Fastfood with "Tensor.item() cannot be called on meta tensors" (its seeded buffers are
    drawn under the meta default device)."""
    source = subspace_linear("fastfood")
    with torch.device("meta"):
        model = nn.Linear(4, 3)
        refusal = refusal_of(
            lambda: mp.apply_mask(model, {"weight": mp.Subspace(3, projection="fastfood")})
        )
    if refusal is not None:
        assert "'weight'" in str(refusal)
        return
    _loads_to_the_same_outputs(model, source)


# from the attack on newcomer workflows (0.2)
def test_freeze_slices_applied_under_the_meta_device_context_materialises() -> None:
    torch.manual_seed(0)
    rules = {"0.weight": mp.Freeze(dim=0, index=[0, 3])}
    trained = mp.apply_mask(mlp(16, 16, 3), rules)
    with torch.device("meta"):
        model = mp.apply_mask(mlp(16, 16, 3), rules)
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(model(x), trained(x))
    assert mp.verify(model) == []
