"""Invariants over shapes, dtypes, masks and optimizers (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import maskparam as mp

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
MATRIX_SHAPES = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)
DENSITIES = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
SEEDS = st.integers(0, 2**31 - 1)


class Holder(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape).to(dtype))


def _backward(holder: Holder, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate a random linear loss; return (the upstream gradient, the original's grad)."""
    upstream = torch.randn(holder.weight.shape, generator=torch.Generator().manual_seed(seed))
    upstream = upstream.to(holder.weight.dtype)
    (holder.weight * upstream).sum().backward()
    return upstream, holder.parametrizations.weight.original.grad


@given(SHAPES, DTYPES, DENSITIES, SEEDS)
def test_mask_gradient_is_exactly_zero_where_masked(shape, dtype, density, seed):
    holder = Holder(shape, dtype)
    kept = mp.masks.random(density, seed)(holder.weight)
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Mask(kept)})
    effective = holder.weight.detach()
    assert int(kept.sum()) == round(density * kept.numel())
    assert torch.equal(effective[~kept], torch.zeros_like(effective[~kept]))
    assert torch.equal(effective[kept], before[kept])
    upstream, grad = _backward(holder, seed)
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
    assert torch.equal(grad[kept], upstream[kept])


@given(SHAPES, DTYPES, DENSITIES, SEEDS)
def test_freeze_mask_gradient_is_exactly_zero_where_frozen(shape, dtype, density, seed):
    holder = Holder(shape, dtype)
    frozen = mp.masks.random(density, seed)(holder.weight)
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Freeze(frozen)})
    assert torch.equal(holder.weight, before)  # outputs bit-identical at apply time
    upstream, grad = _backward(holder, seed)
    assert torch.equal(grad[frozen], torch.zeros_like(grad[frozen]))
    assert torch.equal(grad[~frozen], upstream[~frozen])


@given(SHAPES, DTYPES, st.data())
def test_freeze_slices_gradient_is_exactly_zero_in_frozen_slices(shape, dtype, data):
    holder = Holder(shape, dtype)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    index = data.draw(st.lists(st.integers(0, shape[dim] - 1), unique=True))
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Freeze(dim=dim, index=index)})
    assert torch.equal(holder.weight, before)
    frozen = mp.masks.slices(dim, index)(before).expand(shape)
    upstream, grad = _backward(holder, seed=0)
    assert torch.equal(grad[frozen], torch.zeros_like(grad[frozen]))
    assert torch.equal(grad[~frozen], upstream[~frozen])


@given(MATRIX_SHAPES, DTYPES, st.integers(-3, 3), st.booleans())
def test_triangular_gradient_is_exactly_zero_outside_the_triangle(shape, dtype, diagonal, lower):
    holder = Holder(shape, dtype)
    before = holder.weight.detach().clone()
    mp.apply_mask(holder, {"weight": mp.Triangular(lower=lower, diagonal=diagonal)})
    ones = torch.ones(shape, dtype=torch.bool)
    inside = ones.tril(diagonal) if lower else ones.triu(diagonal)
    assert torch.equal(holder.weight[inside], before[inside])
    assert torch.equal(holder.weight[~inside], torch.zeros_like(before[~inside]))
    upstream, grad = _backward(holder, seed=1)
    assert torch.equal(grad[~inside], torch.zeros_like(grad[~inside]))
    assert torch.equal(grad[inside], upstream[inside])


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.1, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.1),
}


@given(
    MATRIX_SHAPES,
    st.sampled_from([torch.float32, torch.float64]),
    DENSITIES,
    SEEDS,
    st.sampled_from(list(OPTIMIZERS)),
)
def test_optimizers_never_move_constrained_entries(shape, dtype, density, seed, optimizer_name):
    holder = Holder(shape, dtype)
    kept = mp.masks.random(density, seed)(holder.weight)
    frozen = mp.masks.random(0.5, seed + 1)(holder.weight)
    # Stack all three: masked entries zero, frozen entries fixed, lower triangle only.
    mp.apply_mask(holder, {"weight": [mp.Mask(kept), mp.Freeze(frozen), mp.Triangular()]})
    start = holder.weight.detach().clone()
    optimizer = OPTIMIZERS[optimizer_name](holder.parameters())
    target = torch.randn(shape, dtype=dtype)
    for _ in range(3):
        optimizer.zero_grad()
        ((holder.weight - target) ** 2).sum().backward()
        optimizer.step()
    effective = holder.weight.detach()
    lower = torch.ones(shape, dtype=torch.bool).tril()
    zero = ~kept | ~lower
    assert torch.equal(effective[zero], torch.zeros_like(effective[zero]))
    assert torch.equal(effective[frozen], start[frozen])
