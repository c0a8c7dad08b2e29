"""``torch.inference_mode()`` (core/inference.py): the calls that change a model's structure refuse
to run in it, before changing anything, and name the fix; copies in place (a checkpoint of the
same sizes) still load there, and the model trains on afterwards."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import maskparam as mp

FIX = r"call it outside torch.inference_mode\(\); torch.no_grad\(\) is fine"


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _masked(density: float, seed: int, layout: str = "auto") -> nn.Sequential:
    rules = {"0.weight": mp.Mask(mp.masks.random(density, seed=seed), layout=layout)}
    return mp.apply_mask(_net(), rules)


def _trains(model: nn.Module) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    assert mp.verify(model) == []


def _same(model: nn.Module, before: dict[str, torch.Tensor], objects: list[torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(a is b for a, b in zip(list(model.parameters()), objects, strict=True))


def _loads(
    load: Callable[[nn.Module, dict[str, torch.Tensor]], object], source: Callable[[], nn.Module]
):
    """A call that loads the state of ``source()``, built now (outside inference mode)."""
    state = copy.deepcopy(source().state_dict())
    return lambda m: load(m, state)


def _loads_trainable() -> Callable[[nn.Module], object]:
    state = mp.trainable_state_dict(_masked(0.3, 0))
    return lambda m: mp.load_trainable_state_dict(m, state)


UPDATE = {"0.weight": mp.Mask(mp.masks.random(0.5, seed=1))}
APPLY = {"2.weight": mp.Mask(mp.masks.random(0.3, seed=0))}

# case -> (the subject its refusal names, a factory of the call, run outside inference mode)
CALLS: dict[str, tuple[str, Callable[[], Callable[[nn.Module], object]]]] = {
    "update_masks": (
        "update_masks",
        lambda: lambda m: mp.update_masks(m, UPDATE, optimizer=None),
    ),
    "load another density (torch)": (
        "load_state_dict into Sequential",
        lambda: _loads(nn.Module.load_state_dict, lambda: _masked(0.5, 1)),
    ),
    "load another density (mp)": (
        "mp.load_state_dict",
        lambda: _loads(mp.load_state_dict, lambda: _masked(0.5, 1)),
    ),
    "load the other layout (torch)": (
        "load_state_dict into Sequential",
        lambda: _loads(nn.Module.load_state_dict, lambda: _masked(0.3, 0, layout="dense")),
    ),
    "load_trainable_state_dict": ("load_trainable_state_dict", _loads_trainable),
    "apply_mask": ("apply_mask", lambda: lambda m: mp.apply_mask(m, APPLY)),
    "preview": ("preview", lambda: lambda m: mp.preview(m, APPLY)),
    "remove_parametrizations": (
        "remove_parametrizations",
        lambda: mp.remove_parametrizations,
    ),
    "GradualPruning.step": ("GradualPruning", lambda: _pruning_step),
}


def _pruning_step(model: nn.Module) -> None:
    pruning = mp.GradualPruning(
        model, {"0.weight": mp.masks.magnitude}, sparsity=0.9, end=1, optimizer=None
    )
    pruning.step()  # its first step updates the masks


@pytest.mark.parametrize("case", list(CALLS))
def test_a_call_that_changes_structure_refuses_inference_mode_and_changes_nothing(case):
    subject, prepare = CALLS[case]
    call = prepare()
    model = _masked(0.3, 0)  # compact
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = list(model.parameters())
    with torch.inference_mode(), pytest.raises(mp.MaskparamError, match=FIX) as refused:
        call(model)
    assert str(refused.value).startswith(f"{subject}: called inside torch.inference_mode()")
    _same(model, before, objects)
    _trains(model)


@pytest.mark.parametrize("case", list(CALLS))
def test_the_same_call_under_no_grad_works_and_the_model_trains_on(case):
    call = CALLS[case][1]()
    model = _masked(0.3, 0)
    with torch.no_grad():
        call(model)
    _trains(model)


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_a_checkpoint_of_the_same_sizes_loads_in_inference_mode_and_trains_on(layout):
    # Other masks of the same density: copies in place (a compact layout derives its positions
    # again, as a normal tensor that the next backward can save).
    model = _masked(0.3, 0, layout)
    source = _masked(0.3, 7, layout)
    assert not torch.equal(mp.kept_entries(model, "0.weight"), mp.kept_entries(source, "0.weight"))
    with torch.inference_mode():
        model.load_state_dict(copy.deepcopy(source.state_dict()))
    assert torch.equal(mp.kept_entries(model, "0.weight"), mp.kept_entries(source, "0.weight"))
    _trains(model)
