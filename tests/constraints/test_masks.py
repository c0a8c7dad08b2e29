"""Mask generators (masks.py): reproducible, exact counts, broadcast shapes, the same masks users
know from torch.nn.utils.prune, and bad arguments refused when the generator is made."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import maskparam as mp


def test_random_is_reproducible_and_ignores_the_global_rng():
    shape = torch.empty(7, 9)
    torch.manual_seed(1)
    first = mp.masks.random(0.3, seed=5)(shape)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    second = mp.masks.random(0.3, seed=5)(shape)
    assert torch.equal(first, second)
    torch.manual_seed(1)
    mp.masks.random(0.3, seed=5)(shape)
    assert torch.equal(torch.get_rng_state(), state)  # drawing left the global RNG untouched
    assert not torch.equal(first, mp.masks.random(0.3, seed=6)(shape))


@given(st.floats(0.0, 1.0), st.integers(1, 40), st.integers(1, 40))
def test_magnitude_equals_prune_l1_unstructured(sparsity, rows, cols):
    layer = nn.Linear(cols, rows)
    ours = mp.masks.magnitude(sparsity)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert torch.equal(ours, layer.weight_mask.bool())


def test_magnitude_with_ties_matches_prune_too():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]).repeat(4, 1))
    ours = mp.masks.magnitude(0.5)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert torch.equal(ours, layer.weight_mask.bool())


def _large_weight(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """300 x 300 = 90,000 entries: above the size where magnitude selects by radix, not topk."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 300, generator=generator, dtype=torch.float64) * 0.02
    if kind == "ties":  # few distinct magnitudes, each held by thousands of entries
        weight = (weight * 200).round()
    elif kind == "zeros":  # a third exactly zero, some of them -0.0
        weight[:100] = 0.0
        weight[:10] = -0.0
    elif kind == "non-finite":
        weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "non-finite"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_magnitude_on_large_tensors_equals_prune(dtype, kind, sparsity):
    layer = nn.Linear(300, 300, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(_large_weight(kind, dtype))
    ours = mp.masks.magnitude(sparsity)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert torch.equal(ours, layer.weight_mask.bool())


def test_magnitude_asks_topk_only_when_the_threshold_is_tied(monkeypatch):
    calls = []
    topk = torch.topk

    def counting_topk(*args, **kwargs):
        calls.append(kwargs.get("k"))
        return topk(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", counting_topk)
    distinct = _large_weight("continuous", torch.float32)
    assert int(mp.masks.magnitude(0.5)(distinct).sum()) == 45_000
    assert calls == []  # the radix select alone: the 45,000 smallest are unique
    mp.masks.magnitude(0.5)(_large_weight("ties", torch.float32))
    assert calls == [45_000]  # which tied entries go is topk's choice, as in prune


@pytest.mark.parametrize(
    ("generator", "expected"),
    [
        (mp.masks.rows([0, -1]), torch.tensor([[True], [False], [True]])),
        (mp.masks.filters(1), torch.tensor([[False], [True], [False]])),
        (mp.masks.columns(range(1)), torch.tensor([[True, False]])),
        (mp.masks.slices(-1, torch.tensor([1])), torch.tensor([[False, True]])),
    ],
)
def test_structured_masks_are_broadcast_shaped(generator, expected):
    assert torch.equal(generator(torch.empty(3, 2)), expected)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mp.masks.random(1.5), "density must be a number between 0 and 1"),
        (lambda: mp.masks.magnitude(-0.1), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.random(0.5, seed=1.5), "seed must be an int"),
    ],
)
def test_bad_arguments_fail_when_the_generator_is_made(make, message):
    with pytest.raises(mp.MaskparamError, match=message):
        make()
