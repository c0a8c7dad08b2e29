"""Checkpoints (_checkpoints.py, _load_guard.py, and torch's own state_dict): a constrained
model's state_dict restores it exactly; mp.load_state_dict loads a plain checkpoint into a
constrained model (a stack too) as if the rules had been applied to it; loads are atomic: a
checkpoint of another projection, corrupt constraint buffers, compact entries that do not fit
their mask or missing keys are refused with the model unchanged; the mistakes (a constrained
checkpoint into a plain model, torch.save of the module) name the fix. Constraint-specific round
trips (a compact index, a subspace seed) are in constraints/."""

from __future__ import annotations

import copy
import io
import itertools
import re
from collections.abc import Callable

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    mlp,
    outcome_is_exact_or_refused,
    refusal_of,
    square_sum_steps,
    state_of,
    subspace_linear,
    zeros_like_selected,
)
from torch import Tensor, nn

import maskparam as mp


def _rules() -> mp.Rules:
    return {
        "conv.weight": mp.Freeze(dim=0, index=[5, 6, 7, 8, 9]),
        "fc1.weight": mp.Mask(mp.masks.magnitude(0.6)),  # depends on the weights: differs per seed
        "fc2.weight": [mp.Triangular(), mp.Freeze(mp.masks.random(0.3, seed=3))],
        "head.*": mp.Mask(mp.masks.random(0.5, seed=7)),
    }


def test_fresh_model_with_other_seeds_restores_bit_identical_outputs(make_tiny, tiny_input, train):
    torch.manual_seed(1)
    trained = mp.apply_mask(make_tiny(), _rules())
    train(trained, tiny_input, steps=5)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(2)
    fresh = mp.apply_mask(make_tiny(), _rules())
    assert not torch.equal(fresh.fc1.weight, trained.fc1.weight)
    fresh.load_state_dict(state)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tiny_input), trained(tiny_input))
    # The masks themselves came from the checkpoint, not from the fresh weights.
    assert torch.equal(mp.kept_entries(fresh, "fc1.weight"), mp.kept_entries(trained, "fc1.weight"))


def test_state_dict_holds_masks_and_frozen_values_compactly(tiny):
    mp.apply_mask(tiny, _rules())
    state = tiny.state_dict()
    # fc1 keeps 40%: stored compact, its mask 1 byte per entry and only the kept entries
    free = state["fc1.parametrizations.weight.0.free"]
    assert free.dtype == torch.uint8
    assert state["fc1.parametrizations.weight.original"].shape == (int(free.sum()),)
    frozen = state["conv.parametrizations.weight.0.frozen_values"]
    assert frozen.shape == (5, 3, 3, 3)  # only the frozen filters are stored
    assert torch.equal(state["conv.parametrizations.weight.0.index"], torch.tensor([5, 6, 7, 8, 9]))
    assert "fc2.parametrizations.weight.1.keep" in state


def test_plain_checkpoint_into_constrained_model(train):
    pretrained = mlp(6, 8, 3)
    plain_state = pretrained.state_dict()
    model = mp.apply_mask(mlp(6, 8, 3), {
        "0.weight": mp.Freeze(dim=0, index=[1, 2]),
        "2.weight": mp.Mask(mp.masks.random(0.5, seed=3)),
        "0.bias": mp.Freeze(torch.tensor([True] + [False] * 7)),
    })  # fmt: skip
    mp.load_state_dict(model, plain_state)
    # As if the rules had been applied to the pretrained model: frozen values are the new ones.
    assert torch.equal(model[0].weight, plain_state["0.weight"])
    assert torch.equal(model[0].bias, plain_state["0.bias"])
    kept = mp.kept_entries(model, "2.weight")
    assert torch.equal(model[2].weight, plain_state["2.weight"] * kept)
    assert torch.equal(model[2].bias, plain_state["2.bias"])
    # and training keeps them frozen from there
    train(model, torch.randn(3, 6), steps=1)
    assert torch.equal(model[0].weight[[1, 2]], plain_state["0.weight"][[1, 2]])


def test_loading_a_plain_checkpoint_does_not_alias_it(train):
    pretrained = mlp(6, 8, 3)
    state = pretrained.state_dict()
    reference = {k: v.clone() for k, v in state.items()}
    model = mp.apply_mask(mlp(6, 8, 3), {"*.weight": mp.Mask(mp.masks.random(0.5))})
    mp.load_state_dict(model, state)
    train(model, torch.randn(2, 6), steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, reference[key]), key  # training did not write into it


