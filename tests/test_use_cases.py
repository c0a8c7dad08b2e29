"""The four user scenarios that started the project, each answered and proven: a
lower-triangular weight (question 000), training in a subspace θ₀ + E·θ (001), a fixed random
mask (002), and five of ten conv filters frozen (003); and the demo (``python -m maskparam``) that
shows them, a learnable mask averaged by SWA included."""

from __future__ import annotations

import torch
from torch import nn

import maskparam as mp
from maskparam._demo import main, run_demo


# question 000
def test_lower_triangle_trains_upper_stays_exactly_zero_under_adamw(train):
    torch.manual_seed(0)
    model = nn.Linear(5, 5)
    mp.apply_mask(model, {"weight": mp.Triangular(lower=True)})
    lower_before = model.weight.detach().tril().clone()
    x, y = torch.randn(64, 5), torch.randn(64, 5)
    train(
        model,
        x,
        steps=20,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        target=y,
    )
    assert torch.equal(model.weight.detach().triu(1), torch.zeros(5, 5))
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert bool((model.weight.detach()[lower] != lower_before[lower]).all())


# question 001
def test_subspace_params_D_is_E_params_d_plus_params_0_and_only_params_d_trains():
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    total = sum(p.numel() for p in model.parameters())
    basis = torch.randn(total, 5) * 3.0  # not normalised, and must stay so
    flat_before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mp.apply_mask(model, {"*": mp.Subspace(5, basis=basis, group="mine")})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.parametrizations.weight.0.coordinates.theta"]
    theta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    with torch.no_grad():
        model[0].parametrizations.weight[0].coordinates.theta.copy_(theta)
        flat = torch.cat(
            [model[0].weight.reshape(-1), model[0].bias, model[2].weight.reshape(-1), model[2].bias]
        )
    # The question: params_D = E @ params_d + params_0, in parameters_to_vector order.
    torch.testing.assert_close(flat, basis @ theta + flat_before, rtol=0, atol=1e-5)


# question 002
def test_fixed_random_mask_keeps_masked_weights_at_zero(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=0))})
    masks = {i: mp.kept_entries(model, f"{i}.weight") for i in (0, 2)}
    train(model, torch.randn(16, 8), steps=10)
    for i, mask in masks.items():
        assert torch.equal(model[i].weight.detach()[~mask], torch.zeros(int((~mask).sum())))


# question 003
def test_five_of_ten_filters_stay_bit_identical(train):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, 3)
    mp.apply_mask(conv, {"weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9])})
    before = conv.weight.detach().clone()
    train(
        conv,
        torch.randn(4, 3, 8, 8),
        steps=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    )
    after = conv.weight.detach()
    assert torch.equal(after[5:], before[5:])
    assert bool((after[:5] != before[:5]).any(dim=(1, 2, 3)).all())


def test_demo_verifies_every_scenario(capsys):
    checks = run_demo(steps=20)
    assert len(checks) == 16  # five scenarios answer the four questions
    assert all(check.ok for check in checks), [c for c in checks if not c.ok]
    assert main() == 0
    printed = capsys.readouterr().out
    assert "16 of 16 checks held." in printed
    assert "max |upper triangle|" in printed
