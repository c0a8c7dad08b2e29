"""Mask (constraints/mask.py): masked entries are exactly zero and get exactly zero gradient; the
ways a mask can be given (tensor, callable, generator, a shape that broadcasts); bad masks, and
a mask callable that raises."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from strategies import DENSITIES, DTYPES, LAYOUTS, SEEDS, SHAPES
from torch import Tensor, nn

import maskparam as mp


@given(SHAPES, DTYPES, DENSITIES, SEEDS, LAYOUTS)
def test_mask_gradient_is_exactly_zero_where_masked(
    make_holder, backward, shape, dtype, density, seed, layout
):
    holder = make_holder(shape, dtype)
    kept = mp.masks.random(density, seed)(holder.weight)
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Mask(kept, layout=layout)})
    effective = holder.weight.detach()
    assert int(kept.sum()) == round(density * kept.numel())
    assert torch.equal(effective[~kept], torch.zeros_like(effective[~kept]))
    assert torch.equal(effective[kept], before[kept])
    upstream, grad = backward(holder, seed)
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
    assert torch.equal(grad[kept], upstream[kept])


def test_a_per_row_mask_zeroes_whole_rows_with_one_byte_per_row():
    layer = nn.Linear(5, 4)
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.rows([1, 2]), layout="dense")})
    stored = layer.parametrizations.weight[0].mask
    assert stored.shape == (4, 1)
    assert stored.dtype == torch.uint8
    assert torch.equal(layer.weight[[0, 3]], torch.zeros(2, 5))
    assert bool((layer.weight[[1, 2]] != 0).all())


def test_callable_masks_receive_the_tensor():
    layer = nn.Linear(4, 4)
    mp.apply_mask(layer, {"weight": mp.Mask(lambda w: w > 0)})
    assert bool((layer.weight >= 0).all())


@pytest.mark.parametrize(
    "mask",
    [torch.tensor([1, 0, 1]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([True, False, True])],
)
def test_numeric_and_bool_masks_are_equivalent(mask):
    layer = nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    mp.apply_mask(layer, {"weight": mp.Mask(mask)})
    assert torch.equal(layer.weight, before * torch.tensor([1.0, 0.0, 1.0]))


BAD_MASKS = [
    (
        {"fc1.weight": mp.Mask(torch.ones(10, 6))},
        (
            r"Mask for 'fc1.weight'.*shape \(10, 6\).*"
            r"does not broadcast to the tensor's shape \(6, 10\).*fix: pass a mask of shape \(6, 10\)"
        ),
    ),
    (
        {"fc1.weight": mp.Mask(torch.full((6, 10), 0.5))},
        (
            r"Mask for 'fc1.weight'.*must be binary.*60 of its 60"
            r".*examples: \[0.5\].*fix: threshold"
        ),
    ),
    ({"fc1.weight": mp.Mask(torch.tensor(float("nan")))}, r"must be binary"),
    ({"fc1.weight": mp.Mask("ones")}, r"a mask must be a tensor, a callable.*got a str"),
    ({"fc1.weight": mp.Mask(lambda w: 1)}, r"the mask callable .* returned a int, not a tensor"),
]


@pytest.mark.parametrize(("rules", "message"), BAD_MASKS)
def test_bad_masks_raise_and_leave_the_model_untouched(tiny, snapshot, rules, message):
    before = snapshot(tiny)
    with pytest.raises(mp.MaskparamError, match=re.compile(message, re.DOTALL)):
        mp.apply_mask(tiny, rules)
    before.assert_same(tiny)


# from the no-silent-failure attack on 0.1 (crashes: a Python error instead of MaskparamError)
@pytest.mark.parametrize("spec", ["Mask", "Freeze"])
def test_error_in_user_mask_callable_names_the_tensor(spec):
    def broken(tensor: Tensor) -> Tensor:
        return 1 / 0  # type: ignore[return-value]

    layer = nn.Linear(4, 3)
    with pytest.raises(mp.MaskparamError, match="'weight'"):
        mp.apply_mask(layer, {"weight": getattr(mp, spec)(broken)})
