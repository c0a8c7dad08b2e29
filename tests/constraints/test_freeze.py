"""Freeze (constraints/freeze.py): by mask or by slices, frozen entries keep their values bit for
bit (a frozen -0.0 too) and get exactly zero gradient, the rest train; applying changes no
output; bad specs, and tensors Freeze(dim=...) cannot slice."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from helpers import assert_state_unchanged, square_sum_steps, state_of
from hypothesis import given
from hypothesis import strategies as st
from strategies import DENSITIES, DTYPES, LAYOUTS, SEEDS, SHAPES
from torch import nn

import maskparam as mp


@given(SHAPES, DTYPES, DENSITIES, SEEDS, LAYOUTS)
def test_freeze_mask_gradient_is_exactly_zero_where_frozen(
    make_holder, backward, shape, dtype, density, seed, layout
):
    holder = make_holder(shape, dtype)
    frozen = mp.masks.random(density, seed)(holder.weight)
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Freeze(frozen, layout=layout)})
    assert torch.equal(holder.weight, before)  # outputs bit-identical at apply time
    upstream, grad = backward(holder, seed)
    assert torch.equal(grad[frozen], torch.zeros_like(grad[frozen]))
    assert torch.equal(grad[~frozen], upstream[~frozen])


@given(SHAPES, DTYPES, st.data())
def test_freeze_slices_gradient_is_exactly_zero_in_frozen_slices(
    make_holder, backward, shape, dtype, data
):
    holder = make_holder(shape, dtype)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    index = data.draw(st.lists(st.integers(0, shape[dim] - 1), unique=True))
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Freeze(dim=dim, index=index)})
    assert torch.equal(holder.weight, before)
    frozen = mp.masks.slices(dim, index)(before).expand(shape)
    upstream, grad = backward(holder, 0)
    assert torch.equal(grad[frozen], torch.zeros_like(grad[frozen]))
    assert torch.equal(grad[~frozen], upstream[~frozen])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "spec", [lambda: mp.Freeze(mp.masks.random(0.5)), lambda: mp.Freeze(dim=0, index=[0, 2])]
)
def test_applying_in_half_precision_changes_no_output(spec, dtype):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    before = model(x)
    mp.apply_mask(model, {"*.weight": spec()})
    assert model[0].weight.dtype == dtype
    assert torch.equal(model(x), before)


BAD_FREEZES = [
    (
        {"conv.weight": mp.Freeze(dim=0, index=[10])},
        (
            r"Freeze for 'conv.weight'.*index \[10\] out of "
            r"range for a dimension of size 10.*fix: use indices in \[-10, 9\]"
        ),
    ),
    (
        {"conv.weight": mp.Freeze(dim=4, index=[0])},
        r"Freeze for 'conv.weight'.*dim=4 is out of range",
    ),
]


@pytest.mark.parametrize(("rules", "message"), BAD_FREEZES)
def test_bad_freezes_raise_and_leave_the_model_untouched(tiny, snapshot, rules, message):
    before = snapshot(tiny)
    with pytest.raises(mp.MaskparamError, match=re.compile(message, re.DOTALL)):
        mp.apply_mask(tiny, rules)
    before.assert_same(tiny)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (mp.Freeze, "(?s)needs the entries to freeze.*requires_grad_\\(False\\)"),
        (lambda: mp.Freeze(dim=0), "needs the entries to freeze"),
        (lambda: mp.Freeze(torch.ones(2), dim=0, index=[0]), "both a mask and dim/index"),
        (lambda: mp.Freeze(dim=0, index=[0.5]), r"index must be integers"),
        (lambda: mp.Freeze(dim=True, index=[0]), r"dim must be an int; got True \(bool\)"),
    ],
)
def test_bad_freeze_specs_fail_when_constructed(make, message):
    with pytest.raises(mp.MaskparamError, match=message):
        make()


SIGN_OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
}


ROW1 = torch.zeros(4, 4, dtype=torch.bool)


ROW1[1] = True


SIGN_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_mask": lambda: mp.Freeze(ROW1),
    "freeze_dim": lambda: mp.Freeze(dim=0, index=[1]),
    "freeze_mask_compact": lambda: mp.Freeze(ROW1, layout="compact"),
}


# from the no-silent-failure attack on 0.1 (item 12: a frozen -0.0 became +0.0)
@pytest.mark.parametrize("optimizer", list(SIGN_OPTIMIZERS))
@pytest.mark.parametrize("kind", list(SIGN_SPECS))
def test_frozen_negative_zero_keeps_its_sign(kind, optimizer):
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[1] = -0.0
    mp.apply_mask(layer, {"weight": SIGN_SPECS[kind]()})
    assert torch.signbit(layer.weight[1]).all()
    square_sum_steps(layer, SIGN_OPTIMIZERS[optimizer](layer.parameters()), torch.randn(2, 4))
    assert torch.signbit(layer.weight.detach()[1]).all(), layer.weight.detach()[1]


# from the no-silent-failure attack on 0.1 (crashes: a Python error instead of MaskparamError)
def test_freeze_slices_of_a_0d_tensor_raise_maskparam_error():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.0))
    before = state_of(model)
    with pytest.raises(mp.MaskparamError, match="'scale'"):
        mp.apply_mask(model, {"scale": mp.Freeze(dim=0, index=0)})
    with pytest.raises(mp.MaskparamError, match="'scale'"):
        mp.apply_mask(model, {"scale": mp.Mask(mp.masks.rows([0]))})
    assert_state_unchanged(model, before)
