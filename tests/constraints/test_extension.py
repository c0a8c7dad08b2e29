"""A constraint defined only in the tests (``tests/block_mask.py``: whole 2 x 2 tiles kept or
zeroed) goes through every stage of the lifecycle, with no line of maskparam naming it: apply,
train, update_masks, GradualPruning, checkpoints, optimizer state by name, trainable state,
rewind, verify, bake. (It is a case of ``tests/test_matrix.py`` too.)"""

from __future__ import annotations

import copy

import pytest
import torch
from block_mask import BlockMask, block_magnitude
from torch import nn

import maskparam as mp

TILES = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
FULL = TILES.repeat_interleave(2, 0).repeat_interleave(2, 1)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))


def _rules() -> dict[str, object]:
    return {"0.weight": BlockMask(FULL), "2.weight": mp.Mask(mp.masks.random(0.5, seed=1))}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_a_test_only_constraint_applies_trains_and_verifies():
    model = mp.apply_mask(_model(), _rules())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    _train(model, optimizer)
    assert torch.equal(model[0].weight == 0, ~FULL)
    assert mp.verify(model) == []
    row = next(t for t in mp.summary(model).tensors if t.name == "0.weight")
    assert (row.constraint, row.free, row.total) == ("BlockMask", int(FULL.sum()), 36)


def test_update_masks_gives_it_a_new_mask_and_fresh_state_where_tiles_regrow():
    model = mp.apply_mask(_model(), _rules())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, optimizer)
    stored = model[0].parametrizations.weight.original
    everything = torch.ones(6, 6, dtype=torch.bool)
    mp.update_masks(model, {"0.weight": everything}, optimizer=optimizer)
    regrown = ~FULL
    assert torch.equal(model[0].weight.detach()[regrown], torch.zeros(int(regrown.sum())))
    for value in optimizer.state[stored].values():
        if value.dim():
            assert torch.equal(value[regrown], torch.zeros_like(value[regrown]))
    mp.update_masks(model, {"0.weight": block_magnitude(0.5)}, optimizer=optimizer)
    assert int((model[0].weight != 0).sum()) in (16, 20)  # 4 or 5 tiles of 9 (round(4.5) = 4)
    assert mp.verify(model) == []


def test_a_mask_it_cannot_take_is_refused_before_anything_changes():
    model = mp.apply_mask(_model(), _rules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer)
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    partial = FULL.clone()
    partial[0, 2] = True  # part of a tile that is not kept
    with pytest.raises(mp.MaskparamError, match="part of a 2 x 2 tile"):
        mp.update_masks(model, {"0.weight": partial, "2.weight": mp.masks.magnitude(0.9)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert str(optimizer.state_dict()) == str(state)


def test_gradual_pruning_drives_it_on_its_schedule():
    model = mp.apply_mask(_model(), {"0.weight": BlockMask(torch.ones(6, 6, dtype=torch.bool))})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = mp.GradualPruning(
        model,
        {"0.weight": block_magnitude},
        sparsity=2 / 3,
        end=4,
        every=2,
        optimizer=optimizer,
    )
    for _ in range(4):
        _train(model, optimizer, steps=1)
        pruning.step()
    assert int((model[0].weight != 0).sum()) == 3 * 4  # 3 of 9 tiles
    assert mp.verify(model) == []


def test_its_checkpoint_loads_into_another_init_and_after_an_update():
    model = mp.apply_mask(_model(), _rules())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, optimizer)
    mp.update_masks(model, {"0.weight": block_magnitude(2 / 3)}, optimizer=optimizer)
    saved = copy.deepcopy(mp.optimizer_state_dict(optimizer, model))  # as torch.save would
    fresh = mp.apply_mask(_model(seed=5), _rules())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))
    assert "checkpoint" in mp.summary(fresh).tensors[0].constraint  # its mask is the checkpoint's
    resumed = torch.optim.Adam(fresh.parameters(), lr=0.1)
    mp.load_optimizer_state_dict(resumed, fresh, saved)
    _train(model, optimizer)
    _train(fresh, resumed)
    assert torch.equal(fresh(x), model(x))