def test_constrained_checkpoint_into_plain_model_names_the_fix():
    constrained = mp.apply_mask(mlp(6, 8, 3), {"0.weight": mp.Triangular()})
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)holds constraints.*'0.parametrizations.weight.original'.*apply the same rules.*remove_parametrizations",
    ):
        mp.load_state_dict(mlp(6, 8, 3), constrained.state_dict())


def test_load_state_dict_strict_reports_missing_keys():
    model = mp.apply_mask(mlp(6, 8, 3), {"0.weight": mp.Triangular()})
    state = mlp(6, 8, 3).state_dict()
    del state["2.bias"]
    with pytest.raises(mp.MaskparamError, match=re.escape("missing keys: ['2.bias']")):
        mp.load_state_dict(model, state)
    assert mp.load_state_dict(model, state, strict=False).missing_keys == ["2.bias"]


def test_torch_save_of_the_module_names_the_fix():
    model = mp.apply_mask(mlp(6, 8, 3), {"*.weight": mp.Mask(mp.masks.random(0.5))})
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)torch.save.*model.state_dict\(\).*remove_parametrizations\(copy.deepcopy",
    ):
        torch.save(model, io.BytesIO())
    baked = mp.remove_parametrizations(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.save(baked, buffer)  # the fix works
    buffer.seek(0)
    x = torch.randn(2, 6)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))


# Mask: column 0 and row 4 masked (row 4 crosses the frozen column 3 below the diagonal).
# Freeze(mask) (found by helper): a few entries, two of them in the upper triangle, one in the
# masked row.
MASK6 = torch.ones(6, 6, dtype=torch.bool)


MASK6[:, 0] = False


MASK6[4, :] = False


FROZEN6 = torch.zeros(6, 6, dtype=torch.bool)


FROZEN6[0, 4] = FROZEN6[1, 1] = FROZEN6[4, 2] = FROZEN6[2, 5] = True


STACK_POOL: dict[str, Callable[[], mp.Spec]] = {
    "tri": mp.Triangular,
    "freeze_col3": lambda: mp.Freeze(dim=1, index=[3]),
    "mask": lambda: mp.Mask(MASK6, layout="dense"),
    "freeze_mask": lambda: mp.Freeze(FROZEN6, layout="dense"),
}


STACKS = [
    order
    for size in (2, 3)
    for order in itertools.permutations(STACK_POOL, size)
    # The three of the issue, plus (found by helper) Freeze(mask) after Triangular or Mask.
    if "freeze_mask" not in order or order.index("freeze_mask") > 0
]


def _stack_constraints_hold(layer: nn.Linear, order: tuple[str, ...]) -> None:
    weight = layer.weight.detach()
    if "tri" in order:
        assert torch.equal(weight.triu(1), torch.zeros(6, 6)), "upper triangle not zero"
    if "mask" in order:
        assert torch.equal(weight[~MASK6], zeros_like_selected(weight, ~MASK6)), "masked != 0"


# from the no-silent-failure attack on 0.1 (item 3: a plain checkpoint into a stack)
@pytest.mark.parametrize("how", ["mp_load_state_dict", "assign_tensor"])
@pytest.mark.parametrize("order", STACKS, ids="+".join)
def test_plain_checkpoint_into_stack_keeps_every_constraint(order, how):
    def build(state: dict[str, Tensor] | None = None) -> nn.Linear:
        layer = nn.Linear(6, 6)
        if state is not None:
            layer.load_state_dict(state)
        return mp.apply_mask(layer, {"weight": [STACK_POOL[name]() for name in order]})

    plain = nn.Linear(6, 6).state_dict()
    layer = build()
    if how == "mp_load_state_dict":
        mp.load_state_dict(layer, plain)
    else:
        with torch.no_grad():
            layer.weight = plain["weight"].clone()
    # As documented: as if the rules had been applied to a model holding the plain weights.
    reference = build(plain)
    assert torch.equal(layer.weight, reference.weight)
    _stack_constraints_hold(layer, order)
    frozen_col = layer.weight.detach()[:, 3].clone()
    square_sum_steps(layer, torch.optim.SGD(layer.parameters(), lr=0.1), torch.randn(4, 6))
    _stack_constraints_hold(layer, order)
    if "freeze_col3" in order and order.index("freeze_col3") == len(order) - 1:
        assert torch.equal(layer.weight.detach()[:, 3], frozen_col)


def _compact_net(density: float) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    return mp.apply_mask(model, {
        "0.weight": mp.Mask(mp.masks.random(density), layout="compact"),
        "2.weight": mp.Mask(mp.masks.random(0.5)),
    })  # fmt: skip


