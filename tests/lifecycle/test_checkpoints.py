"""Checkpoints (_checkpoints.py, and torch's own state_dict): a constrained model's state_dict
restores it exactly; mp.load_state_dict loads a plain checkpoint into a constrained model; the
mistakes (a constrained checkpoint into a plain model, torch.save of the module) name the fix.
Constraint-specific round trips (a compact index, a subspace seed) are in constraints/."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from helpers import mlp

import maskparam as mp


def _rules() -> mp.Rules:
    return {
        "conv.weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9]),
        "fc1.weight": mp.Mask(mp.masks.magnitude(0.6)),  # depends on the weights: differs per seed
        "fc2.weight": [mp.Triangular(), mp.Freeze(mp.masks.random(0.3, seed=3))],
        "head.*": mp.Mask(mp.masks.random(0.5, seed=7)),
    }


def test_fresh_model_with_other_seeds_restores_bit_identical_outputs(make_tiny, tiny_input, train):
    torch.manual_seed(1)
    trained = mp.apply_mask(make_tiny(), _rules())
    train(trained, tiny_input, steps=5)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(2)
    fresh = mp.apply_mask(make_tiny(), _rules())
    assert not torch.equal(fresh.fc1.weight, trained.fc1.weight)
    fresh.load_state_dict(state)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tiny_input), trained(tiny_input))
    # The masks themselves came from the checkpoint, not from the fresh weights.
    assert torch.equal(mp.kept_entries(fresh, "fc1.weight"), mp.kept_entries(trained, "fc1.weight"))


def test_state_dict_holds_masks_and_frozen_values_compactly(tiny):
    mp.apply_mask(tiny, _rules())
    state = tiny.state_dict()
    # fc1 keeps 40%: stored compact, its mask 1 byte per entry and only the kept entries
    free = state["fc1.parametrizations.weight.0.free"]
    assert free.dtype == torch.uint8
    assert state["fc1.parametrizations.weight.original"].shape == (int(free.sum()),)
    frozen = state["conv.parametrizations.weight.0.frozen_values"]
    assert frozen.shape == (5, 3, 3, 3)  # only the frozen filters are stored
    assert torch.equal(state["conv.parametrizations.weight.0.index"], torch.tensor([5, 6, 7, 8, 9]))
    assert "fc2.parametrizations.weight.1.keep" in state


def test_plain_checkpoint_into_constrained_model(train):
    pretrained = mlp(6, 8, 3)
    plain_state = pretrained.state_dict()
    model = mp.apply_mask(mlp(6, 8, 3), {
        "0.weight": mp.Freeze(dim=0, index=[1, 2]),
        "2.weight": mp.Mask(mp.masks.random(0.5, seed=3)),
        "0.bias": mp.Freeze(torch.tensor([True] + [False] * 7)),
    })  # fmt: skip
    mp.load_state_dict(model, plain_state)
    # As if the rules had been applied to the pretrained model: frozen values are the new ones.
    assert torch.equal(model[0].weight, plain_state["0.weight"])
    assert torch.equal(model[0].bias, plain_state["0.bias"])
    kept = mp.kept_entries(model, "2.weight")
    assert torch.equal(model[2].weight, plain_state["2.weight"] * kept)
    assert torch.equal(model[2].bias, plain_state["2.bias"])
    # and training keeps them frozen from there
    train(model, torch.randn(3, 6), steps=1)
    assert torch.equal(model[0].weight[[1, 2]], plain_state["0.weight"][[1, 2]])


def test_loading_a_plain_checkpoint_does_not_alias_it(train):
    pretrained = mlp(6, 8, 3)
    state = pretrained.state_dict()
    reference = {k: v.clone() for k, v in state.items()}
    model = mp.apply_mask(mlp(6, 8, 3), {"*.weight": mp.Mask(mp.masks.random(0.5))})
    mp.load_state_dict(model, state)
    train(model, torch.randn(2, 6), steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, reference[key]), key  # training did not write into it


def test_constrained_checkpoint_into_plain_model_names_the_fix():
    constrained = mp.apply_mask(mlp(6, 8, 3), {"0.weight": mp.Triangular()})
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)holds constraints.*'0.parametrizations.weight.original'.*apply the same rules.*remove_parametrizations",
    ):
        mp.load_state_dict(mlp(6, 8, 3), constrained.state_dict())


def test_load_state_dict_strict_reports_missing_keys():
    model = mp.apply_mask(mlp(6, 8, 3), {"0.weight": mp.Triangular()})
    state = mlp(6, 8, 3).state_dict()
    del state["2.bias"]
    with pytest.raises(mp.MaskparamError, match=re.escape("missing keys: ['2.bias']")):
        mp.load_state_dict(model, state)
    assert mp.load_state_dict(model, state, strict=False).missing_keys == ["2.bias"]


def test_torch_save_of_the_module_names_the_fix():
    model = mp.apply_mask(mlp(6, 8, 3), {"*.weight": mp.Mask(mp.masks.random(0.5))})
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)torch.save.*model.state_dict\(\).*remove_parametrizations\(copy.deepcopy",
    ):
        torch.save(model, io.BytesIO())
    baked = mp.remove_parametrizations(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.save(baked, buffer)  # the fix works
    buffer.seek(0)
    x = torch.randn(2, 6)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))
