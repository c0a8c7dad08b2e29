"""``update_masks``: new masks in place, exact from the next forward under every optimizer; what
happens to entries that change side; refusals that leave the model unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import mlp, pruning_inputs, train_steps
from torch import Tensor, nn
from torch.nn.utils import prune
from torch_optimizers import OPTIMIZERS, PRUNING_LOOP_OPTIMIZERS

import maskparam as mp
from maskparam.constraints.compact import CompactScatter

# (rules at apply, the rule value for each update): random masks of other seeds regrow entries.
Case = tuple[Callable[[], dict[str, Any]], Callable[[int], Any]]
CASES: dict[str, Case] = {
    "mask-compact": (
        lambda: {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))},
        lambda k: mp.masks.random(0.4, seed=10 + k),
    ),
    "mask-dense": (
        lambda: {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout="dense")},
        lambda k: mp.masks.random(0.4, seed=10 + k),
    ),
    "mask-global": (
        lambda: {"*.weight": mp.Mask(mp.masks.global_magnitude(0.3))},
        lambda k: mp.masks.global_magnitude(0.5 + 0.2 * k),
    ),
    "freeze-compact": (
        lambda: {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=2))},
        lambda k: mp.masks.random(0.6, seed=20 + k),
    ),
    "freeze-dense": (
        lambda: {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=2), layout="dense")},
        lambda k: mp.masks.random(0.6, seed=20 + k),
    ),
    "triangular-then-mask": (
        lambda: {"*.weight": [mp.Triangular(), mp.Mask(mp.masks.random(0.7, seed=3))]},
        lambda k: mp.masks.random(0.5, seed=30 + k),
    ),
    "compact-mask-then-freeze": (
        lambda: {
            "*.weight": [
                mp.Mask(mp.masks.random(0.5, seed=4), layout="compact"),
                mp.Freeze(mp.masks.random(0.3, seed=5)),
            ]
        },
        lambda k: mp.Freeze(mp.masks.random(0.5, seed=40 + k)),
    ),
}


def _compact(model: nn.Module) -> bool:
    return any(isinstance(m, CompactScatter) for m in model.modules())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_constraint_stays_exact_through_update_masks(case, optimizer):
    apply_rules, update_rule = CASES[case]
    model = mp.apply_mask(mlp(8, 8, 8, seed=0), apply_rules())
    if optimizer == "Adafactor" and _compact(model):
        pytest.skip("Adafactor refuses the compact layout (tests/workflows/test_optimizers.py)")
    params = list(model.parameters())
    opt = OPTIMIZERS[optimizer](params)
    x = pruning_inputs()
    for k in range(3):
        train_steps(model, x, steps=2, optimizer=opt)
        assert mp.verify(model) == []
        before = {n: t.detach().clone() for n, t in _weights(model).items()}
        mp.update_masks(model, {"*.weight": update_rule(k)})
        assert mp.verify(model) == []  # exact from the next forward
        assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
        for name, now in _weights(model).items():
            changed = now != before[name]
            # Only entries that changed side may change at the update: pruned ones to 0,
            # regrown ones from 0 (so they were 0 and stay 0); frozen ones hold their value.
            assert bool((now[changed] == 0).all()), name
    train_steps(model, x, steps=2, optimizer=opt)
    assert mp.verify(model) == []


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {f"{i}": model[i].weight for i in (0, 2)}


@pytest.mark.parametrize("name", list(PRUNING_LOOP_OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mask", "freeze"])
def test_dense_and_compact_layouts_train_bit_identically_through_updates(name, kind):
    spec = mp.Mask if kind == "mask" else mp.Freeze
    sources = [mp.masks.random(0.5, seed=s) for s in (1, 2, 3)]  # each regrows entries
    x = pruning_inputs()
    trained = {}
    for layout in ("dense", "compact"):
        model = mp.apply_mask(mlp(8, 8, 8, seed=0), {"*.weight": spec(sources[0], layout=layout)})
        optimizer = PRUNING_LOOP_OPTIMIZERS[name](model.parameters())
        for source in sources[1:]:
            train_steps(model, x, steps=3, optimizer=optimizer)
            mp.update_masks(model, {"*.weight": source})
        train_steps(model, x, steps=3, optimizer=optimizer)
        trained[layout] = [w.detach().clone() for w in _weights(model).values()]
        assert _compact(model) == (layout == "compact")
    for dense, compact in zip(trained["dense"], trained["compact"], strict=True):
        assert torch.equal(dense, compact)


@pytest.mark.parametrize(
    ("factory", "key", "fresh"),
    [
        (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), "exp_avg_sq", 0.0),
        (
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
            "momentum_buffer",
            0.0,
        ),
        (lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5), "sum", 0.5),
        (lambda p: torch.optim.Rprop(p, lr=0.01), "step_size", 0.01),
    ],
)
def test_a_regrown_entry_starts_from_zero_with_fresh_state(factory, key, fresh):
    layer = nn.Linear(8, 8)
    first = mp.masks.random(0.5, seed=1)(layer.weight)
    mp.apply_mask(layer, {"weight": mp.Mask(first, layout="dense")})
    optimizer = factory(layer.parameters())
    train_steps(layer, pruning_inputs(), steps=3, optimizer=optimizer)
    stored = layer.parametrizations.weight.original
    state = optimizer.state[stored][key]
    regrown = ~first
    # SGD's coupled weight decay built state at masked entries: the reset is not a no-op.
    mp.update_masks(layer, {"weight": torch.ones(8, 8, dtype=torch.bool)})
    assert bool((stored[regrown] == 0).all())
    assert bool((state[regrown] == fresh).all())
    kept_state = state[first].clone()
    assert not bool((kept_state == fresh).all())  # the kept entries keep theirs
    assert optimizer.state[stored][key] is state


def test_freeze_update_holds_new_values_and_thaws_from_the_frozen_value():
    layer = nn.Linear(8, 8)
    first = mp.masks.random(0.5, seed=1)(layer.weight)
    second = mp.masks.random(0.5, seed=2)(layer.weight)
    mp.apply_mask(layer, {"weight": mp.Freeze(first)})
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    train_steps(layer, pruning_inputs(), steps=3, optimizer=optimizer)
    at_update = layer.weight.detach().clone()
    mp.update_masks(layer, {"weight": second})
    assert torch.equal(layer.weight, at_update)  # nothing moves at the update itself
    train_steps(layer, pruning_inputs(), steps=3, optimizer=optimizer)
    assert torch.equal(layer.weight[second], at_update[second])  # frozen now, bit for bit
    thawed = first & ~second
    assert bool((layer.weight[thawed] != at_update[thawed]).all())  # they train again


def test_global_magnitude_update_equals_torch_global_unstructured_on_the_effective_weights():
    model = mp.apply_mask(
        mlp(8, 8, 8, seed=0), {"*.weight": mp.Mask(mp.masks.global_magnitude(0.3))}
    )
    train_steps(model, pruning_inputs(), steps=3)
    reference = mp.remove_parametrizations(copy.deepcopy(model))
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.7)})
    prune.global_unstructured(
        [(reference[0], "weight"), (reference[2], "weight")],
        pruning_method=prune.L1Unstructured,
        amount=0.7,
    )
    for i in (0, 2):
        assert torch.equal(model[i].weight, reference[i].weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_half_precision_masks_update_exactly(dtype, layout):
    model = mp.apply_mask(
        mlp(8, 8, 8, dtype=dtype, seed=0),
        {"*.weight": mp.Mask(mp.masks.magnitude(0.5), layout=layout)},
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for sparsity in (0.6, 0.2, 0.8):
        train_steps(model, pruning_inputs(dtype), steps=2, optimizer=optimizer)
        mp.update_masks(model, {"*.weight": mp.masks.magnitude(sparsity)})
        assert mp.verify(model) == []
        assert int((model[0].weight == 0).sum()) >= round(sparsity * 64)


def test_wildcards_pass_over_tensors_without_a_mask():
    model = mp.apply_mask(
        mlp(8, 8, 8, seed=0),
        {"0.weight": mp.Triangular(), "2.weight": mp.Mask(mp.masks.magnitude(0.5))},
    )
    mp.update_masks(model, {"*": mp.masks.magnitude(0.75)})
    assert int((model[2].weight == 0).sum()) == 48
    assert bool((model[0].weight.triu(1) == 0).all())


def _bad(rules: Any) -> dict[str, Any]:
    return rules


REFUSED: dict[str, tuple[dict[str, Any], Any, str]] = {
    "not constrained": (
        {"0.weight": mp.Mask(mp.masks.magnitude(0.5))},
        {"2.weight": mp.masks.magnitude(0.5)},
        "update_masks updates a Mask or Freeze(mask)",
    ),
    "a triangle": (
        {"0.weight": mp.Triangular()},
        {"0.weight": mp.masks.magnitude(0.5)},
        "has Triangular(lower, diagonal=0, compact)",
    ),
    "two masks, which one": (
        {"0.weight": [mp.Mask(mp.masks.random(0.9)), mp.Freeze(mp.masks.random(0.1))]},
        {"0.weight": mp.masks.random(0.5)},
        "say which",
    ),
    "frozen slices": (
        {"0.weight": mp.Freeze(dim=0, index=[1])},
        {"0.weight": mp.Freeze(dim=0, index=[2])},
        "Freeze(dim=..., index=...)",
    ),
    "mask of another shape, second rule": (
        {"*.weight": mp.Mask(mp.masks.magnitude(0.5))},
        {"0.weight": mp.masks.magnitude(0.7), "2.weight": torch.ones(3, 3)},
        "does not broadcast",
    ),
    "behind a subspace": (
        {"0.weight": [mp.Subspace(4), mp.Mask(mp.masks.random(0.5))]},
        {"0.weight": mp.masks.random(0.5)},
        "stands behind Subspace",
    ),
    "learnable mask": (
        {"0.weight": mp.LearnableMask()},
        {"0.weight": mp.masks.magnitude(0.5)},
        "has LearnableMask",
    ),
    "no match": (
        {"0.weight": mp.Mask(mp.masks.magnitude(0.5))},
        {"9.*": mp.masks.magnitude(0.5)},
        "matched no tensor",
    ),
    "not a mapping": (
        {"0.weight": mp.Mask(mp.masks.magnitude(0.5))},
        [("0.weight", mp.masks.magnitude(0.5))],
        "must be a mapping",
    ),
    "a Triangular spec": (
        {"0.weight": mp.Mask(mp.masks.magnitude(0.5))},
        {"0.weight": mp.Triangular()},
        "maps selectors to a mask source",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_problem_and_leave_the_model_unchanged(case):
    apply_rules, rules, message = REFUSED[case]
    model = mp.apply_mask(mlp(8, 8, 8, seed=0), apply_rules)
    before = copy.deepcopy(model.state_dict())
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(mp.MaskparamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mp.update_masks(model, rules)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert shapes == [p.shape for p in model.parameters()]


def test_a_stale_compact_gradient_follows_its_entries():
    layer = mp.apply_mask(nn.Linear(8, 8), {"weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    layer(pruning_inputs()).square().sum().backward()
    stored = layer.parametrizations.weight.original
    full = layer.parametrizations.weight[0](stored.grad)  # the gradient at its positions
    mp.update_masks(layer, {"weight": mp.masks.random(0.3, seed=2)})
    kept = mp.masks.random(0.3, seed=2)(torch.empty(8, 8))
    assert stored.grad.shape == stored.shape
    assert torch.equal(layer.parametrizations.weight[0](stored.grad), torch.where(kept, full, 0))
