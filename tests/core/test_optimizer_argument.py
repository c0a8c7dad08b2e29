"""Optimizer state has one owner, the optimizer, and maskparam moves it only in the optimizers a
call is given (``optimizer=``): no hook, no registry, nothing run at a step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks

import maskparam as mp


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 2) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_no_optimizer_hook_is_ever_registered():
    model = mp.apply_mask(_model(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    optimizer = torch.optim.Adam(model.parameters())
    _steps(model, optimizer)
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)
    mp.remove_parametrizations(model, optimizer=optimizer)
    _steps(model, optimizer)
    assert len(_global_optimizer_pre_hooks) == 0
    assert len(optimizer._optimizer_step_pre_hooks) == 0


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_an_update_that_changes_what_is_stored_needs_the_optimizer(layout):
    model = mp.apply_mask(
        _model(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1), layout=layout)}
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, optimizer)
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"no optimizer was passed(?s:.*)optimizer=None"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)})  # regrows entries
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert str(optimizer.state_dict()) == str(state)
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)
    _steps(model, optimizer)
    assert mp.verify(model) == []


def test_pruning_a_dense_layout_changes_nothing_stored_and_needs_no_optimizer():
    model = mp.apply_mask(
        _model(), {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5), layout="dense")}
    )
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)})  # only prunes
    assert sum(int((model[i].weight == 0).sum()) for i in (0, 2)) == round(0.8 * 96)


def test_optimizer_none_says_that_none_holds_state():
    model = mp.apply_mask(_model(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=None)
    optimizer = torch.optim.Adam(model.parameters())  # created afterwards
    _steps(model, optimizer)
    assert mp.verify(model) == []


def test_state_laid_out_for_other_entries_is_refused_before_anything_changes():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    _steps(model, optimizer)  # full-shape state
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})  # not passed
    with pytest.raises(mp.MaskparamError, match=r"laid out for other entries"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)


def test_apply_and_bake_lay_out_the_state_of_the_optimizers_they_are_given():
    dense = _model()
    compact = copy.deepcopy(dense)
    results, optimizers = [], []
    for model, layout in ((dense, "dense"), (compact, "compact")):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        _steps(model, optimizer)  # state from before apply_mask
        rules = {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1), layout=layout)}
        mp.apply_mask(model, rules, optimizer=optimizer)
        _steps(model, optimizer)
        results.append(torch.cat([model[i].weight.detach().reshape(-1) for i in (0, 2)]))
        optimizers.append(optimizer)
    torch.testing.assert_close(results[1], results[0])  # the kept entries trained alike
    kept = mp.kept_entries(compact, "0.weight")
    stored = compact[0].parametrizations.weight.original
    compact_state = dict(optimizers[1].state[stored])
    mp.remove_parametrizations(compact, optimizer=optimizers[1])
    for key in ("exp_avg", "exp_avg_sq"):
        full = optimizers[1].state[compact[0].weight][key]
        assert full.shape == (8, 8)
        assert torch.equal(full[kept], compact_state[key])
        assert torch.equal(full[~kept], torch.zeros(int((~kept).sum())))  # fresh
    _steps(compact, optimizers[1])


def test_a_load_with_other_masks_moves_the_state_of_the_optimizer_it_is_given():
    def run(layout: str) -> torch.Tensor:
        model = mp.apply_mask(
            _model(), {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)}
        )
        other = mp.apply_mask(
            _model(), {"*.weight": mp.Mask(mp.masks.random(0.5, seed=2), layout=layout)}
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _steps(model, optimizer)
        mp.load_state_dict(model, other.state_dict(), optimizer=optimizer)
        _steps(model, optimizer)
        return torch.cat(
            [model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)]
        )

    torch.testing.assert_close(run("compact"), run("dense"))


def test_adafactor_on_a_compact_tensor_is_refused_where_it_is_passed():
    model = _model()
    optimizer = torch.optim.Adafactor(model.parameters())
    with pytest.raises(mp.MaskparamError, match="layout='dense'"):
        mp.apply_mask(
            model, {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))}, optimizer=optimizer
        )
    assert not mp.summary(model).tensors  # nothing applied


def test_an_optimizer_holding_a_frozen_original_without_theta_is_refused():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(mp.MaskparamError, match="would train nothing"):
        mp.apply_mask(model, {"0.weight": mp.Subspace(3)}, optimizer=optimizer)
    assert not mp.summary(model).tensors
    assert model[0].weight.requires_grad


def test_the_optimizer_argument_is_checked():
    model = mp.apply_mask(_model(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    with pytest.raises(mp.MaskparamError, match="optimizer must be a torch.optim.Optimizer"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer="adam")
