"""``rewind``: the lottery-ticket procedure (prune, reset the survivors to their early values,
train again): to a copy taken before apply, to a copy with another mask, to a state_dict (plain
or the model's own), with BatchNorm buffers; refusals that change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_same_bits,
    linear_weights,
    mlp,
    prune_run,
    pruning_steps,
    same_snapshot_with_summary,
    snapshot_with_summary,
    sparse_linear,
    state_bits,
    train_steps,
)
from torch import nn

import maskparam as mp


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("early_kind", ["plain state_dict", "constrained copy"])
def test_lottery_ticket_rewind_resets_survivors_and_keeps_the_mask(layout, early_kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    if early_kind == "constrained copy":
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.2), layout=layout)})
    train_steps(model, x, steps=2)
    early: object = (
        copy.deepcopy(model)
        if early_kind == "constrained copy"
        else copy.deepcopy(model.state_dict())
    )
    reference = (
        mp.remove_parametrizations(copy.deepcopy(model))
        if early_kind != "plain state_dict"
        else None
    )
    early_weights = [
        (reference if reference is not None else model)[i].weight.detach().clone() for i in (0, 2)
    ]
    train_steps(model, x, steps=5)
    if early_kind == "plain state_dict":
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.8), layout=layout)})
    else:
        mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)}, optimizer=None)
    kept = [model[i].weight != 0 for i in (0, 2)]
    mp.rewind(model, early)  # type: ignore[arg-type]
    for i, k, w in zip((0, 2), kept, early_weights, strict=True):
        assert torch.equal(model[i].weight[k], w[k])  # survivors rewound, bit for bit
        assert bool((model[i].weight[~k] == 0).all())  # the mask holds
    assert mp.verify(model) == []
    train_steps(model, x, steps=2)
    assert mp.verify(model) == []


def test_rewind_refuses_what_it_cannot_rewind_and_changes_nothing():
    model = mp.apply_mask(nn.Linear(4, 4), {"weight": mp.Subspace(3)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="Subspace"):
        mp.rewind(model, {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)})
    with pytest.raises(mp.MaskparamError, match="not in `to`"):
        mp.rewind(nn.Linear(4, 4), {"weight": torch.zeros(4, 4)})
    with pytest.raises(mp.MaskparamError, match="shape"):
        mp.rewind(nn.Linear(4, 4), {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# from the attack on the pruning toolkit
def test_rewind_to_a_copy_taken_before_apply():
    """Lottery ticket: rewind to a deep copy from before apply: survivors get early values."""
    model = mlp(8, 16, 4, seed=0)
    early = copy.deepcopy(model)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.8, end=4, every=2, optimizer=None
    )
    prune_run(model, pruning, 5)
    mp.rewind(model, early)
    for i in (0, 2):
        kept = model[i].weight != 0
        assert torch.equal(model[i].weight[kept], early[i].weight[kept])
        assert torch.equal(model[i].bias, early[i].bias)
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
def test_rewind_to_a_copy_with_another_mask():
    """Rewind to a copy taken after update_masks of another density: each free entry gets the
    copy's effective value (0 where the copy had pruned it), masks unchanged."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 2)
    later = copy.deepcopy(model)
    mp.update_masks(later, {"*.weight": mp.masks.global_magnitude(0.9)}, optimizer=None)
    mask_before = [mp.kept_entries(model, f"{i}.weight").clone() for i in (0, 2)]
    mp.rewind(model, later)
    for i, mask in zip((0, 2), mask_before, strict=True):
        assert torch.equal(mp.kept_entries(model, f"{i}.weight"), mask)
        expected = torch.where(mask.bool(), later[i].weight.detach(), torch.zeros(()))
        assert torch.equal(model[i].weight.detach(), expected)
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
def test_rewind_to_a_state_dict_with_extra_or_missing_keys_is_refused_unchanged():
    """rewind(strict=True) to a state_dict with an extra or a missing key: MaskparamError, model
    unchanged."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    plain = {k: v.clone() * 2 for k, v in mlp(8, 16, 4, seed=3).state_dict().items()}
    before = snapshot_with_summary(model)
    extra = dict(plain, **{"9.weight": torch.zeros(2, 2)})
    with pytest.raises(mp.MaskparamError, match="9.weight"):
        mp.rewind(model, extra)
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))
    missing = {k: v for k, v in plain.items() if k != "2.bias"}
    with pytest.raises(mp.MaskparamError, match="2.bias"):
        mp.rewind(model, missing)
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))
    mp.rewind(model, missing, strict=False)
    assert torch.equal(model[0].bias, plain["0.bias"])


# from the attack on the pruning toolkit
def test_rewind_to_the_models_own_constrained_state_dict():
    """rewind(model, model.state_dict() saved earlier): the constrained keys are understood or
    refused clearly, never silently skipped."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    early = copy.deepcopy(model.state_dict())
    early_weights = linear_weights(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 2)
    try:
        mp.rewind(model, early)
    except mp.MaskparamError:
        return
    for e, g in zip(early_weights, linear_weights(model), strict=True):
        assert torch.equal(e, g)


