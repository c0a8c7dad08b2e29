"""torch.compile: constrained models compile without graph breaks, compute what eager computes,
and training the compiled model keeps every constraint (aot_eager, and inductor)."""

from __future__ import annotations

import pytest
import torch

import maskparam as mp


@pytest.mark.parametrize(
    "kind",
    [
        "mask",
        "mask-compact",
        "freeze",
        "freeze-slices",
        "triangular",
        "learnable",
        "subspace-fastfood",
    ],
)
def test_torch_compile_has_no_graph_breaks_and_keeps_constraints(constrained, invariants, train):
    model = constrained
    x = torch.randn(4, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    before = model[0].weight.detach().clone()
    held = invariants(model)
    train(compiled, x, optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1))
    held.assert_hold(model)
    assert not torch.equal(model[0].weight, before)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # inside inductor
def test_torch_compile_with_inductor(make_mlp, invariants, train):
    model = mp.apply_mask(make_mlp(), {"*.weight": mp.Freeze(mp.masks.random(0.5))})
    x = torch.randn(4, 6)
    frozen_before = model[0].weight.detach().clone()
    keep = ~mp.frozen_entries(model, "0.weight")[0]
    held = invariants(model)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x))
    train(
        compiled,
        x,
        steps=2,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    )
    assert torch.equal(model[0].weight.detach()[~keep], frozen_before[~keep])
    held.assert_hold(model)
