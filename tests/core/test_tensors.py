"""Discovery (_tensors.py): which tensors a rule can select, under the names a user sees;
wildcards skip what cannot or should not be constrained; shared modules, tied weights and one
Parameter under two names are one tensor, constrained under every name."""

from __future__ import annotations

import pytest
import torch
from helpers import outcome_is_exact_or_refused
from torch import nn
from torch.nn.utils import parametrize

import maskparam as mp


def test_wildcards_pass_over_integer_buffers(tiny):
    mp.apply_mask(tiny, {"*": mp.Mask(mp.masks.random(1.0))})
    names = {row.name for row in mp.summary(tiny).tensors}
    assert "position_ids" not in names
    assert "norm.num_batches_tracked" not in names
    # BatchNorm updates its running statistics in place: wildcards pass over them too.
    assert "norm.running_mean" not in names
    assert {"conv.weight", "norm.weight", "head.bias"} <= names
    assert tiny.position_ids.dtype == torch.int64


def test_shared_module_reached_by_two_names_is_one_tensor():
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": shared, "b": shared})
    mp.apply_mask(model, {"b.weight": mp.Triangular()})
    assert [row.name for row in mp.summary(model).tensors] == ["a.weight"]  # one tensor, found once
    assert torch.equal(model.a.weight.triu(1), torch.zeros(3, 3))  # constrained under either name


def test_a_rule_naming_the_tied_side_constrains_both():
    embed = nn.Embedding(12, 5)
    head = nn.Linear(5, 12, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    mp.apply_mask(model, {"head.weight": mp.Mask(mp.masks.rows([0, 1]))})
    assert torch.equal(model.embed.weight[2:], torch.zeros(10, 5))


class RopeLike(nn.Module):
    """A trainable Linear, a RoPE-style non-persistent float buffer and a frozen sinusoidal
    position table (requires_grad=False, like Whisper's embed_positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.embed_positions = nn.Embedding(6, 4)
        self.embed_positions.weight.requires_grad_(False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4)
        self.register_buffer("inv_freq", inv_freq, persistent=False)


# from the no-silent-failure attack on 0.1 (item 8: wildcards select what users do not mean)
@pytest.mark.parametrize("selector", ["*", "*.weight"])
def test_wildcards_skip_nonpersistent_buffers_and_frozen_parameters(selector):
    model = RopeLike()
    inv_freq = model.inv_freq.clone()
    positions = model.embed_positions.weight.detach().clone()
    mp.apply_mask(model, {selector: mp.Mask(mp.masks.magnitude(0.5))})
    assert parametrize.is_parametrized(model.fc, "weight")  # the rule did apply
    assert not parametrize.is_parametrized(model, "inv_freq")
    assert torch.equal(model.inv_freq, inv_freq)
    assert not parametrize.is_parametrized(model.embed_positions, "weight")
    assert torch.equal(model.embed_positions.weight, positions)


# from the no-silent-failure attack on 0.1 (item 9: one Parameter under two names of one module)
@pytest.mark.parametrize("name", ["a", "b"])
def test_one_parameter_two_names_both_constrained_or_refused(name):
    module = nn.Module()
    module.a = nn.Parameter(torch.randn(3, 3))
    module.b = module.a
    expected = module.a.detach().tril()

    def check() -> None:
        assert torch.equal(module.a, expected)
        assert torch.equal(module.b, expected)

    outcome_is_exact_or_refused(
        lambda: mp.apply_mask(module, {name: mp.Triangular()}), check, module, match="'[ab]'"
    )
