"""layout="compact" (constraints/compact.py): the stored original holds only the free entries;
same effective tensors and training as the dense layout; where it cannot be used, and says so;
layout="auto" is compact where that pays and is possible, dense elsewhere."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import LAYOUT_SPECS, is_compact, mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import maskparam as mp
from maskparam.constraints.compact import AUTO_COMPACT_MAX_FREE, CompactConstraint

SPECS = {
    "mask": lambda: mp.Mask(mp.masks.random(0.3, seed=1), layout="compact"),
    "triangular": lambda: mp.Triangular(diagonal=-1, layout="compact"),
    "freeze": lambda: mp.Freeze(mp.masks.random(0.6, seed=2), layout="compact"),
    "freeze-slices": lambda: mp.Freeze(dim=1, index=[0, 2], layout="compact"),
}
DENSE = {
    "mask": lambda: mp.Mask(mp.masks.random(0.3, seed=1)),
    "triangular": lambda: mp.Triangular(diagonal=-1),
    "freeze": lambda: mp.Freeze(mp.masks.random(0.6, seed=2)),
    "freeze-slices": lambda: mp.Freeze(dim=1, index=[0, 2]),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_compact_stores_only_free_entries_and_matches_dense_exactly(kind, train):
    dense, compact = nn.Linear(6, 5), nn.Linear(6, 5)
    compact.load_state_dict(dense.state_dict())
    weight = compact.weight
    mp.apply_mask(dense, {"weight": DENSE[kind]()})
    mp.apply_mask(compact, {"weight": SPECS[kind]()})
    row = mp.summary(compact).tensors[0]
    original = compact.parametrizations.weight.original
    assert original is weight  # the same Parameter object, now holding only the free entries
    assert original.shape == (row.free,)
    assert row.free == mp.summary(dense).tensors[0].free
    x = torch.randn(4, 6)
    assert torch.equal(compact(x), dense(x))
    # Same SGD steps on both layouts give the same effective weights: the compact optimizer
    # simply never sees the constrained entries.
    for model in (dense, compact):
        train(model, x, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    torch.testing.assert_close(compact.weight, dense.weight, rtol=0, atol=1e-6)


@given(st.floats(0.0, 1.0), st.integers(0, 1000))
def test_compact_gradient_is_the_upstream_gradient_at_free_entries(density, seed):
    layer = nn.Linear(7, 3)
    kept = mp.masks.random(density, seed)(layer.weight)
    mp.apply_mask(layer, {"weight": mp.Mask(kept, layout="compact")})
    upstream = torch.randn(3, 7)
    (layer.weight * upstream).sum().backward()
    assert torch.equal(layer.parametrizations.weight.original.grad, upstream[kept])
    assert torch.equal(layer.weight.detach()[~kept], torch.zeros(int((~kept).sum())))


def test_state_dict_restores_a_weight_dependent_compact_mask():
    torch.manual_seed(1)
    rules = {"weight": mp.Mask(mp.masks.magnitude(0.5), layout="compact")}
    trained = mp.apply_mask(nn.Linear(8, 8), rules)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    fresh = mp.apply_mask(nn.Linear(8, 8), rules)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.weight, trained.weight)  # the index follows the loaded mask


def test_leave_parametrized_false_on_a_compact_tensor_is_refused_unchanged():
    # A compact original holds only its free entries: the raw originals cannot come back, and
    # baking instead would reinterpret the call. Baking itself gives the full tensor back.
    layer = nn.Linear(4, 4)
    mp.apply_mask(layer, {"weight": mp.Triangular(layout="compact")})
    effective = layer.weight.detach().clone()
    with pytest.raises(mp.MaskparamError, match=r"(?s)stored compact.*nothing was removed"):
        mp.remove_parametrizations(layer, leave_parametrized=False)
    assert "compact" in mp.summary(layer).tensors[0].constraint
    mp.remove_parametrizations(layer)
    assert torch.equal(layer.weight, effective)
    assert layer.weight.shape == (4, 4)


def test_compact_must_be_first_and_alone_on_its_tensor(snapshot):
    model = nn.Sequential(nn.Linear(3, 3), nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match="must be the first parametrization"):
        mp.apply_mask(
            model, {"0.weight": [mp.Triangular(), mp.Mask(torch.ones(1), layout="compact")]}
        )
    with pytest.raises(mp.MaskparamError, match="this one already has one"):
        mp.apply_mask(model, {"1.weight": mp.Triangular(layout="compact")})
    before.assert_same(model)


def test_unknown_layout_is_refused():
    with pytest.raises(mp.MaskparamError, match="unknown layout 'sparse'"):
        mp.Mask(torch.ones(1), layout="sparse")


def test_tied_weights_are_refused():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head})
    with pytest.raises(mp.MaskparamError, match="(?s)compact.*tied to 'head.weight'.*dense layout"):
        mp.apply_mask(model, {"embed.weight": mp.Mask(mp.masks.random(0.5), layout="compact")})
    assert not hasattr(embedding, "parametrizations")


def test_meta_tensors_are_refused_with_the_fix():
    # The dense layouts work on the meta device (workflows/test_devices.py); compact needs the
    # positions of the free entries, so real values.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(mp.MaskparamError, match="real tensors"):
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5), layout="compact")})


@pytest.mark.parametrize("kind", list(LAYOUT_SPECS))
def test_auto_is_compact_for_a_trainable_parameter_at_half_density(kind):
    model = mp.apply_mask(mlp(8, 8, 3), {"0.weight": LAYOUT_SPECS[kind]("auto")})
    assert is_compact(model)
    assert "compact" in mp.summary(model).tensors[0].constraint


def _frozen_then(spec: mp.Spec) -> nn.Module:
    model = mlp(8, 8, 3)
    model[0].weight.requires_grad_(False)
    return mp.apply_mask(model, {"0.weight": spec})


def _on_meta(spec: mp.Spec) -> nn.Module:
    with torch.device("meta"):
        model = mlp(8, 8, 3)
    return mp.apply_mask(model, {"0.weight": spec})


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
    assert not any(isinstance(c, CompactConstraint) for c in stack), why
    assert stack.original.shape == (8, 8)


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
    assert isinstance(layer.parametrizations.weight[0], CompactConstraint)
    rows[int(AUTO_COMPACT_MAX_FREE * 10)] = True  # 70%
    layer = mp.apply_mask(nn.Linear(4, 10), {"weight": mp.Mask(rows)})
    assert not isinstance(layer.parametrizations.weight[0], CompactConstraint)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_compact_forward_keeps_every_nan_payload(dtype):
    """The scatter of the kept entries copies bits: NaN payloads (signalling, negative) in the
    frozen values and in the stored entries come out bit for bit, as in the dense layout."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty(0, dtype=dtype).element_size()
    ]
    nan = torch.tensor(float("nan"), dtype=dtype).view(bits).item()
    weight = torch.randn(4, 6).to(dtype)
    weight.view(bits)[0, :3] = torch.tensor([nan + 1, -1, nan ^ 1], dtype=bits)  # odd payloads
    weight.view(bits)[3, :3] = torch.tensor([nan + 1, -1, nan ^ 1], dtype=bits)
    frozen = torch.zeros(4, 6, dtype=torch.bool)
    frozen[0] = True
    for layout in ("dense", "compact"):
        layer = nn.Linear(6, 4).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        mp.apply_mask(layer, {"weight": mp.Freeze(frozen, layout=layout)})
        assert torch.equal(layer.weight.detach().view(bits), weight.view(bits)), layout


def test_a_stored_vector_that_does_not_fit_the_mask_is_refused():
    layer = mp.apply_mask(
        nn.Linear(4, 2), {"weight": mp.Mask(torch.eye(2, 4, dtype=torch.bool), layout="compact")}
    )
    for entries in (torch.ones(1), torch.ones(5)):
        state = {"parametrizations.weight.original": entries}
        with pytest.raises(mp.MaskparamError, match="do not fit"):
            torch.func.functional_call(layer, state, (torch.ones(1, 4),))
