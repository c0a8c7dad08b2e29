"""``update_masks`` on a ``channels_last`` conv (memory formats): entries that change side are
written in place through ``core/positions.py``, the stored original and the optimizer state keep
their memory format, and the result is the contiguous model's bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maskparam as mp


def _convs(memory_format: torch.memory_format) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return model.to(memory_format=memory_format)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


SPECS = {
    "mask": lambda density, seed, layout: mp.Mask(
        mp.masks.random(density, seed=seed), layout=layout
    ),
    "freeze": lambda density, seed, layout: mp.Freeze(
        mp.masks.random(1 - density, seed=seed), layout=layout
    ),
}


@pytest.mark.parametrize("layout", ["compact", "dense"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_update_masks_on_a_channels_last_conv_writes_entries_in_place(kind, layout):
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    model = mp.apply_mask(_convs(torch.channels_last), {"*.weight": SPECS[kind](0.3, 1, layout)})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _step(model, optimizer, x)
    before = {n: model[i].weight.detach().clone() for i, n in ((0, "0"), (2, "2"))}
    kept_before = {n: mp.kept_entries(model, f"{n}.weight") for n in before}
    stored = [model[i].parametrizations.weight.original for i in (0, 2)]
    # Entries become free (regrown, unfrozen): they are written into the stored original.
    mp.update_masks(model, {"*.weight": SPECS[kind](0.6, 2, layout)}, optimizer=optimizer)
    reference = mp.apply_mask(
        _convs(torch.contiguous_format), {"*.weight": SPECS[kind](0.6, 2, layout)}
    )
    for i, n in ((0, "0"), (2, "2")):
        assert model[i].parametrizations.weight.original is stored[i // 2]
        kept = mp.kept_entries(model, f"{n}.weight")
        assert torch.equal(kept, mp.kept_entries(reference, f"{n}.weight"))
        effective = model[i].weight.detach()
        if kind == "freeze":  # freezing and unfreezing change no value
            assert torch.equal(effective, before[n])
        else:  # kept entries keep their value, regrown ones start from zero
            stays = kept & kept_before[n]
            assert torch.equal(effective[stays], before[n][stays])
            assert not effective[~stays].any()
        if layout == "dense":
            assert stored[i // 2].is_contiguous(memory_format=torch.channels_last)
    _step(model, optimizer, x)
    assert mp.verify(model) == []
