"""Selectors (core/match.py): the matcher is a pure function, checked on a table of
(selector, names, module) -> expected; then through apply_mask: every selector kind, and selectors
that match nothing, name a tensor that cannot be constrained, or raise."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import maskparam as mp
from maskparam.core.match import check_selector, describe, is_exact_name, matches
from maskparam.errors import MaskparamError

LINEAR = nn.Linear(2, 2)


CONV = nn.Conv2d(1, 1, 1)


EMPTY = torch.empty(0)


TABLE = [
    # glob on qualified names
    ("fc.weight", ["fc.weight"], LINEAR, True),
    ("fc.weight", ["fc.bias"], LINEAR, False),
    ("fc.weight", ["encoder.fc.weight"], LINEAR, False),  # exact names are not suffixes
    ("*.weight", ["encoder.layers.0.weight"], LINEAR, True),  # * crosses dots
    ("encoder.layers.*.weight", ["encoder.layers.11.weight"], LINEAR, True),
    ("encoder.layers.*.weight", ["decoder.layers.0.weight"], LINEAR, False),
    ("layer?.weight", ["layer1.weight"], LINEAR, True),
    ("layer[12].weight", ["layer3.weight"], LINEAR, False),
    ("FC.weight", ["fc.weight"], LINEAR, False),  # case-sensitive
    ("*", ["anything.at.all"], LINEAR, True),
    # aliases: a shared module reachable under two names
    ("b.weight", ["a.weight", "b.weight"], LINEAR, True),
    # regex, full match
    (re.compile(r"fc\d\.weight"), ["fc1.weight"], LINEAR, True),
    (re.compile(r"fc\d"), ["fc1.weight"], LINEAR, False),
    (re.compile(r".*\.bias"), ["x.bias"], LINEAR, True),
    # module type and local tensor name
    ((nn.Linear, "weight"), ["fc.weight"], LINEAR, True),
    ((nn.Linear, "weight"), ["fc.bias"], LINEAR, False),
    ((nn.Linear, "weight"), ["conv.weight"], CONV, False),
    ((nn.Linear, "*"), ["fc.bias"], LINEAR, True),
    (((nn.Linear, nn.Conv2d), "weight"), ["conv.weight"], CONV, True),
    # predicate
    (lambda name, module, t: name.endswith("bias"), ["fc.bias"], LINEAR, True),
    (lambda name, module, t: isinstance(module, nn.Conv2d), ["fc.weight"], LINEAR, False),
]


@pytest.mark.parametrize(("selector", "names", "module", "expected"), TABLE)
def test_matches(selector, names, module, expected):
    check_selector(selector)
    assert matches(selector, names, module, EMPTY) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        (3, "cannot be a int"),
        (None, "cannot be a NoneType"),
        ((nn.Linear,), "must be \\(module type, tensor name glob\\)"),
        (("fc", "weight"), "must be \\(module type, tensor name glob\\)"),
        ((nn.Linear, 3), "must be \\(module type, tensor name glob\\)"),
        (nn.Linear, "a module type alone"),
    ],
)
def test_bad_selectors_are_refused(selector, message):
    with pytest.raises(MaskparamError, match=message):
        check_selector(selector)


@pytest.mark.parametrize(
    ("selector", "exact"),
    [
        ("fc.weight", True),
        ("*.weight", False),
        ("a?", False),
        ("a[0]", False),
        (re.compile("a"), False),
    ],
)
def test_is_exact_name(selector, exact):
    assert is_exact_name(selector) is exact


def test_describe_is_readable():
    assert describe("fc.*") == "'fc.*'"
    assert describe(re.compile("a.b")) == "re.compile('a.b')"
    assert describe((nn.Linear, "weight")) == "(Linear, 'weight')"


def test_every_selector_kind_in_one_call(tiny):
    mp.apply_mask(
        tiny,
        {
            "fc1.weight": mp.Triangular(),
            re.compile(r"fc2\.(weight|bias)"): mp.Mask(mp.masks.random(0.5)),
            (nn.Conv2d, "weight"): mp.Freeze(dim=0, index=[0, 1]),
            lambda name, module, t: name == "head.bias": mp.Freeze(torch.tensor([True, False])),
        },
    )
    constrained = {row.name for row in mp.summary(tiny).tensors}
    assert constrained == {"fc1.weight", "fc2.weight", "fc2.bias", "conv.weight", "head.bias"}


BAD_SELECTIONS = [
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
    ({3: mp.Triangular()}, r"selector 3: a selector cannot be a int"),
    (
        {"position_ids": mp.Mask(torch.ones(4))},
        (
            r"'position_ids' has dtype torch.int64.*"
            r"only floating-point and complex"
        ),
    ),
    (
        {"*position_ids": mp.Mask(torch.ones(4))},
        r"matched 1 tensor\(s\) that wildcards pass over",
    ),
    (
        {"norm.running_var": mp.Mask(torch.ones(10))},
        r"'norm.running_var' is a running statistic.*updates in place",
    ),
]


@pytest.mark.parametrize(("rules", "message"), BAD_SELECTIONS)
def test_bad_selections_raise_and_leave_the_model_untouched(tiny, snapshot, rules, message):
    before = snapshot(tiny)
    with pytest.raises(mp.MaskparamError, match=re.compile(message, re.DOTALL)):
        mp.apply_mask(tiny, rules)
    before.assert_same(tiny)


# from the no-silent-failure attack on 0.1 (found by a helper)
def test_error_in_selector_predicate_names_the_tensor():
    """Found by helper: a predicate selector that raises gives a bare ZeroDivisionError."""
    layer = nn.Linear(4, 3)
    with pytest.raises(mp.MaskparamError, match="'weight'|'bias'"):
        mp.apply_mask(layer, {lambda name, module, tensor: 1 / 0: mp.Triangular()})


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 3)
        self.attn = nn.MultiheadAttention(4, 2)
        self.fc = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_preview_lists_the_weights_a_glob_misses_by_a_suffix_or_a_dot():
    """'*.weight' matches whole names: an RNN's weight_ih_l0 and MultiheadAttention's
    in_proj_weight are not selected; preview says so, and which selector would take them."""
    found = mp.preview(_Mixed(), {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})
    assert [name for name, _, _ in found.selected] == ["attn.out_proj.weight", "fc.weight"]
    rnn = (
        "is not selected: '*.weight' matches whole names, and an RNN's weights are named "
        "weight_ih_l<k> and weight_hh_l<k> ('{}'); select it with '*weight*' or "
        "(torch.nn.RNNBase, 'weight_*')"
    )
    assert found.passed_over == (
        ("'*.weight'", "frozen.weight", "is a frozen parameter (requires_grad=False)"),
        ("'*.weight'", "lstm.weight_ih_l0", rnn.format("weight_ih_l0")),
        ("'*.weight'", "lstm.weight_hh_l0", rnn.format("weight_hh_l0")),
        (
            "'*.weight'",
            "attn.in_proj_weight",
            (
                "is not selected: '*.weight' matches whole names, and its name is "
                "'attn.in_proj_weight'; select it with '*weight'"
            ),
        ),
    )
    assert "lstm.weight_ih_l0" in str(found)


@pytest.mark.parametrize(
    "selector", ["*weight*", (nn.RNNBase, "weight_*"), (torch.nn.LSTM, "weight_*")]
)
def test_the_documented_selectors_take_an_rnns_weights(selector):
    model = _Mixed()
    found = mp.preview(model, {selector: mp.Mask(mp.masks.magnitude(0.5))})
    names = {name for name, _, _ in found.selected}
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0"} <= names
    assert not any("is not selected" in why for _, _, why in found.passed_over)


def test_a_glob_that_matches_nothing_names_the_weights_it_misses():
    with pytest.raises(
        MaskparamError,
        match=r"(?s)matched no floating-point tensor in LSTM.*it misses 2 weight\(s\) by a suffix "
        r"or a dot: 'weight_ih_l0', 'weight_hh_l0'.*select it with '\*weight\*'",
    ):
        mp.apply_mask(nn.LSTM(3, 3), {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})
    with pytest.raises(
        MaskparamError, match=r"(?s)misses 1 weight\(s\).*'weight'.*select it with 'weight'"
    ):
        mp.apply_mask(nn.Linear(3, 3), {"*.weight": mp.Mask(mp.masks.magnitude(0.5))})


def test_freeze_refuses_a_parameter_that_does_not_train(snapshot):
    """Named exactly, a requires_grad=False Parameter is constrained (a Mask prunes it), but
    Freeze on it would train nothing: refused, with the fix."""
    model = _Mixed()
    before = snapshot(model)
    with pytest.raises(
        MaskparamError,
        match=r"(?s)Freeze for 'frozen.weight': the Parameter does not train \(requires_grad=False\)"
        r".*fix: call tensor.requires_grad_\(True\)",
    ):
        mp.apply_mask(model, {"frozen.weight": mp.Freeze(mp.masks.rows([0]))})
    with pytest.raises(MaskparamError, match=r"Freeze for 'frozen.weight': the Parameter does not"):
        mp.apply_mask(model, {"frozen.weight": mp.Freeze(dim=0, index=[0])})
    before.assert_same(model)
    mp.apply_mask(model, {"frozen.weight": mp.Mask(mp.masks.rows([0]))})  # a Mask still prunes it
    assert torch.equal(model.frozen.weight[1:], torch.zeros(2, 3))
