"""SWA and EMA (torch.optim.swa_utils.AveragedModel, and timm-style EMA over the state_dict) over
constrained models keep every constraint (integer index buffers included), and bake exactly;
learnable masks must be hardened before averaging."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import refusal_of, square_sum_steps
from torch import Tensor, nn
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


EMA_DECAY = 0.9


FROZEN_ROWS = [3, 5]  # 3 * 0.9 + 3 * 0.1 truncates to 2 in float32


FREE_ROWS = [0, 1, 2, 4]


EMA_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_dim": lambda: mp.Freeze(dim=0, index=FROZEN_ROWS),
    "freeze_rows_compact": lambda: mp.Freeze(mp.masks.rows(FROZEN_ROWS), layout="compact"),
    "mask_rows_compact": lambda: mp.Mask(mp.masks.rows(FREE_ROWS), layout="compact"),
}


def _ema_model(kind: str) -> tuple[nn.Linear, Tensor]:
    model = mp.apply_mask(nn.Linear(6, 6), {"weight": EMA_SPECS[kind]()})
    return model, model.weight.detach()[FROZEN_ROWS].clone()  # frozen values, or zeros


# from the no-silent-failure attack on 0.1 (item 4: EMA over buffers averaged maskparam's integer index buffers)
@pytest.mark.parametrize("kind", list(EMA_SPECS))
def test_ema_with_buffers_keeps_constraints(kind):
    model, constant_rows = _ema_model(kind)
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    expected = None  # the EMA of the model's effective weight, as AveragedModel computes it
    for _ in range(3):
        square_sum_steps(model, optimizer, x, steps=1)
        averaged.update_parameters(model)
        weight = model.weight.detach()
        expected = weight.clone() if expected is None else expected.lerp(weight, 1 - EMA_DECAY)
    result = averaged.module.weight.detach()
    assert torch.equal(result[FROZEN_ROWS], constant_rows)
    assert torch.equal(result[FREE_ROWS], expected[FREE_ROWS])


# from the no-silent-failure attack on 0.1 (item 4: EMA over buffers averaged maskparam's integer index buffers)
@pytest.mark.parametrize("which", ["all_tensors", "floating_only"])
@pytest.mark.parametrize("kind", list(EMA_SPECS))
def test_timm_style_ema_over_state_dict_keeps_constraints(kind, which):
    """timm's ModelEmaV2 updates every state_dict entry (`ema * d + (1 - d) * model`), integer
    ones included; ModelEmaV3 only floating ones. Frozen values are floats that the user's
    arithmetic rounds (v * d + (1 - d) * v != v), so they are compared to 1e-6 here."""
    model, constant_rows = _ema_model(kind)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    expected = model.weight.detach().clone()
    for _ in range(3):
        square_sum_steps(model, optimizer, x, steps=1)
        with torch.no_grad():
            model_state = model.state_dict()
            for key, value in ema.state_dict().items():
                if which == "all_tensors" or value.is_floating_point():
                    value.copy_(value * EMA_DECAY + (1 - EMA_DECAY) * model_state[key])
            expected = expected * EMA_DECAY + (1 - EMA_DECAY) * model.weight
    result = ema.weight.detach()
    assert torch.allclose(result[FROZEN_ROWS], constant_rows, rtol=1e-6, atol=0)
    assert torch.equal(result[FREE_ROWS], expected[FREE_ROWS])


# from the no-silent-failure attack on 0.1 (item 4, found by a helper)
def test_ema_with_buffers_keeps_subspace_checkpoint_loadable():
    """Found by helper: AveragedModel(use_buffers=True) with EMA 0.9 turns the int64 seed buffer
    3 into 2, so the averaged model's checkpoint is refused by a model built with seed=3."""
    model = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2, seed=3)})
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        square_sum_steps(model, optimizer, torch.randn(4, 4), steps=1)
        averaged.update_parameters(model)
    fresh = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2, seed=3)})
    fresh.load_state_dict(averaged.module.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), averaged.module(x))


# from the no-silent-failure attack on 0.1 (item 13: averaging learnable masks)
def test_swa_over_learnable_mask_averages_effective_weights_or_refuses():
    layer = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.LearnableMask()})
    scores = layer.parametrizations.weight[0].scores
    effective = []

    def average() -> AveragedModel:
        averaged = AveragedModel(layer)
        for value in (0.5, -1.5):  # the hard mask keeps everything, then nothing
            with torch.no_grad():
                scores.fill_(value)
            effective.append(layer.weight.detach().clone())
            averaged.update_parameters(layer)
        return averaged

    averaged: list[AveragedModel] = []
    if refusal_of(lambda: averaged.append(average())) is None:
        mean = (effective[0] + effective[1]) / 2
        assert torch.allclose(averaged[0].module.weight, mean, rtol=1e-6, atol=0)
