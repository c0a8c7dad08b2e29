"""apply_mask: what it changes, what it keeps, and how rules combine."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

import maskparam as mp


def test_returns_the_model_and_keeps_the_parameter_object(tiny):
    weight = tiny.fc1.weight
    assert mp.apply_mask(tiny, {"fc1.weight": mp.Triangular()}) is tiny
    # The optimizer tracks Parameters by identity: the original must be the same object.
    assert tiny.fc1.parametrizations.weight.original is weight
    assert parametrize.is_parametrized(tiny.fc1, "weight")
    assert not parametrize.is_parametrized(tiny.fc2)


def test_every_selector_kind_in_one_call(tiny):
    mp.apply_mask(
        tiny,
        {
            "fc1.weight": mp.Triangular(),
            re.compile(r"fc2\.(weight|bias)"): mp.Mask(mp.masks.random(0.5)),
            (nn.Conv2d, "weight"): mp.Freeze(dim=0, index=[0, 1]),
            lambda name, module, t: name == "head.bias": mp.Freeze(torch.tensor([True, False])),
        },
    )
    constrained = {row.name for row in mp.summary(tiny).tensors}
    assert constrained == {"fc1.weight", "fc2.weight", "fc2.bias", "conv.weight", "head.bias"}


def test_wildcards_pass_over_integer_buffers(tiny):
    mp.apply_mask(tiny, {"*": mp.Mask(mp.masks.random(1.0))})
    names = {row.name for row in mp.summary(tiny).tensors}
    assert "position_ids" not in names
    assert "norm.num_batches_tracked" not in names
    # BatchNorm updates its running statistics in place: wildcards pass over them too.
    assert "norm.running_mean" not in names
    assert {"conv.weight", "norm.weight", "head.bias"} <= names
    assert tiny.position_ids.dtype == torch.int64


def test_stacked_specs_apply_in_order():
    layer = nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    frozen = torch.zeros(4, 4, dtype=torch.bool)
    frozen[0, 0] = frozen[3, 0] = True
    # Triangular first, then Freeze: the frozen values are those of the triangle.
    mp.apply_mask(layer, {"weight": [mp.Triangular(), mp.Freeze(frozen)]})
    assert torch.equal(layer.weight, before.tril())
    assert len(layer.parametrizations.weight) == 2
    row = mp.summary(layer).tensors[0]
    assert row.constraint == "Triangular(lower, diagonal=0) + Freeze(mask)"
    assert row.free == 10 - 2


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_buffers_can_be_targets():
    module = Scaled()
    mp.apply_mask(module, {"scale": mp.Mask(torch.tensor([1, 1, 0, 1]))})
    assert torch.equal(module(torch.ones(4)), torch.tensor([1.0, 2.0, 0.0, 4.0]))
    assert "parametrizations.scale.original" in module.state_dict()


def test_strict_false_allows_rules_that_match_nothing(tiny, snapshot):
    before = snapshot(tiny)
    mp.apply_mask(tiny, {"no.such.tensor": mp.Triangular()}, strict=False)
    before.assert_same(tiny)


def test_shared_module_reached_by_two_names_is_one_tensor():
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": shared, "b": shared})
    mp.apply_mask(model, {"b.weight": mp.Triangular()})
    assert [row.name for row in mp.summary(model).tensors] == ["a.weight"]  # one tensor, found once
    assert torch.equal(model.a.weight.triu(1), torch.zeros(3, 3))  # constrained under either name


def test_user_parametrization_below_ours_keeps_working():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    mask = torch.rand(4, 4) < 0.5
    mp.apply_mask(layer, {"weight": mp.Mask(mask)})
    assert len(layer.parametrizations.weight) == 2
    assert bool((layer.weight[~mask] == 0).all())
    row = mp.summary(layer).tensors[0]
    assert (row.name, row.free, row.total) == ("weight", int(mask.sum()), 16)


def test_assigning_the_tensor_keeps_the_constraint():
    layer = nn.Linear(3, 3)
    mp.apply_mask(layer, {"weight": mp.Triangular()})
    layer.weight = torch.ones(3, 3)
    assert torch.equal(layer.weight, torch.ones(3, 3).tril())
