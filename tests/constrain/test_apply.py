"""apply_mask (_apply.py): what it changes, what it keeps, how rules combine, and bad rules and
bad spec arguments that raise a clear error and leave the model exactly as it was (a failed
registration rolls back); preview."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from helpers import assert_state_unchanged, mlp, state_of
from torch import Tensor, nn
from torch.nn.utils import parametrize

import maskparam as mp


def test_returns_the_model_and_keeps_the_parameter_object(tiny):
    weight = tiny.fc1.weight
    assert mp.apply_mask(tiny, {"fc1.weight": mp.Triangular()}) is tiny
    # The optimizer tracks Parameters by identity: the original must be the same object.
    assert tiny.fc1.parametrizations.weight.original is weight
    assert parametrize.is_parametrized(tiny.fc1, "weight")
    assert not parametrize.is_parametrized(tiny.fc2)


def test_stacked_specs_apply_in_order():
    layer = nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    frozen = torch.zeros(4, 4, dtype=torch.bool)
    frozen[0, 0] = frozen[3, 0] = True
    # Triangular first, then Freeze: the frozen values are those of the triangle.
    mp.apply_mask(layer, {"weight": [mp.Triangular(), mp.Freeze(frozen)]})
    assert torch.equal(layer.weight, before.tril())
    assert len(layer.parametrizations.weight) == 2
    row = mp.summary(layer).tensors[0]
    assert row.constraint == "Triangular(lower, diagonal=0) + Freeze(freezes the given entries)"
    assert row.free == 10 - 2


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_buffers_can_be_targets():
    module = Scaled()
    mp.apply_mask(module, {"scale": mp.Mask(torch.tensor([1, 1, 0, 1]))})
    assert torch.equal(module(torch.ones(4)), torch.tensor([1.0, 2.0, 0.0, 4.0]))
    assert "parametrizations.scale.original" in module.state_dict()


def test_strict_false_allows_rules_that_match_nothing(tiny, snapshot):
    before = snapshot(tiny)
    mp.apply_mask(tiny, {"no.such.tensor": mp.Triangular()}, strict=False)
    before.assert_same(tiny)


def test_user_parametrization_below_ours_keeps_working():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    mask = torch.rand(4, 4) < 0.5
    mp.apply_mask(layer, {"weight": mp.Mask(mask)})
    assert len(layer.parametrizations.weight) == 2
    assert bool((layer.weight[~mask] == 0).all())
    row = mp.summary(layer).tensors[0]
    assert (row.name, row.free, row.total) == ("weight", int(mask.sum()), 16)


def test_error_is_a_value_error():
    assert issubclass(mp.MaskparamError, ValueError)


BAD_RULES = [
    (
        {"fc1.weight": mp.Triangular(), "fc*.weight": mp.Mask(torch.ones(1))},
        r"'fc1.weight': selected by two rules, 'fc1.weight' and 'fc\*.weight'.*list of specs",
    ),
    (
        {"fc1.weight": "triangular"},
        r"rule 'fc1.weight': the value must be a spec or a non-empty list",
    ),
    ({"fc1.weight": []}, r"non-empty list of specs"),
    # A later rule fails after earlier ones were fine: nothing at all is applied.
    (
        {"fc1.weight": mp.Triangular(), "fc2.weight": mp.Mask(torch.ones(3))},
        r"Mask for 'fc2.weight'",
    ),
]
# Bad rules of one constraint are tested in its file (constraints/test_*.py), bad selectors in
# core/test_match.py.


@pytest.mark.parametrize(("rules", "message"), BAD_RULES)
def test_bad_rules_raise_and_leave_the_model_untouched(tiny, snapshot, rules, message):
    before = snapshot(tiny)
    with pytest.raises(mp.MaskparamError, match=re.compile(message, re.DOTALL)):
        mp.apply_mask(tiny, rules)
    before.assert_same(tiny)


def test_applying_twice_to_the_same_tensor_is_refused(tiny, snapshot):
    mp.apply_mask(tiny, {"fc1.weight": mp.Triangular()})
    before = snapshot(tiny)
    with pytest.raises(
        mp.MaskparamError, match="(?s)already constrains this tensor.*one list in one call"
    ):
        mp.apply_mask(tiny, {"fc*.weight": mp.Triangular()})
    before.assert_same(tiny)


def test_rnn_weights_are_constrained_not_silently_ignored():
    """An LSTM computes with _flat_weights (pytorch issue 65688): it must see the constraint."""
    lstm = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    mp.apply_mask(lstm, {"weight_hh_l0": mp.Triangular()})
    with torch.no_grad():
        lstm.parametrizations.weight_hh_l0.original.fill_(1.0)  # upper entries stay masked
    twin = nn.LSTM(3, 4)
    with torch.no_grad():
        for name in twin._flat_weights_names:
            getattr(twin, name).copy_(getattr(lstm, name))
    assert torch.equal(twin.weight_hh_l0, torch.ones(16, 4).tril())
    assert torch.equal(lstm(x)[0], twin(x)[0])


def test_not_a_model_and_not_a_mapping():
    with pytest.raises(mp.MaskparamError, match="must be a torch.nn.Module"):
        mp.apply_mask(torch.ones(2), {"weight": mp.Triangular()})  # type: ignore[type-var]
    with pytest.raises(mp.MaskparamError, match="rules must be a mapping"):
        mp.apply_mask(nn.Linear(2, 2), [("weight", mp.Triangular())])  # type: ignore[arg-type]


class _ShapeChanging(mp.Constraint):
    def forward(self, x):
        return x.reshape(-1)

    def pins(self, value):
        return None

    def describe(self):
        return "ShapeChanging"


class _BadSpec(mp.Spec):
    """Passes maskparam's checks but torch refuses it at registration: exercises the rollback."""

    def build(self, name, tensor):
        return _ShapeChanging()


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_a_registration_failure_rolls_back_what_was_registered(tiny, snapshot, layout):
    # fc1 is registered first, then fc2 fails: fc1 must be restored exactly. A compact fc1 has
    # shrunk its Parameter in place by then, and gets its full values back.
    before = snapshot(tiny)
    storage = tiny.fc1.weight.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="may not change the shape"):
        mp.apply_mask(
            tiny,
            {"fc1.weight": mp.Mask(mp.masks.random(0.5), layout=layout), "fc2.weight": _BadSpec()},
        )
    before.assert_same(tiny)
    assert not hasattr(tiny.fc1, "parametrizations")
    # Given back its own storage, not a copy (views of the weight still see it).
    assert tiny.fc1.weight.untyped_storage().data_ptr() == storage


