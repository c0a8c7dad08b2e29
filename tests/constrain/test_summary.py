"""summary (_summary.py): free entries (what trains) against the total, per tensor and for the
model. Each constraint's own description is tested in its file (constraints/test_*.py)."""

from __future__ import annotations

import torch
from torch import nn

import maskparam as mp


def test_counts_free_entries_per_constraint():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 10, 3), nn.Linear(4, 4))
    all_entries = sum(p.numel() for p in model.parameters())  # a compact layout stores fewer
    mp.apply_mask(
        model,
        {
            "0.weight": mp.Triangular(),
            "1.weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9]),
            "2.weight": mp.Mask(mp.masks.random(0.25)),
        },
    )
    model[2].bias.requires_grad_(False)
    result = mp.summary(model)
    rows = {row.name: row for row in result.tensors}
    assert (rows["0.weight"].free, rows["0.weight"].total) == (10, 16)
    assert (rows["1.weight"].free, rows["1.weight"].total) == (90, 180)
    assert rows["1.weight"].constraint == "Freeze(dim=0, 5 slices)"
    assert (rows["2.weight"].free, rows["2.weight"].total) == (4, 16)
    assert result.total == all_entries
    # biases 4 + 10 train, the last bias (4) is frozen by requires_grad
    assert result.trainable == 10 + 4 + 90 + 10 + 4
    text = str(result)
    assert "1.weight  Freeze(dim=0, 5 slices)" in text
    assert f"trainable entries: 118 of {all_entries:,}" in text


def test_unconstrained_model_has_no_rows():
    result = mp.summary(nn.Linear(3, 3))
    assert result.tensors == ()
    assert (result.trainable, result.total) == (12, 12)
    assert str(result).endswith("trainable entries: 12 of 12 (100.0%)")


def test_free_entries_of_a_frozen_parameter_are_zero():
    layer = nn.Linear(3, 3)
    layer.weight.requires_grad_(False)
    mp.apply_mask(layer, {"weight": mp.Mask(torch.ones(3, 3))})
    assert mp.summary(layer).tensors[0].free == 0


def test_summary_says_what_a_generator_selects_and_what_trains_a_subspace():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.Linear(4, 4), nn.Linear(4, 2))
    mp.apply_mask(model, {
        "0.weight": mp.Mask(mp.masks.filters([5, 6, 7, 8, 9])),
        "1.weight": mp.Freeze(mp.masks.magnitude(0.9)),
        "2.*": mp.Subspace(3, group="head"),
    })  # fmt: skip
    rows = {t.name: t for t in mp.summary(model).tensors}
    # 50% of the filters: stored compact, and the summary says so (the layout "auto" chose)
    assert rows["0.weight"].constraint == "Mask(keeps slices [5, 6, 7, 8, 9] along dim 0, compact)"
    assert rows["1.weight"].constraint == "Freeze(freezes the 10% largest |w|)"
    assert rows["2.weight"].trained_through == "θ of 'head' (3)"
    assert "θ of 'head' (3)" in str(mp.summary(model))
