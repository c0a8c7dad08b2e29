"""Triangular (constraints/triangular.py): entries outside the triangle are exactly zero and get
exactly zero gradient, inside they pass unchanged; only matrices (and batches of them)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import DTYPES, LAYOUTS, MATRIX_SHAPES
from torch import nn

import maskparam as mp


@given(MATRIX_SHAPES, DTYPES, st.integers(-3, 3), st.booleans(), LAYOUTS)
def test_triangular_gradient_is_exactly_zero_outside_the_triangle(
    make_holder, backward, shape, dtype, diagonal, lower, layout
):
    holder = make_holder(shape, dtype)
    if not -shape[-2] <= diagonal <= shape[-1]:  # beyond the matrix: a mistake, refused
        with pytest.raises(mp.MaskparamError, match="lies beyond"):
            mp.apply_mask(holder, {"weight": mp.Triangular(lower, diagonal)})
        return
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Triangular(lower=lower, diagonal=diagonal, layout=layout)})
    ones = torch.ones(shape, dtype=torch.bool)
    inside = ones.tril(diagonal) if lower else ones.triu(diagonal)
    assert torch.equal(holder.weight[inside], before[inside])
    assert torch.equal(holder.weight[~inside], torch.zeros_like(before[~inside]))
    upstream, grad = backward(holder, 1)
    assert torch.equal(grad[~inside], torch.zeros_like(grad[~inside]))
    assert torch.equal(grad[inside], upstream[inside])


def test_a_vector_is_refused_and_the_model_left_untouched(tiny, snapshot):
    before = snapshot(tiny)
    with pytest.raises(
        mp.MaskparamError,
        match=re.compile(
            r"Triangular for 'fc1.bias'.*needs a matrix.*shape \(6,\).*fix: select only", re.DOTALL
        ),
    ):
        mp.apply_mask(tiny, {"fc1.bias": mp.Triangular()})
    before.assert_same(tiny)


@pytest.mark.parametrize("saved", ["upper-compact", "mask-dense", "mask-compact"])
def test_a_compact_triangle_refuses_a_checkpoint_of_other_free_entries(saved, snapshot):
    # from the newcomer's attack on the architecture: a compact triangle took any mask
    # from a checkpoint and stopped being triangular, with verify() == [].
    sources = {
        "upper-compact": mp.Triangular(lower=False, layout="compact"),
        "mask-dense": mp.Mask(mp.masks.random(0.5, seed=1), layout="dense"),
        "mask-compact": mp.Mask(mp.masks.random(0.6, seed=1), layout="compact"),
    }
    source = mp.apply_mask(nn.Linear(5, 5), {"weight": sources[saved]})
    model = mp.apply_mask(nn.Linear(5, 5), {"weight": mp.Triangular(layout="compact")})
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match="free entries are not this Triangular"):
        model.load_state_dict(source.state_dict())
    before.assert_same(model)
    assert mp.verify(model) == []
    assert int((model.weight.triu(1) != 0).sum()) == 0
