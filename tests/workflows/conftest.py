"""Shared by the workflow tests: a small MLP, and every kind of constraint on its weights.

A test taking ``kind`` runs once per kind; one that supports fewer kinds parametrizes ``kind``
itself (``@pytest.mark.parametrize("kind", ["mask", "freeze"])``), which overrides the fixture.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import mlp
from torch import nn

import maskparam as mp

KINDS: dict[str, Callable[[], mp.Spec]] = {
    "mask": lambda: mp.Mask(mp.masks.random(0.5)),
    "mask-compact": lambda: mp.Mask(mp.masks.random(0.5), layout="compact"),
    "freeze": lambda: mp.Freeze(mp.masks.random(0.5)),
    "freeze-slices": lambda: mp.Freeze(dim=0, index=[0, 2]),
    "triangular": mp.Triangular,
    "learnable": mp.LearnableMask,
    "subspace-fastfood": lambda: mp.Subspace(6, projection="fastfood", group="all"),
    "subspace-gaussian": lambda: mp.Subspace(6, group="all"),
}


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    """The name of a kind of constraint (a key of ``KINDS``)."""
    return str(request.param)


@pytest.fixture
def rules(kind: str) -> Callable[[], mp.Rules]:
    """Fresh rules that put ``kind`` on every weight of the MLP of ``make_mlp``."""
    return lambda: {"*.weight": KINDS[kind]()}


@pytest.fixture
def make_mlp() -> Callable[[], nn.Sequential]:
    """The unconstrained MLP: ``Linear(6, 8), Tanh, Linear(8, 3)``."""
    return lambda: mlp(6, 8, 3)


@pytest.fixture
def constrained(rules: Callable[[], mp.Rules]) -> nn.Sequential:
    """The MLP of ``make_mlp`` with ``kind`` on its weights."""
    torch.manual_seed(0)
    return mp.apply_mask(mlp(6, 8, 3), rules())
