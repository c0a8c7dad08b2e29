"""SWA and EMA (torch.optim.swa_utils.AveragedModel) over constrained models keep every
constraint, and bake exactly; learnable masks must be hardened before averaging."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import maskparam as mp


def _constrained() -> tuple[nn.Sequential, torch.Tensor]:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    kept = mp.masks.random(0.5, seed=1)(model[0].weight)
    mp.apply_mask(model, {
        "0.weight": mp.Mask(kept),
        "2.weight": mp.Triangular(),
        "4.weight": mp.Freeze(dim=0, index=[1]),
    })  # fmt: skip
    return model, kept


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_model_keeps_every_constraint(kind, train):
    model, kept = _constrained()
    frozen_row = model[4].weight[1].detach().clone()
    averaged = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(0.9) if kind == "ema" else None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for _ in range(6):
        train(model, x, steps=1, optimizer=optimizer, target=y)
        averaged.update_parameters(model)
    inner = averaged.module
    assert torch.equal(inner[0].weight.detach()[~kept], torch.zeros(int((~kept).sum())))
    assert torch.equal(inner[2].weight.detach().triu(1), torch.zeros(6, 6))
    assert torch.equal(inner[4].weight.detach()[1], frozen_row)
    assert mp.verify(inner) == []
    # The averaged model is a different model from the trained one (it did average).
    assert not torch.equal(inner[0].weight, model[0].weight)
    # Because each constraint is affine, the average of effective tensors is the effective
    # tensor of the averaged originals: baking the averaged model is exact.
    with torch.no_grad():
        before = averaged(x)
        mp.remove_parametrizations(inner)
        assert torch.equal(averaged(x), before)


def test_averaging_learnable_scores_is_refused_so_harden_first():
    # Averaging scores is not averaging effective weights: scores +0.5 and -1.5 average to a mask
    # of zeros, the weights to W/2. AveragedModel gives no hook to refuse the averaging, so
    # maskparam refuses the deep copy AveragedModel starts with, and names the fix.
    model = nn.Linear(4, 4)
    mp.apply_mask(model, {"weight": mp.LearnableMask()})
    scores = model.parametrizations.weight[0].scores
    with pytest.raises(mp.MaskparamError, match=r"(?s)AveragedModel over a LearnableMask.*harden"):
        AveragedModel(model)
    copy.deepcopy(model)  # any other deep copy still works

    # Harden first: only the weights are averaged, under one fixed mask, exactly.
    with torch.no_grad():
        scores.fill_(0.5)
    mp.harden(model)
    averaged = AveragedModel(model)
    original = model.parametrizations.weight.original
    first = original.detach().clone()
    averaged.update_parameters(model)
    with torch.no_grad():
        original.mul_(3.0)
    averaged.update_parameters(model)
    assert torch.equal(averaged.module.weight.detach(), (first + 3.0 * first) / 2)
