"""mp.kept_entries, mp.frozen_entries and mp.subspace_theta: every constraint, layout and stack."""

from __future__ import annotations

import pytest
import torch
from helpers import TiedEmbeddingLM
from torch import nn

import maskparam as mp

KEEP = mp.masks.random(0.5, seed=3)


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_kept_entries_is_the_mask_in_either_layout(layout):
    layer = nn.Linear(5, 4)
    keep = KEEP(layer.weight)
    mp.apply_mask(layer, {"weight": mp.Mask(keep, layout=layout)})
    assert torch.equal(mp.kept_entries(layer, "weight"), keep)


def test_kept_entries_combines_a_stack_and_follows_a_learnable_mask():
    layer = nn.Linear(4, 4)
    keep = KEEP(layer.weight)
    mp.apply_mask(layer, {"weight": [mp.Mask(keep), mp.Triangular()]})
    assert torch.equal(mp.kept_entries(layer, "weight"), keep & torch.ones(4, 4).tril().bool())
    learnable = mp.apply_mask(nn.Linear(4, 4), {"weight": mp.LearnableMask()})
    with torch.no_grad():
        learnable.parametrizations.weight[0].scores[0].fill_(-1.0)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0] = False
    assert torch.equal(mp.kept_entries(learnable, "weight"), expected)


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_frozen_entries_gives_the_frozen_values(layout, train):
    layer = nn.Linear(5, 4)
    frozen = KEEP(layer.weight)
    before = layer.weight.detach().clone()
    mp.apply_mask(layer, {"weight": mp.Freeze(frozen, layout=layout)})
    train(layer, torch.randn(8, 5), steps=2)
    entries, values = mp.frozen_entries(layer, "weight")
    assert torch.equal(entries, frozen)
    assert torch.equal(values[frozen], before[frozen])
    assert torch.equal(values[~frozen], torch.zeros(int((~frozen).sum())))


def test_subspace_theta_by_group_or_tensor_and_errors_name_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mp.apply_mask(model, {"*": mp.Subspace(3, group="all")})
    theta = mp.subspace_theta(model, "all")
    assert theta is mp.subspace_theta(model, "0.weight") is mp.subspace_theta(model, "1.bias")
    assert theta.requires_grad
    with pytest.raises(mp.MaskparamError, match=r"(?s)no subspace group.*known: \['0.bias'"):
        mp.subspace_theta(model, "other")
    with pytest.raises(mp.MaskparamError, match="no tensor of this name"):
        mp.kept_entries(model, "2.weight")
    plain = nn.Linear(2, 2)
    with pytest.raises(mp.MaskparamError, match="is constrained by maskparam"):
        mp.frozen_entries(plain, "weight")


def test_sparsity_counts_every_masked_tensor_once_and_kept_masks_name_them():
    """A tied weight counts once; unmasked (or otherwise constrained) tensors do not count;
    kept_masks are full-shape bool masks by the names a user sees."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    mp.apply_mask(net, {"0.weight": mp.Mask(mp.masks.rows([0])), "1.weight": mp.Triangular()})
    assert mp.sparsity(net) == 0.75
    masks = mp.kept_masks(net)
    assert list(masks) == ["0.weight"]
    assert masks["0.weight"].dtype == torch.bool
    assert masks["0.weight"].shape == (4, 4)
    assert mp.sparsity(torch.nn.Linear(2, 2)) == 0.0
    tied = mp.apply_mask(TiedEmbeddingLM(), {"emb.weight": mp.Mask(mp.masks.rows([0, 1]))})
    assert list(mp.kept_masks(tied)) == ["emb.weight"]
    assert mp.sparsity(tied) == 0.8