# from the no-silent-failure attack on 0.1 (item 6: half-applied loads)
@pytest.mark.parametrize("loader", ["mp", "torch"])
def test_a_compact_checkpoint_of_another_density_loads_its_mask_and_entries(loader):
    """(Was refused until update_masks: a pruning run's checkpoint has another density.) The
    stored Parameter keeps its identity and takes the checkpoint's size; outputs equal the
    saved model's."""
    source = _compact_net(0.5)
    checkpoint = source.state_dict()
    model = _compact_net(0.75)
    stored = model[0].parametrizations.weight.original
    x = torch.randn(3, 4)
    if loader == "mp":
        mp.load_state_dict(model, checkpoint)
    else:
        model.load_state_dict(checkpoint)
    assert model[0].parametrizations.weight.original is stored
    assert stored.numel() == 8
    assert torch.equal(model(x), source(x))
    assert mp.verify(model) == []


# from the no-silent-failure attack on 0.1 (item 6: half-applied loads)
@pytest.mark.parametrize("loader", ["mp", "torch"])
def test_compact_entries_that_do_not_fit_their_mask_are_refused_atomically(loader):
    checkpoint = _compact_net(0.5).state_dict()
    checkpoint["0.parametrizations.weight.original"] = checkpoint[
        "0.parametrizations.weight.original"
    ][:-1]
    model = _compact_net(0.75)
    before = state_of(model)
    x = torch.randn(3, 4)
    output = model(x).detach()
    load = mp.load_state_dict if loader == "mp" else type(model).load_state_dict
    with pytest.raises(mp.MaskparamError, match="another shape"):
        load(model, checkpoint)
    assert_state_unchanged(model, before)
    assert torch.equal(model(x), output)


# from the no-silent-failure attack on 0.1 (item 6: half-applied loads)
def test_mp_load_strict_missing_key_is_atomic():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mp.apply_mask(model, {"0.weight": mp.Triangular(), "1.weight": mp.Freeze(dim=0, index=[0])})
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).state_dict()
    del plain["1.bias"]
    before = state_of(model)
    with pytest.raises(mp.MaskparamError, match=r"1\.bias"):
        mp.load_state_dict(model, plain, strict=True)
    assert_state_unchanged(model, before)


PROJECTIONS = ["gaussian", "sparse", "fastfood"]


# from the no-silent-failure attack on 0.1 (item 7: foreign and corrupt checkpoints)
@pytest.mark.parametrize("loader", ["mp", "torch"])
@pytest.mark.parametrize(
    ("saved", "loaded"),
    [(a, b) for a in PROJECTIONS for b in PROJECTIONS if a != b],
    ids=lambda p: p,
)
def test_subspace_checkpoint_of_other_projection_is_refused(saved, loaded, loader):
    source = subspace_linear(saved)
    model = subspace_linear(loaded)
    checkpoint = source.state_dict()
    x = torch.randn(5, 4)

    def load() -> None:
        if loader == "mp":
            mp.load_state_dict(model, checkpoint)
        else:
            model.load_state_dict(checkpoint)

    def check() -> None:  # loading "exactly" would mean computing what the source computes
        assert torch.equal(model(x), source(x))

    if loader == "mp":
        outcome_is_exact_or_refused(load, check, model)
    elif refusal_of(load) is None:  # torch's loader may copy other keys before it refuses
        check()


def _mask_linear() -> nn.Linear:
    return mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Mask(mp.masks.random(0.5), layout="dense")})


def _freeze_rows_linear() -> nn.Linear:
    return mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Freeze(dim=0, index=[0, 2])})


def _freeze_mask_linear() -> nn.Linear:
    return mp.apply_mask(
        nn.Linear(4, 3), {"weight": mp.Freeze(mp.masks.random(0.5), layout="dense")}
    )


def _first_entry(value: float) -> Callable[[Tensor], Tensor]:
    def corrupt(t: Tensor) -> Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return corrupt


CORRUPT = {
    "mask_entry_2": (_mask_linear, "0.mask", _first_entry(2)),
    "mask_entry_255": (_mask_linear, "0.mask", _first_entry(255)),
    "float_mask_0.7": (_mask_linear, "0.mask", lambda t: torch.full(t.shape, 0.7)),
    "duplicate_frozen_index": (_freeze_rows_linear, "0.index", lambda t: torch.tensor([0, 0])),
    # found by helper: loads silently, then every forward raises IndexError
    "frozen_index_out_of_range": (_freeze_rows_linear, "0.index", lambda t: torch.tensor([0, 7])),
    # found by helper: Freeze(mask)'s keep mask, like Mask's, scales the free entry by 2
    "keep_entry_2": (_freeze_mask_linear, "0.keep", _first_entry(2)),
}