def test_its_trainable_state_round_trips_with_a_changed_mask():
    base = _model()
    model = mp.apply_mask(copy.deepcopy(base), _rules())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, optimizer)
    mp.update_masks(model, {"0.weight": block_magnitude(2 / 3)}, optimizer=optimizer)
    state = mp.trainable_state_dict(model)
    assert "0.weight.free_positions" in state  # the mask changed after apply
    other = mp.apply_mask(copy.deepcopy(base), _rules())
    mp.load_trainable_state_dict(other, state, optimizer=None)
    x = torch.randn(4, 6)
    assert torch.equal(other(x), model(x))


def test_rewind_and_bake_keep_its_zeros():
    model = mp.apply_mask(_model(), _rules())
    early = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, optimizer)
    mp.rewind(model, early)
    assert torch.equal(model[0].weight, early[0].weight)
    effective = model[0].weight.detach().clone()
    mp.remove_parametrizations(model)
    assert type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight, effective)


def test_it_stands_behind_either_layout_and_its_checkpoint_crosses_layouts():
    def stack(layout: str) -> dict[str, object]:
        return {"0.weight": [mp.Mask(mp.masks.random(0.6, seed=2), layout=layout), BlockMask(FULL)]}

    model = mp.apply_mask(_model(), stack("compact"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, optimizer)
    # Regrow every tile: the entries arrive through the compact layout before it.
    everything = BlockMask(torch.ones(6, 6, dtype=torch.bool))  # names which mask of the stack
    mp.update_masks(model, {"0.weight": everything}, optimizer=optimizer)
    assert mp.verify(model) == []
    kept = mp.kept_entries(model, "0.weight")
    regrown = kept & ~FULL
    assert bool(regrown.any())
    assert torch.equal(model[0].weight.detach()[regrown], torch.zeros(int(regrown.sum())))
    dense = mp.apply_mask(_model(seed=9), stack("dense"))
    dense.load_state_dict(model.state_dict())  # the compact checkpoint, translated
    x = torch.randn(4, 6)
    assert torch.equal(dense(x), model(x))
    back = mp.apply_mask(_model(seed=8), stack("compact"))
    back.load_state_dict(dense.state_dict())  # and the dense one back into compact
    assert torch.equal(back(x), model(x))


class _KeepColumns(mp.Constraint):
    """Whole columns kept or zeroed; its take_mask answers with masks of one row (they
    broadcast to the tensor), as a per-column constraint naturally would."""

    selects_entries = True
    mask_spec = mp.Mask
    mask_buffer = "columns"

    def __init__(self, columns: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("columns", columns.to(torch.uint8).reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.columns.bool(), x, 0.0)

    def pins(self, value: torch.Tensor) -> mp.Pins:
        return mp.Pins(~self.columns.bool().expand_as(value), torch.zeros_like(value))

    def describe(self) -> str:
        return "KeepColumns"

    def free_for_mask(self, selected: torch.Tensor) -> torch.Tensor:
        return selected

    def take_mask(self, selected: torch.Tensor, current: torch.Tensor, what: str) -> mp.MaskChange:
        before = self.columns.bool().clone()
        self.columns.copy_(selected.reshape(1, -1))
        after = self.columns.bool().clone()
        return mp.MaskChange(before, after, torch.where(after & ~before, 0.0, current))


def test_a_mask_change_that_broadcasts_regrows_the_right_entries():
    layer = nn.Linear(4, 3)
    columns = torch.tensor([True, False, True, False])
    mp.apply_mask(layer, {"weight": mp.Mask(columns)})  # dense first: the stored original
    mp.remove_parametrizations(layer)
    with torch.no_grad():
        layer.weight.fill_(5.0)  # every stored value nonzero: a regrown entry must start at 0
    built = _KeepColumns(columns)
    layer = mp.apply_mask(layer, {"weight": _Spec(built)})
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    mp.update_masks(
        layer, {"weight": torch.tensor([[True, True, True, False]])}, optimizer=optimizer
    )
    assert torch.equal(layer.weight[:, 1], torch.zeros(3))  # column 1 regrown from zero
    momentum = optimizer.state[layer.parametrizations.weight.original]["momentum_buffer"]
    assert torch.equal(momentum[:, 1], torch.zeros(3))  # with fresh state
    assert bool((momentum[:, 0] != 0).all())  # the others keep theirs
    assert mp.verify(layer) == []


class _Spec(mp.Spec):
    def __init__(self, built: mp.Constraint) -> None:
        self.built = built

    def build(self, name: str, tensor: torch.Tensor) -> mp.Constraint:
        return self.built
