"""global_magnitude and joint generators: one ranking across every tensor a rule selects,
equal to prune.global_unstructured (ties, NaN and inf, mixed dtypes, biases, a one-entry
tensor); a joint generator is called once per rule."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import bitwise_equal, linear_weights, mlp, pruning_steps, train_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

import maskparam as mp


def _model(integer_valued: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Conv1d(2, 3, 3), nn.Linear(10, 4))
    if integer_valued:  # many equal magnitudes: ties decide
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-3, 4, p.shape).float())
    return model


def _weights(model: nn.Module) -> list[Tensor]:
    return [model[i].weight for i in (0, 2, 3)]


@settings(max_examples=30, deadline=None)
@given(
    sparsity=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    integer_valued=st.booleans(),
    seed=st.integers(0, 5),
    layout=st.sampled_from(["dense", "compact", "auto"]),
)
def test_global_magnitude_equals_torch_global_unstructured(sparsity, integer_valued, seed, layout):
    model = _model(integer_valued, seed)
    reference = copy.deepcopy(model)
    rules = {"*.weight": mp.Mask(mp.masks.global_magnitude(sparsity), layout=layout)}
    mp.apply_mask(model, rules)
    prune.global_unstructured(
        [(reference[i], "weight") for i in (0, 2, 3)],
        pruning_method=prune.L1Unstructured,
        amount=sparsity,
    )
    for ours, theirs in zip(_weights(model), _weights(reference), strict=True):
        assert torch.equal(ours, theirs)


def test_global_magnitude_ranks_per_rule_and_across_the_rules_tensors():
    model = _model()
    with torch.no_grad():
        model[0].weight.abs_().add_(10)  # the big layer keeps everything under one ranking
    mp.apply_mask(
        model,
        {
            "[03].weight": mp.Mask(mp.masks.global_magnitude(0.25)),
            "2.weight": mp.Mask(mp.masks.global_magnitude(0.5)),
        },
    )
    assert int((model[0].weight == 0).sum()) == 0
    assert int((model[3].weight == 0).sum()) == 40  # 40 of 160 pruned: all of layer 3's 40
    assert int((model[2].weight == 0).sum()) == round(0.5 * 18)  # its own ranking


def test_global_magnitude_freezes_the_largest_with_freeze():
    model = _model()
    before = [w.detach().clone() for w in _weights(model)]
    mp.apply_mask(model, {"*.weight": mp.Freeze(mp.masks.global_magnitude(0.9))})
    train_steps(model[:2], torch.randn(4, 12), steps=3)
    frozen = mp.masks.global_magnitude(0.9).build_joint([(str(i), w) for i, w in enumerate(before)])
    assert torch.equal(model[0].weight[frozen[0]], before[0][frozen[0]])
    assert not torch.equal(model[0].weight, before[0])
    assert mp.verify(model) == []


def test_a_joint_generator_is_called_once_per_rule_with_the_rules_tensors():
    calls = []

    class Record(mp.masks.JointMaskGenerator):
        def build_joint(self, members):
            calls.append([name for name, _ in members])
            return [torch.ones_like(t, dtype=torch.bool) for _, t in members]

    mp.apply_mask(_model(), {"*.weight": mp.Mask(Record()), "*.bias": mp.Mask(Record())})
    assert calls == [["0.weight", "2.weight", "3.weight"], ["0.bias", "2.bias", "3.bias"]]


def test_a_joint_generator_returning_too_few_masks_is_refused_and_nothing_changes():
    class Short(mp.masks.JointMaskGenerator):
        def build_joint(self, members):
            return [torch.ones_like(members[0][1], dtype=torch.bool)]

    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="returned 1 mask"):
        mp.apply_mask(model, {"*.weight": mp.Mask(Short())})
    assert model.state_dict().keys() == before.keys()


def _torch_global(modules_names, amount):
    prune.global_unstructured(modules_names, pruning_method=prune.L1Unstructured, amount=amount)
    masks = [getattr(m, f"{n}_mask").bool() for m, n in modules_names]
    for m, n in modules_names:
        prune.remove(m, n)
    return masks


# from the attack on the pruning toolkit
def test_global_magnitude_over_linear_conv_and_bias_equals_torch():
    """One rule over Linear + Conv weights and biases: prune.global_unstructured's masks."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(12, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(x).flatten(1))

    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.global_magnitude(0.6), layout="dense")})
    names = [(ref.conv, "weight"), (ref.conv, "bias"), (ref.fc, "weight"), (ref.fc, "bias")]
    expected = _torch_global(names, 0.6)
    got = [model.conv.weight != 0, model.conv.bias != 0, model.fc.weight != 0, model.fc.bias != 0]
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


