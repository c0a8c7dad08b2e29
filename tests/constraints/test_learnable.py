"""LearnableMask (constraints/learnable.py): hard and soft modes, mask_penalty, harden (threshold
and target sparsity, a soft scale folded, a tied weight kept tied), export, summary, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import mlp, outcome_is_exact_or_refused, zeros_like_selected
from torch import Tensor, nn

import maskparam as mp
from maskparam.constraints.mask import MaskConstraint


def _train(model: nn.Module, steps: int, penalty: float) -> None:
    # Not the shared `train` fixture: the loss adds the mask penalty.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + penalty * mp.mask_penalty(
            model, normalize=True
        )
        loss.backward()
        optimizer.step()


def test_hard_mode_leaves_outputs_unchanged_and_scores_train():
    model = mlp(8, 16, 4)
    x = torch.randn(5, 8)
    before = model(x)
    mp.apply_mask(model, {"*.weight": mp.LearnableMask()})
    assert torch.equal(model(x), before)
    scores = model[0].parametrizations.weight[0].scores
    assert any(p is scores for p in model.parameters())
    model(x).square().sum().backward()
    assert scores.grad is not None
    assert bool((scores.grad != 0).any())  # straight-through: the scores learn


def test_hard_masks_are_exactly_binary_and_masked_entries_exactly_zero():
    model = mlp(8, 16, 4)
    mp.apply_mask(model, {"*.weight": mp.LearnableMask()})
    _train(model, steps=60, penalty=1.0)
    masks = mp.learned_masks(model)
    for name, mask in masks.items():
        assert bool(((mask == 0) | (mask == 1)).all()), name
        weight = model.get_submodule(name.split(".")[0]).weight.detach()
        assert torch.equal(weight[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert min(float(m.mean()) for m in masks.values()) < 1.0  # the penalty pruned something


def test_soft_mode_scales_by_the_documented_start_value():
    layer = nn.Linear(3, 3)
    before = layer.weight.detach().clone()
    mp.apply_mask(layer, {"weight": mp.LearnableMask("soft", temperature=2.0)})
    expected = before * torch.sigmoid(torch.full((3, 3), 6.0) / 2.0)
    assert torch.equal(layer.weight, expected)
    assert torch.equal(mp.learned_masks(layer)["weight"], torch.sigmoid(torch.full((3, 3), 3.0)))


def test_mask_penalty_is_the_l1_of_mask_values_and_differentiable():
    model = mlp(8, 16, 4)
    mp.apply_mask(model, {"0.weight": mp.LearnableMask("soft"), "2.weight": mp.LearnableMask()})
    values = mp.learned_masks(model)
    total = sum(float(v.sum()) for v in values.values())
    count = sum(v.numel() for v in values.values())
    assert mp.mask_penalty(model).item() == pytest.approx(total)
    assert mp.mask_penalty(model, normalize=True).item() == pytest.approx(total / count)
    mp.mask_penalty(model).backward()
    hard_scores = model[2].parametrizations.weight[0].scores
    assert torch.equal(hard_scores.grad, torch.ones_like(hard_scores))  # straight-through L1


def test_harden_then_export_keeps_outputs_exactly():
    model = mlp(8, 16, 4)
    mp.apply_mask(model, {"*.weight": mp.LearnableMask()})
    _train(model, steps=40, penalty=1.0)
    x = torch.randn(7, 8)
    with torch.no_grad():
        before = model(x)
    densities = mp.harden(model)
    assert set(densities) == {"0.weight", "2.weight"}
    assert isinstance(model[0].parametrizations.weight[0], MaskConstraint)
    assert not any(".scores" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    mp.remove_parametrizations(model)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_harden_to_a_global_target_sparsity():
    model = mlp(8, 16, 4)
    mp.apply_mask(model, {"*.weight": mp.LearnableMask("soft")})
    _train(model, steps=10, penalty=0.5)
    densities = mp.harden(model, sparsity=0.8)
    zeros = sum(
        int((m.mask == 0).sum())
        for m in (model[0].parametrizations.weight[0], model[2].parametrizations.weight[0])
    )
    assert zeros == round(0.8 * (8 * 16 + 16 * 4))
    kept = densities["0.weight"] * 8 * 16 + densities["2.weight"] * 16 * 4
    assert round(kept) == (8 * 16 + 16 * 4) - zeros  # the reported densities add up


def test_harden_per_tensor_sparsity():
    model = mlp(8, 16, 4)
    mp.apply_mask(model, {"*.weight": mp.LearnableMask("soft")})
    _train(model, steps=5, penalty=0.5)
    densities = mp.harden(model, sparsity=0.75, per_tensor=True)
    assert densities == {"0.weight": 0.25, "2.weight": 0.25}


def test_summary_shows_density_and_counts_scores():
    layer = nn.Linear(4, 4)
    mp.apply_mask(layer, {"weight": mp.LearnableMask()})
    result = mp.summary(layer)
    assert result.tensors[0].constraint == "LearnableMask(hard, density 100.0%)"
    assert result.trainable == 16 + 4 + 16  # weight, bias and the 16 scores


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mp.mask_penalty(nn.Linear(2, 2)), "Linear has no learnable mask"),
        (lambda: mp.harden(nn.Linear(2, 2)), "Linear has no learnable mask"),
        (lambda: mp.LearnableMask("medium"), "unknown mode 'medium'"),
        (lambda: mp.LearnableMask(temperature=0.0), "temperature must be a finite positive number"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(mp.MaskparamError, match=re.escape(message)):
        call()


def test_harden_refuses_bad_sparsity_before_changing_anything():
    layer = nn.Linear(2, 2)
    mp.apply_mask(layer, {"weight": mp.LearnableMask()})
    with pytest.raises(mp.MaskparamError, match="sparsity must be a number between 0 and 1"):
        mp.harden(layer, sparsity=1.5)
    assert "weight" in mp.learned_masks(layer)


def test_harden_folds_a_soft_scale_into_the_kept_weights_exactly():
    layer = mp.apply_mask(nn.Linear(5, 4), {"weight": mp.LearnableMask("soft")})
    with torch.no_grad():
        layer.parametrizations.weight[0].scores.copy_(torch.randn(4, 5) * 3)
    kept = layer.parametrizations.weight[0].scores.detach() > 0
    before = layer.weight.detach().clone()
    mp.harden(layer)
    after = layer.weight.detach()
    assert torch.equal(after[kept], before[kept])  # the same float product w * m
    assert torch.equal(after[~kept], torch.zeros(int((~kept).sum())))
    assert mp.verify(layer) == []


def test_harden_without_fold_keeps_the_weights_unscaled():
    layer = mp.apply_mask(nn.Linear(5, 4), {"weight": mp.LearnableMask("soft")})
    raw = layer.parametrizations.weight.original.detach().clone()
    mp.harden(layer, fold=False)
    assert torch.equal(layer.parametrizations.weight.original, raw)
    assert torch.equal(layer.weight, raw)  # every score starts at 3T > 0: all kept, unscaled


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


# from the no-silent-failure attack on 0.1 (item 5: harden on a tied LearnableMask)
@pytest.mark.parametrize(
    "kwargs", [{}, {"sparsity": 0.75}, {"threshold": 0.5}], ids=["default", "sparsity", "threshold"]
)
def test_harden_tied_learnable_mask_keeps_the_tie(kwargs):
    model = mp.apply_mask(TiedLM(), {"emb.weight": mp.LearnableMask()})
    with torch.no_grad():
        scores = model.emb.parametrizations.weight[0].scores
        scores.copy_(torch.randn_like(scores))
    ids = torch.arange(8)
    before = model(ids).detach()
    mp.harden(model, **kwargs)
    hardened = model(ids).detach()
    assert torch.equal(model.emb.weight, model.head.weight), "the tie split"
    assert not [n for n, _ in model.named_parameters() if n.endswith("scores")]
    if not kwargs:
        assert torch.equal(hardened, before)
    mp.remove_parametrizations(model)
    assert model.emb.weight is model.head.weight
    assert torch.equal(model(ids), hardened)


# from the no-silent-failure attack on 0.1 (item 13: hardening learnable masks)
def test_harden_soft_mask_keeps_outputs_or_says_how_to_fold():
    layer = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.LearnableMask("soft")})
    scores = layer.parametrizations.weight[0].scores
    with torch.no_grad():
        scores.copy_(torch.randn_like(scores) * 3)
    kept = scores.detach() > 0
    before = layer.weight.detach().clone()

    def check() -> None:
        after = layer.weight.detach()
        assert torch.equal(after[~kept], zeros_like_selected(after, ~kept))
        # The kept entries keep their scaled values: the scale is folded into the weight.
        assert torch.allclose(after[kept], before[kept], rtol=1e-6, atol=1e-6)

    outcome_is_exact_or_refused(lambda: mp.harden(layer), check, layer, match="(?i)fold")
