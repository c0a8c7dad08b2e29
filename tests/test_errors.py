"""Bad input: a clear error naming the tensor, the problem and the fix; the model unchanged."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import maskparam as mp
from maskparam import Constraint as ConstraintParametrization
from maskparam import Spec

BAD_RULES = [
    (
        {"fc3.weight": mp.Triangular()},
        (
            r"rule 'fc3.weight'.*no floating-point tensor.*"
            r"closest tensor names: 'fc2.weight', 'fc1.weight'.*fix: correct the selector"
        ),
    ),
    (
        {re.compile("nothing"): mp.Triangular()},
        r"matched no floating-point tensor.*tensor names: 'conv.weight'",
    ),
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
    (
        {"position_ids": mp.Mask(torch.ones(4))},
        (
            r"'position_ids' has dtype torch.int64.*"
            r"only floating-point and complex"
        ),
    ),
    (
        {"*position_ids": mp.Mask(torch.ones(4))},
        r"matched 1 tensor\(s\) that cannot be constrained",
    ),
    ({3: mp.Triangular()}, r"selector 3: a selector cannot be a int"),
    (
        {"conv.weight": mp.Freeze(dim=0, index=[10])},
        (
            r"Freeze for 'conv.weight'.*index \[10\] out of "
            r"range for a dimension of size 10.*fix: use indices in \[-10, 9\]"
        ),
    ),
    (
        {"conv.weight": mp.Freeze(dim=4, index=[0])},
        r"Freeze for 'conv.weight'.*dim=4 is out of range",
    ),
    ({"conv.weight": mp.Freeze(dim=0, index=[0.5])}, r"index must be integers"),
    (
        {"fc1.bias": mp.Triangular()},
        r"Triangular for 'fc1.bias'.*needs a matrix.*shape \(6,\).*fix: select only",
    ),
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


@pytest.mark.parametrize(("rules", "message"), BAD_RULES)
def test_bad_rules_raise_and_leave_the_model_untouched(tiny, snapshot, rules, message):
    before = snapshot(tiny)
    with pytest.raises(mp.MaskparamError, match=re.compile(message, re.DOTALL)):
        mp.apply_mask(tiny, rules)
    before.assert_same(tiny)


def test_error_is_a_value_error():
    assert issubclass(mp.MaskparamError, ValueError)


def test_applying_twice_to_the_same_tensor_is_refused(tiny, snapshot):
    mp.apply_mask(tiny, {"fc1.weight": mp.Triangular()})
    before = snapshot(tiny)
    with pytest.raises(
        mp.MaskparamError, match="(?s)already constrains this tensor.*one list in one call"
    ):
        mp.apply_mask(tiny, {"fc*.weight": mp.Triangular()})
    before.assert_same(tiny)


def test_batchnorm_running_stats_named_exactly_are_refused(tiny, snapshot):
    before = snapshot(tiny)
    with pytest.raises(
        mp.MaskparamError, match="(?s)'norm.running_var' is a running statistic.*updates in place"
    ):
        mp.apply_mask(tiny, {"norm.running_var": mp.Mask(torch.ones(10))})
    before.assert_same(tiny)


def test_tied_weights_with_compact_layout_are_refused():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head})
    with pytest.raises(mp.MaskparamError, match="(?s)compact.*tied to 'head.weight'.*dense layout"):
        mp.apply_mask(model, {"embed.weight": mp.Mask(mp.masks.random(0.5), layout="compact")})
    assert not hasattr(embedding, "parametrizations")


def test_rnn_weights_are_refused_not_silently_ignored():
    lstm = nn.LSTM(3, 4)
    with pytest.raises(mp.MaskparamError, match="_flat_weights.*silently ignored.*65688"):
        mp.apply_mask(lstm, {"weight_hh_l0": mp.Triangular()})


def test_not_a_model_and_not_a_mapping():
    with pytest.raises(mp.MaskparamError, match="must be a torch.nn.Module"):
        mp.apply_mask(torch.ones(2), {"weight": mp.Triangular()})  # type: ignore[type-var]
    with pytest.raises(mp.MaskparamError, match="rules must be a mapping"):
        mp.apply_mask(nn.Linear(2, 2), [("weight", mp.Triangular())])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (mp.Freeze, "(?s)needs the entries to freeze.*requires_grad_\\(False\\)"),
        (lambda: mp.Freeze(dim=0), "needs the entries to freeze"),
        (lambda: mp.Freeze(torch.ones(2), dim=0, index=[0]), "both a mask and dim/index"),
        (lambda: mp.masks.random(1.5), "density must be a number between 0 and 1"),
        (lambda: mp.masks.magnitude(-0.1), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.random(0.5, seed=1.5), "seed must be an int"),
    ],
)
def test_bad_specs_fail_when_constructed(make, message):
    with pytest.raises(mp.MaskparamError, match=message):
        make()


class _ShapeChanging(ConstraintParametrization):
    def forward(self, x):
        return x.reshape(-1)


class _BadSpec(Spec):
    """Passes maskparam's checks but torch refuses it at registration: exercises the rollback."""

    def build(self, name, tensor):
        return _ShapeChanging()


def test_a_registration_failure_rolls_back_what_was_registered(tiny, snapshot):
    before = snapshot(tiny)
    with pytest.raises(ValueError, match="may not change the shape"):
        mp.apply_mask(tiny, {"fc1.weight": mp.Mask(mp.masks.random(0.5)), "fc2.weight": _BadSpec()})
    before.assert_same(tiny)
    assert not hasattr(tiny.fc1, "parametrizations")