# from the no-silent-failure attack on 0.1 (item 7: foreign and corrupt checkpoints)
@pytest.mark.parametrize("loader", ["mp", "torch"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_constraint_buffers_are_refused(case, loader):
    build, key, corrupt = CORRUPT[case]
    key = f"parametrizations.weight.{key}"
    checkpoint = build().state_dict()
    checkpoint[key] = corrupt(checkpoint[key])
    model = build()
    before = state_of(model)
    constraint_before = model.state_dict()[key].clone()
    load = mp.load_state_dict if loader == "mp" else type(model).load_state_dict
    with pytest.raises(mp.MaskparamError, match="weight"):
        load(model, checkpoint)
    if loader == "mp":
        assert_state_unchanged(model, before)
    else:  # torch's loader copies keys before the failing one: the constraint must be intact
        assert torch.equal(model.state_dict()[key], constraint_before)
        model(torch.randn(2, 4))


# from the attack on newcomer workflows (0.2)
def test_plain_checkpoint_into_a_magnitude_mask_keeps_the_mask_it_has() -> None:
    """Documented (README, Checkpoints): a plain checkpoint brings values, not masks; a mask
    computed from the weights at apply time stays, as lottery-ticket rewinding needs. To compute
    it from the checkpoint, load first, then apply (the README's order for pretrained weights)."""
    torch.manual_seed(0)
    pretrained = mlp(16, 16, 3).state_dict()
    loaded = mp.apply_mask(mlp(16, 16, 3), {"0.weight": mp.Mask(mp.masks.magnitude(0.5))})
    kept = mp.kept_entries(loaded, "0.weight")
    mp.load_state_dict(loaded, pretrained)
    assert torch.equal(mp.kept_entries(loaded, "0.weight"), kept)
    assert torch.equal(loaded[0].weight, pretrained["0.weight"] * kept)


# from the attack on newcomer workflows (0.2)
def test_plain_checkpoint_into_a_meta_built_model_refuses_or_gets_the_masks() -> None:
    torch.manual_seed(0)
    pretrained = mlp(16, 16, 3).state_dict()
    rules = {"0.weight": mp.Mask(mp.masks.random(0.5))}  # depends on the seed, not the weights
    with torch.device("meta"):
        model = mlp(16, 16, 3)
    mp.apply_mask(model, rules)
    model.to_empty(device="cpu")
    try:
        mp.load_state_dict(model, pretrained)
    except mp.MaskparamError:
        return
    reference = mlp(16, 16, 3)
    reference.load_state_dict(pretrained)
    mp.apply_mask(reference, rules)
    x = torch.randn(4, 16)
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize(
    "spec",
    [
        lambda: mp.Mask(mp.masks.magnitude(0.5), layout="dense"),
        lambda: mp.Freeze(mp.masks.random(0.5, seed=1), layout="dense"),
        lambda: mp.Mask(mp.masks.magnitude(0.5)),
    ],
    ids=["mask", "freeze", "auto-from-compact"],
)
def test_a_model_built_on_meta_materialises_with_load_state_dict_assign(spec):
    """torch's way to materialise a meta model, load_state_dict(assign=True), loads a
    constrained checkpoint: the same outputs, nothing left on meta."""
    torch.manual_seed(0)
    trained = mp.apply_mask(mlp(4, 4, 2), {"*.weight": spec()})
    state = copy.deepcopy(trained.state_dict())
    with torch.device("meta"):
        model = mlp(4, 4, 2)
    mp.apply_mask(model, {"*.weight": spec()})
    model.load_state_dict(state, assign=True)
    inputs = torch.randn(3, 4)
    assert torch.equal(model(inputs), trained(inputs))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert mp.verify(model) == []


def test_mp_load_state_dict_refuses_a_meta_value_before_copying_anything():
    model = mp.apply_mask(mlp(4, 4, 2, seed=0), {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})
    checkpoint = copy.deepcopy(model.state_dict())
    checkpoint = {k: v.mul(2) if v.is_floating_point() else v for k, v in checkpoint.items()}
    checkpoint["2.bias"] = checkpoint["2.bias"].to("meta")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"\['2.bias'\] are on the meta device"):
        mp.load_state_dict(model, checkpoint)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mp_load_state_dict_into_a_model_still_on_meta_is_refused_with_the_way_out():
    trained = mp.apply_mask(mlp(4, 6, 3, seed=0), {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})
    with torch.device("meta"):
        model = mlp(4, 6, 3)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})
    with pytest.raises(mp.MaskparamError, match=r"(?s)on the meta device.*to_empty"):
        mp.load_state_dict(model, trained.state_dict())
    model.load_state_dict(copy.deepcopy(trained.state_dict()), assign=True)  # the way out
    inputs = torch.randn(2, 4)
    assert torch.equal(model(inputs), trained(inputs))
