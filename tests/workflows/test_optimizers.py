"""The core promise under every optimizer in torch.optim, momentum and (decoupled) weight decay
included: masked entries stay exactly zero, frozen entries bit-identical, the triangle exact, and
the free entries do train; the same over random shapes and masks (hypothesis). An optimizer
created before apply_mask or kept across a bake: core/test_optimizer_guard.py; optimizer
checkpoints: checkpoint/test_optimizer_state_dict.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch_optimizers import OPTIMIZERS, uncovered

import maskparam as mp


def test_every_torch_optimizer_is_covered():
    assert not uncovered(), f"add to tests/torch_optimizers.py: {sorted(uncovered())}"


def _constrained_model(layout: str = "dense") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    kept = mp.masks.random(0.5, seed=1)(model[0].weight)
    frozen = mp.masks.random(0.3, seed=2)(model[4].weight)
    mp.apply_mask(
        model,
        {
            "0.weight": mp.Mask(kept, layout=layout),
            "2.weight": mp.Triangular(layout=layout),
            "4.weight": mp.Freeze(frozen, layout=layout),
            "0.bias": mp.Freeze(dim=0, index=[0, 3], layout=layout),
        },
    )
    return model, {"kept": kept, "frozen": frozen}


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_constraints_hold_and_free_entries_train(name, layout, train):
    if name.startswith("Muon") and layout == "compact":
        pytest.skip("Muon orthogonalizes matrices; a compact original is a vector: use dense")
    torch.manual_seed(0)
    model, masks = _constrained_model(layout)
    if name == "Adafactor" and layout == "compact":
        # It factors matrices: on a compact vector it would run another algorithm. maskparam
        # sees an optimizer where it is passed, so the refusal comes there, nothing applied.
        plain = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        with pytest.raises(mp.MaskparamError, match="layout='dense'"):
            mp.apply_mask(
                plain,
                {"*.weight": mp.Mask(mp.masks.random(0.5), layout="compact")},
                optimizer=OPTIMIZERS[name](plain.parameters()),
            )
        assert mp.summary(plain).tensors == ()
        return
    w0, w2, w4, b0 = (
        t.detach().clone()
        for t in (model[0].weight, model[2].weight, model[4].weight, model[0].bias)
    )
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    train(model, x, steps=8, optimizer=OPTIMIZERS[name], target=y)

    kept, frozen = masks["kept"], masks["frozen"]
    eff0, eff2, eff4, bias0 = (
        t.detach() for t in (model[0].weight, model[2].weight, model[4].weight, model[0].bias)
    )
    # Masked entries: exactly zero, even though the stored original decays under weight decay.
    assert torch.equal(eff0[~kept], torch.zeros(int((~kept).sum())))
    assert not torch.equal(eff0[kept], w0[kept])
    # Triangle: the upper part exactly zero, the lower part trains.
    assert torch.equal(eff2.triu(1), torch.zeros(8, 8))
    assert not torch.equal(eff2.tril(), w2.tril())
    # Frozen entries: bit-identical; the others train.
    assert torch.equal(eff4[frozen], w4[frozen])
    assert not torch.equal(eff4[~frozen], w4[~frozen])
    assert torch.equal(bias0[[0, 3]], b0[[0, 3]])
    assert not torch.equal(bias0[[1, 2, 4, 5, 6, 7]], b0[[1, 2, 4, 5, 6, 7]])
    assert mp.verify(model) == []


# Property: a stack of all three selection constraints under random shapes, masks and optimizers.
MATRIX_SHAPES = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)
DENSITIES = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
SEEDS = st.integers(0, 2**31 - 1)
PROPERTY_OPTIMIZERS = {
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
    st.sampled_from(list(PROPERTY_OPTIMIZERS)),
)
def test_optimizers_never_move_constrained_entries(
    make_holder, train, shape, dtype, density, seed, optimizer_name
):
    holder = make_holder(shape, dtype)
    kept = mp.masks.random(density, seed)(holder.weight)
    frozen = mp.masks.random(0.5, seed + 1)(holder.weight)
    # Stack all three: masked entries zero, frozen entries fixed, lower triangle only.
    mp.apply_mask(holder, {"weight": [mp.Mask(kept), mp.Freeze(frozen), mp.Triangular()]})
    start = holder.weight.detach().clone()
    target = torch.randn(shape, dtype=dtype)
    # holder(ones) is the tensor itself: the loss pulls it towards `target`.
    train(holder, torch.ones((), dtype=dtype), optimizer=PROPERTY_OPTIMIZERS[optimizer_name],
          target=target)  # fmt: skip
    effective = holder.weight.detach()
    lower = torch.ones(shape, dtype=torch.bool).tril()
    zero = ~kept | ~lower
    assert torch.equal(effective[zero], torch.zeros_like(effective[zero]))
    assert torch.equal(effective[frozen], start[frozen])
