"""layout="auto": compact where it pays and is possible, dense elsewhere; checkpoints and optimizer
state of either layout load into either."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUT_SPECS, is_compact, mlp
from torch import nn

import maskparam as mp
from maskparam.constraints.compact import AUTO_COMPACT_MAX_FREE, CompactScatter


@pytest.mark.parametrize("kind", list(LAYOUT_SPECS))
def test_auto_is_compact_for_a_trainable_parameter_at_half_density(kind):
    model = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind]("auto")})
    assert is_compact(model)
    assert "compact" in mp.summary(model).tensors[0].constraint


@pytest.mark.parametrize(
    ("why", "build"),
    [
        ("mostly free", lambda: mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Mask(mp.masks.random(0.9))})),
        ("frozen parameter", lambda: _frozen_then(mp.Mask(mp.masks.random(0.5)))),
        ("stacked second", lambda: mp.apply_mask(
            mlp(8, 8, 3), {"0.weight": [mp.Triangular(layout="dense"), mp.Mask(mp.masks.random(0.5))]}
        )),
        ("meta device", lambda: _on_meta(mp.Mask(mp.masks.random(0.5)))),
        ("frozen slices", lambda: mp.apply_mask(
            mlp(8, 8, 3), {"0.weight": mp.Freeze(dim=0, index=[0, 1, 2, 3, 4])}
        )),
    ],
)  # fmt: skip
def test_auto_is_dense_where_compact_cannot_pay_or_work(why, build):
    model = build()
    stack = model[0].parametrizations.weight
    assert not any(isinstance(c, CompactScatter) for c in stack), why
    assert stack.original.shape == (8, 8)


def _frozen_then(spec: mp.Spec) -> nn.Module:
    model = mlp(8, 8, 3)
    model[0].weight.requires_grad_(False)
    return mp.apply_mask(model, {"0.weight": spec})


def _on_meta(spec: mp.Spec) -> nn.Module:
    with torch.device("meta"):
        model = mlp(8, 8, 3)
    return mp.apply_mask(model, {"0.weight": spec})


def test_auto_on_tied_weights_is_dense_and_the_tie_holds():
    model = mlp(8, 8, 3)
    model[2] = nn.Linear(8, 8)
    model[2].weight = model[0].weight
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.random(0.5))})
    assert not is_compact(model)
    assert model[0].weight is not None
    assert torch.equal(model[0].weight, model[2].weight)


def test_the_threshold_is_inclusive_and_counts_broadcast_masks_in_full():
    rows = torch.zeros(10, 1, dtype=torch.bool)
    rows[: int(AUTO_COMPACT_MAX_FREE * 10)] = True  # exactly 60% of the rows, broadcast
    layer = mp.apply_mask(nn.Linear(4, 10), {"weight": mp.Mask(rows)})
    assert isinstance(layer.parametrizations.weight[0], CompactScatter)
    rows[int(AUTO_COMPACT_MAX_FREE * 10)] = True  # 70%
    layer = mp.apply_mask(nn.Linear(4, 10), {"weight": mp.Mask(rows)})
    assert not isinstance(layer.parametrizations.weight[0], CompactScatter)


@pytest.mark.parametrize("load", ["torch", "mp"])
@pytest.mark.parametrize(("saved", "loaded"), [("dense", "compact"), ("compact", "dense")])
@pytest.mark.parametrize("kind", list(LAYOUT_SPECS))
def test_a_checkpoint_of_either_layout_loads_into_either(kind, saved, loaded, load, train):
    torch.manual_seed(0)
    source = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind](saved)})
    train(source, torch.randn(5, 8), steps=3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    torch.manual_seed(1)  # other weights, and (for Mask and Freeze) the checkpoint's masks rule
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind](loaded)})
    assert is_compact(target) == (loaded == "compact")
    before = {k: v.clone() for k, v in state.items()}
    if load == "torch":
        target.load_state_dict(state)
    else:
        mp.load_state_dict(target, state)
    assert all(torch.equal(state[k], before[k]) for k in state)  # the caller's dict is untouched
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert torch.equal(mp.kept_entries(target, "0.weight"), mp.kept_entries(source, "0.weight"))
    assert mp.verify(target) == []
    train(target, x, steps=1)  # and it trains on
    assert mp.verify(target) == []


def test_a_compact_checkpoint_of_another_triangle_is_refused_and_nothing_loads():
    # (A dense Triangular stores no state: its checkpoint cannot say which triangle it was.)
    source = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Triangular(lower=False, layout="compact")})
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Triangular(layout="dense")})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises((mp.MaskparamError, RuntimeError)):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(mp.MaskparamError):
        mp.load_state_dict(target, source.state_dict())


def test_a_corrupt_mask_is_refused_after_translation_and_nothing_loads():
    source = mp.apply_mask(
        mlp(8, 8, 3), {"0.weight": mp.Mask(mp.masks.random(0.5), layout="dense")}
    )
    state = source.state_dict()
    state["0.parametrizations.weight.0.mask"][0, 0] = 2
    target = mp.apply_mask(mlp(8, 8, 3), {"0.weight": mp.Mask(mp.masks.random(0.5))})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(mp.MaskparamError, match=r"mask: 1 values are neither 0 nor 1"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