# from the attack on the pruning toolkit
def test_rewind_with_batchnorm_buffers():
    """rewind to an early copy of a model with BatchNorm: running stats rewind too, masks stay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    early = copy.deepcopy(model)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5))})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 3)
    assert not torch.equal(model[1].running_mean, early[1].running_mean)
    mp.rewind(model, early)
    assert torch.equal(model[1].running_mean, early[1].running_mean)
    assert torch.equal(model[1].running_var, early[1].running_var)
    assert torch.equal(model[1].num_batches_tracked, early[1].num_batches_tracked)
    assert mp.verify(model) == []


# from the attack on to_sparse and trainable_state_dict
def test_rewind_onto_sparse_model_is_refused_clearly():
    """mp.rewind(sparse_model, dense_copy) rewinds or raises a MaskparamError; model unchanged."""
    model = nn.Sequential(sparse_linear())
    earlier = copy.deepcopy(model)
    mp.to_sparse(model, layout="csr")
    before = state_bits(model)
    with pytest.raises(mp.MaskparamError, match="0.weight"):
        mp.rewind(model, earlier)
    assert_same_bits(model, before)


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_a_rewind_that_fails_on_one_tensor_rewinds_none(layout):
    """Every value is checked and converted before the first is written: a value that cannot be
    copied (here a meta tensor) fails the call by name, with every tensor unchanged."""
    model = mlp(6, 8, 3, seed=0)
    early = {k: v.clone() for k, v in model.state_dict().items()}
    early["2.weight"] = torch.empty(3, 8, device="meta")
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.magnitude(0.5), layout=layout)})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.MaskparamError, match="'2.weight'"):
        mp.rewind(model, early)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.ones(4, 4, dtype=torch.bool), r"a bool tensor \(torch.bool\); the tensor is float"),
        (torch.ones(4, 4, dtype=torch.int64), r"an integer tensor \(torch.int64\)"),
        (torch.ones(4, 4, dtype=torch.complex64), r"complex tensor"),
    ],
)
def test_rewind_refuses_values_of_another_kind_than_the_weight_and_changes_nothing(value, message):
    """A dict of masks (bool), integer or complex tensors is not a set of weights: rewinding to
    it would set every weight to 1.0 (or drop an imaginary part)."""
    model = mp.apply_mask(nn.Linear(4, 4), {"weight": mp.Mask(mp.masks.magnitude(0.5))})
    before = state_bits(model)
    with pytest.raises(mp.MaskparamError, match=r"'weight': rewind's value is"):
        mp.rewind(model, {"weight": value, "bias": torch.zeros(4)})
    with pytest.raises(mp.MaskparamError, match=message):
        mp.rewind(model, {"weight": value, "bias": torch.zeros(4)})
    assert_same_bits(model, before)


def test_rewind_takes_a_value_of_another_width():
    model = nn.Linear(2, 2)
    early = {"weight": torch.ones(2, 2, dtype=torch.float64), "bias": torch.zeros(2).half()}
    mp.rewind(model, early)
    assert torch.equal(model.weight, torch.ones(2, 2))
    assert model.weight.dtype == torch.float32
