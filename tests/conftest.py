"""Shared fixtures: small models, the one training helper, a snapshot that proves a model was left
untouched, and the check that a trained model's constraints still hold. The training loop and
the snapshot themselves live in helpers.py (importable by the test files too)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

import maskparam as mp

# Shared, non-test modules of the suite (helpers.py, strategies.py, torch_optimizers.py) import by
# name; pytest's importlib mode does not put this folder on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Snapshot, train_steps  # (importable once the folder is on sys.path)

settings.register_profile("default", deadline=None, max_examples=60)
settings.register_profile("ci", deadline=None, max_examples=150, derandomize=True)
# CI runs the "ci" profile: more examples, derandomized so a red run reproduces.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Linear, conv and norm layers plus an integer buffer, like real models have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)
        self.norm = nn.BatchNorm2d(10)
        self.fc1 = nn.Linear(10, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.register_buffer("position_ids", torch.arange(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.conv(x)).relu().mean(dim=(2, 3))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture
def make_tiny() -> type[TinyNet]:
    return TinyNet


@pytest.fixture
def tiny_input() -> Tensor:
    return torch.randn(4, 3, 6, 6)


@pytest.fixture(scope="session")  # stateless; session scope lets hypothesis tests use it too
def train() -> Callable[..., list[float]]:
    """The one training loop of the test suite: see :func:`train_steps`."""
    return train_steps


@pytest.fixture
def snapshot() -> Callable[[nn.Module], Snapshot]:
    return Snapshot.of


@dataclass
class Invariants:
    """What training must leave alone on a constrained model: every buffer (masks, frozen values,
    indices, projections) and every parameter that does not require grad (a subspace's θ₀).

    With those unchanged, ``mp.verify(model) == []`` pins every constrained entry to what it was
    at apply time: masked entries zero, frozen entries their old values, the triangle exact.
    Not for models with BatchNorm in training mode (its running statistics are buffers).
    """

    fixed: dict[str, Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> Invariants:
        fixed = {name: b.detach().clone() for name, b in model.named_buffers()}
        fixed.update(
            (name, p.detach().clone())
            for name, p in model.named_parameters()
            if not p.requires_grad
        )
        return cls(fixed)

    def assert_hold(self, model: nn.Module) -> None:
        assert mp.verify(model) == []
        now = dict(model.named_buffers())
        now.update((name, p) for name, p in model.named_parameters() if not p.requires_grad)
        assert now.keys() == self.fixed.keys()
        for name, value in self.fixed.items():
            assert torch.equal(now[name], value), name


@pytest.fixture(scope="session")
def invariants() -> Callable[[nn.Module], Invariants]:
    """``held = invariants(model)`` before training, ``held.assert_hold(model)`` after."""
    return Invariants.of


class Holder(nn.Module):
    """A module holding one tensor ``weight`` of any shape and dtype, for property tests.

    ``forward(x)`` is ``weight * x``: with ``x = torch.ones(())`` the output is the tensor itself.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape).to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x


def backward_random(holder: Holder, seed: int) -> tuple[Tensor, Tensor]:
    """Backpropagate a random linear loss; return (the upstream gradient, the original's grad)."""
    upstream = torch.randn(holder.weight.shape, generator=torch.Generator().manual_seed(seed))
    upstream = upstream.to(holder.weight.dtype)
    (holder.weight * upstream).sum().backward()
    original = holder.parametrizations.weight.original
    if original.shape == holder.weight.shape:
        return upstream, original.grad
    # The compact layout stores the free entries only: lay their gradient out in full, with
    # zeros at the fixed entries (which are not stored, so nothing can train them).
    index = holder.parametrizations.weight[0].index
    full = torch.zeros(holder.weight.numel(), dtype=original.grad.dtype)
    return upstream, full.index_copy_(0, index, original.grad).view(holder.weight.shape)


# Session-scoped: hypothesis refuses function-scoped fixtures in @given tests.
@pytest.fixture(scope="session")
def make_holder() -> type[Holder]:
    return Holder


@pytest.fixture(scope="session")
def backward() -> Callable[[Holder, int], tuple[Tensor, Tensor]]:
    """``upstream, grad = backward(holder, seed)``: see :func:`backward_random`."""
    return backward_random
