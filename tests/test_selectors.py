"""The matcher is a pure function: a table of (selector, names, module) -> expected."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from maskparam._selectors import check_selector, describe, is_exact_name, matches
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