# from the attack on the pruning toolkit
def test_global_magnitude_with_mixed_dtypes_equals_torch():
    """Tensors of fp16, bf16 and fp32 in one rule: the same masks as prune.global_unstructured
    on the same values."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    a.half()
    b.bfloat16()
    model = nn.ModuleDict({"a": a, "b": b, "c": c})
    ref = copy.deepcopy(model)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5))})
    try:
        expected = _torch_global(
            [(ref["a"], "weight"), (ref["b"], "weight"), (ref["c"], "weight")], 0.5
        )
    except RuntimeError:  # torch cannot cat these: compare with a float64 ranking
        values = torch.cat([ref[k].weight.detach().double().abs().reshape(-1) for k in "abc"])
        keep = torch.ones_like(values, dtype=torch.bool)
        keep[torch.topk(values, k=round(0.5 * values.numel()), largest=False).indices] = False
        expected = [part.reshape(8, 8) for part in keep.split(64)]
    for k, e in zip("abc", expected, strict=True):
        assert torch.equal(model[k].weight != 0, e)


# from the attack on the pruning toolkit
@pytest.mark.parametrize("numel", [64, 2**17])
def test_global_magnitude_with_nan_and_inf_equals_torch(numel):
    """NaN and inf weights (small and large tensors): the masks prune.global_unstructured gives,
    and the effective weight is exactly zero where pruned."""
    torch.manual_seed(0)
    rows = numel // 64
    model = nn.Sequential(nn.Linear(64, rows), nn.Linear(rows, 4))
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        model[1].weight[0, 0] = float("nan")
        model[1].weight[1, :2] = 0.0
    ref = copy.deepcopy(model)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5))})
    expected = _torch_global([(ref[0], "weight"), (ref[1], "weight")], 0.5)
    for layer, e in zip(model, expected, strict=True):
        got = mp.kept_entries(model, "0.weight" if layer is model[0] else "1.weight")
        assert torch.equal(got.expand(e.shape).bool(), e)
        assert torch.equal(layer.weight[~e], torch.zeros(int((~e).sum())))


# from the attack on the pruning toolkit
def test_global_magnitude_with_a_one_entry_tensor_and_full_sparsity():
    """Empty-ish tensors: a (1, 1) weight beside a larger one, sparsity 0 and 1: torch's masks."""
    torch.manual_seed(0)
    for amount in (0.0, 1.0, 0.5):
        model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 7))
        ref = copy.deepcopy(model)
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(amount))})
        expected = _torch_global([(ref[0], "weight"), (ref[1], "weight")], amount)
        for layer, e in zip(model, expected, strict=True):
            assert torch.equal(layer.weight != 0, e)


# from the attack on the pruning toolkit
def test_global_magnitude_with_freeze_freezes_the_largest():
    """Freeze(global_magnitude(0.9)): the 10% largest |w| across the rule are frozen bit for bit."""
    model = mlp(8, 16, 4, seed=0)
    ref = copy.deepcopy(model)
    mp.apply_mask(model, {"*.weight": mp.Freeze(mp.masks.global_magnitude(0.9))})
    keep = _torch_global([(ref[0], "weight"), (ref[2], "weight")], 0.9)
    before = linear_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.1)
    pruning_steps(model, optimizer, 3)
    for b, a, k in zip(before, linear_weights(model), keep, strict=True):
        assert bitwise_equal(a[k], b[k])
        assert not torch.equal(a[~k], b[~k])


@pytest.mark.parametrize("integer_valued", [False, True])
@pytest.mark.parametrize(("first", "then"), [(0.3, 0.5), (0.5, 0.5), (0.2, 0.9)])
def test_global_magnitude_of_pruned_tensors_equals_global_unstructured_applied_twice(
    integer_valued, first, then
):
    """prune.global_unstructured on pruned tensors ranks their kept entries alone: so does the
    generator given the masks before (as update_masks recomputes them)."""
    reference = _model(integer_valued)
    params = [(reference[i], "weight") for i in (0, 2, 3)]
    total = sum(reference[i].weight.numel() for i in (0, 2, 3))
    first_count = round(first * total)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=first_count)
    more = round(then * total) - first_count
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=more)
    expected = [reference[i].weight_mask.bool() for i in (0, 2, 3)]

    model = _model(integer_valued)
    members = [(f"{i}.weight", model[i].weight.detach()) for i in (0, 2, 3)]
    kept = mp.masks.global_magnitude(first).build_joint(members)
    current = [(name, torch.where(k, w, 0.0)) for (name, w), k in zip(members, kept, strict=True)]
    found = mp.masks.global_magnitude(then).rebuild_joint(current, kept)
    assert all(torch.equal(f, e) for f, e in zip(found, expected, strict=True))