class _Counted(mp.Constraint):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls.append("forward")
        return x

    def pins(self, value):
        return None

    def describe(self):
        return "Counted"


class _CountedSpec(mp.Spec):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def build(self, name, tensor):
        return _Counted(self.calls)


def test_apply_evaluates_a_constraint_once():
    # Once, in torch's registration (which checks the shape and dtype): a second evaluation
    # was a second pass over every weight (a Fastfood projection per tensor for a subspace).
    spec = _CountedSpec()
    mp.apply_mask(nn.Linear(3, 3), {"weight": spec})
    assert spec.calls == ["forward"]
    preview_spec = _CountedSpec()
    mp.preview(nn.Linear(3, 3), {"weight": preview_spec})  # the dry run runs it once too
    assert preview_spec.calls == ["forward"]


def test_preview_reports_selected_and_passed_over_and_changes_nothing(snapshot):
    class WithBuffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.frozen = nn.Linear(3, 3).requires_grad_(False)
            self.register_buffer("scale", torch.ones(2))

    model = WithBuffers()
    before = snapshot(model)
    found = mp.preview(model, {"*.weight": mp.Triangular(), "scale": mp.Mask(torch.ones(2))})
    assert [name for name, _, _ in found.selected] == ["fc.weight", "scale"]
    assert ("'*.weight'", "frozen.weight", "is a frozen parameter (requires_grad=False)") in (
        found.passed_over
    )
    assert "passed over:" in str(found)
    before.assert_same(model)
    with pytest.raises(mp.MaskparamError, match="needs a matrix"):  # the specs' checks run too
        mp.preview(model, {"fc.bias": mp.Triangular()})


def refused_naming(make_spec: Callable[[], mp.Spec], model: nn.Module, names: str) -> None:
    """A bad argument must be a MaskparamError: when the spec is constructed (there is no tensor
    to name yet), or when applied, naming the tensor (``names``: a regex) and changing nothing."""
    try:
        spec = make_spec()
    except mp.MaskparamError:
        return
    before = state_of(model)
    with pytest.raises(mp.MaskparamError, match=names):
        mp.apply_mask(model, {"weight": spec})
    assert_state_unchanged(model, before)


def _nan_basis() -> Tensor:
    basis = torch.randn(12, 2)
    basis[0, 0] = float("nan")
    return basis


