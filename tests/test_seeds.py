"""The seed questions that started the project, each answered and proven (shared/seeds/)."""

from __future__ import annotations

import torch
from torch import nn

import maskparam as mp
from maskparam._demo import main, run_demo


def test_seed_000_lower_triangle_trains_upper_stays_exactly_zero_under_adamw():
    torch.manual_seed(0)
    model = nn.Linear(5, 5)
    mp.apply_mask(model, {"weight": mp.Triangular(lower=True)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    lower_before = model.weight.detach().tril().clone()
    x, y = torch.randn(64, 5), torch.randn(64, 5)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert torch.equal(model.weight.detach().triu(1), torch.zeros(5, 5))
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert bool((model.weight.detach()[lower] != lower_before[lower]).all())


def test_seed_002_fixed_random_mask_keeps_masked_weights_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=0))})
    masks = {i: model[i].parametrizations.weight[0].mask.bool() for i in (0, 2)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(10):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        optimizer.step()
    for i, mask in masks.items():
        assert torch.equal(model[i].weight.detach()[~mask], torch.zeros(int((~mask).sum())))


def test_seed_003_five_of_ten_filters_stay_bit_identical():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, 3)
    mp.apply_mask(conv, {"weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9])})
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(10):
        optimizer.zero_grad()
        conv(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    after = conv.weight.detach()
    assert torch.equal(after[5:], before[5:])
    assert bool((after[:5] != before[:5]).any(dim=(1, 2, 3)).all())


def test_demo_verifies_every_scenario(capsys):
    checks = run_demo(steps=20)
    assert len(checks) == 9
    assert all(check.ok for check in checks), [c for c in checks if not c.ok]
    assert main() == 0
    printed = capsys.readouterr().out
    assert "9 of 9 checks held." in printed
    assert "max |upper triangle|" in printed