def _inf_basis() -> Tensor:
    basis = torch.randn(12, 2)
    basis[3, 1] = float("inf")
    return basis


BAD_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_index_1.5": lambda: mp.Freeze(dim=0, index=1.5),
    "freeze_dim_0.0": lambda: mp.Freeze(dim=0.0, index=[1]),
    "triangular_diagonal_0.5": lambda: mp.Triangular(diagonal=0.5),
    "subspace_nan_basis": lambda: mp.Subspace(2, basis=_nan_basis()),
    "subspace_inf_basis": lambda: mp.Subspace(2, basis=_inf_basis()),
    "learnable_temperature_inf": lambda: mp.LearnableMask("soft", temperature=float("inf")),
    "learnable_init_nan": lambda: mp.LearnableMask(init=float("nan")),
    # found by helper: an infinite init makes every weight NaN (inf - inf in the straight-through)
    "learnable_init_inf (helper)": lambda: mp.LearnableMask(init=float("inf")),
    # silently reinterpreted on 0.1
    "masks_random_True": lambda: mp.Mask(mp.masks.random(True)),
    "freeze_dim_True": lambda: mp.Freeze(dim=True, index=[0]),
    "triangular_lower_no": lambda: mp.Triangular(lower="no"),
    # found by helper: the same bool-as-number reinterpretation elsewhere
    "masks_magnitude_True (helper)": lambda: mp.Mask(mp.masks.magnitude(True)),
    # found by helper: accepted when constructed, then a RuntimeError from torch.manual_seed
    "masks_random_seed_True (helper)": lambda: mp.Mask(mp.masks.random(0.5, seed=True)),
    "subspace_seed_True (helper)": lambda: mp.Subspace(2, seed=True),
}


# from the no-silent-failure attack on 0.1 (crashes: Python errors instead of MaskparamError, silently reinterpreted arguments)
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_arguments_raise_maskparam_error(case):
    refused_naming(BAD_SPECS[case], nn.Linear(4, 3), "'weight'")


# from the no-silent-failure attack on 0.1 (crashes: a Python error instead of MaskparamError)
def test_rule_value_none_raises_maskparam_error():
    layer = nn.Linear(4, 3)
    with pytest.raises(mp.MaskparamError, match="'weight'"):
        mp.apply_mask(layer, {"weight": None})


def test_a_failed_apply_gives_a_compact_target_back_its_gradient():
    class Reshaped(mp.Constraint):
        def forward(self, x):
            return x.reshape(-1)  # torch refuses a parametrization that changes the shape

        def pins(self, value):
            return None

        def describe(self):
            return "Reshaped"

    class Reshaping(mp.Spec):
        def build(self, name, tensor):
            return Reshaped()

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    grad = model[0].weight.grad.clone()
    rules = {"0.weight": mp.Mask(mp.masks.random(0.5), layout="compact"), "1.weight": Reshaping()}
    with pytest.raises(mp.MaskparamError, match="removed again"):
        mp.apply_mask(model, rules)
    assert type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight.grad, grad)


def test_a_non_persistent_buffer_is_refused_by_name_and_passed_over_by_wildcards():
    """torch's parametrize would save a non-persistent (derived) buffer, and baking would leave
    it in the state_dict: named, it is refused; a wildcard passes over it."""

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("inv_freq", torch.rand(4, 4), persistent=False)

    model = Rotary()
    keys = list(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="'inv_freq' is a non-persistent buffer"):
        mp.apply_mask(model, {"inv_freq": mp.Mask(mp.masks.magnitude(0.5))})
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.magnitude(0.5))})
    assert not any("inv_freq" in k for k in model.state_dict())
    mp.remove_parametrizations(model)
    assert list(model.state_dict()) == keys


def test_preview_leaves_torchs_random_stream_as_it_was():
    """A dry run changes nothing, the global RNG included: preview then apply draws the masks
    that apply alone draws after the same manual_seed."""
    rules = {"*.weight": mp.Mask(mp.masks.random(0.5))}
    alone, previewed = mlp(6, 8, 3, seed=0), mlp(6, 8, 3, seed=0)
    torch.manual_seed(1)
    mp.apply_mask(alone, rules)
    torch.manual_seed(1)
    mp.preview(previewed, rules)
    mp.apply_mask(previewed, rules)
    for name in ("0.weight", "2.weight"):
        assert torch.equal(mp.kept_entries(alone, name), mp.kept_entries(previewed, name))
