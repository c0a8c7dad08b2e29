"""Random sequences of operations, checked bit for bit against a plain-PyTorch reference.

A masked run (dense and compact layouts) and a reference with no maskparam at all go through the
same drawn sequence: train, change the masks (prune, regrow, drop-then-grow), save and resume
into a model built with another init (an optimizer that has not stepped yet), deep-copy model and
optimizer together, and save a checkpoint after an update. The reference keeps a full weight and
a mask by hand: the forward uses ``weight * mask``, an entry that becomes free starts from 0 with
the optimizer's fresh state. After every operation the effective weights of all three are equal,
bit for bit, and masked entries are exactly zero.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from helpers import mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import maskparam as mp

NAMES = ("0.weight", "2.weight")
INPUTS = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    # Adagrad makes its state in the constructor: an update before its first step must move it.
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
}


def _build(seed: int) -> nn.Sequential:
    return mlp(6, 8, 3, seed=seed)


def _random_masks(seed: int, density: float, model: nn.Module) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in model.named_parameters() if "weight" in name}
    return {name: torch.rand(shapes[name], generator=generator) < density for name in NAMES}


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(INPUTS).pow(2).mean().backward()
    optimizer.step()


@dataclass
class Reference:
    """Plain PyTorch: full weights, masks held by hand, the optimizer's state reset by hand."""

    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    masks: dict[str, Tensor]
    model: nn.Sequential = field(default_factory=lambda: _build(0))
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        with torch.no_grad():
            for name in NAMES:
                self._weight(name).mul_(self.masks[name])
        self.optimizer = self.make_optimizer(list(self.model.parameters()))

    def _weight(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def effective(self) -> list[Tensor]:
        return [(self._weight(n) * self.masks[n]).detach() for n in NAMES]

    def forward(self, inputs: Tensor) -> Tensor:
        out = inputs
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                index = list(self.model).index(layer)
                mask = self.masks[f"{index}.weight"]
                out = nn.functional.linear(out, layer.weight * mask, layer.bias)
            else:
                out = layer(out)
        return out

    def train(self) -> None:
        self.optimizer.zero_grad()
        self.forward(INPUTS).pow(2).mean().backward()
        self.optimizer.step()

    def update(self, new: dict[str, Tensor]) -> None:
        for name in NAMES:
            weight, arriving = self._weight(name), new[name] & ~self.masks[name]
            with torch.no_grad():
                weight[arriving] = 0.0
            for group in self.optimizer.param_groups:
                if not any(p is weight for p in group["params"]):
                    continue
                for key, value in self.optimizer.state.get(weight, {}).items():
                    if isinstance(value, Tensor) and value.shape == weight.shape:
                        fresh = 0.0
                        if key == "sum":
                            fresh = group["initial_accumulator_value"]
                        if key == "step_size":
                            fresh = group["lr"]
                        value[arriving] = fresh
            self.masks[name] = new[name].clone()

    def resume(self) -> None:
        saved_model, saved_optimizer = self.model.state_dict(), self.optimizer.state_dict()
        self.model = _build(1)
        self.model.load_state_dict(saved_model)
        self.optimizer = self.make_optimizer(list(self.model.parameters()))
        self.optimizer.load_state_dict(saved_optimizer)

    def deepcopy(self) -> None:
        self.model, self.optimizer = copy.deepcopy((self.model, self.optimizer))


@dataclass
class Masked:
    """The same run through maskparam, in one layout."""

    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    masks: dict[str, Tensor]
    layout: str
    model: nn.Sequential = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.model = self._constrained(0)
        self.optimizer = self.make_optimizer(list(self.model.parameters()))

    def _constrained(self, seed: int) -> nn.Sequential:
        rules = {name: mp.Mask(self.masks[name], layout=self.layout) for name in NAMES}
        return mp.apply_mask(_build(seed), rules)

    def effective(self) -> list[Tensor]:
        # The parametrized attribute: the tensor the forward uses.
        return [self.model[int(n.split(".")[0])].weight.detach() for n in NAMES]

    def train(self) -> None:
        _step(self.model, self.optimizer)

    def update(self, new: dict[str, Tensor]) -> None:
        mp.update_masks(self.model, dict(new), optimizer=self.optimizer)

    def resume(self) -> None:
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        # Another init: its own masks differ until the checkpoint's arrive.
        self.model = mp.apply_mask(
            _build(1), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=5), layout=self.layout)}
        )
        self.model.load_state_dict(saved_model)
        self.optimizer = self.make_optimizer(list(self.model.parameters()))
        self.optimizer.load_state_dict(saved_optimizer)

    def deepcopy(self) -> None:
        self.model, self.optimizer = copy.deepcopy((self.model, self.optimizer))


OPERATIONS = st.one_of(
    st.tuples(st.just("train"), st.integers(1, 3)),
    st.tuples(st.just("update"), st.integers(0, 1000), st.sampled_from([0.2, 0.5, 0.8])),
    st.tuples(st.just("resume")),
    st.tuples(st.just("deepcopy")),
)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@given(operations=st.lists(OPERATIONS, min_size=1, max_size=8), first=st.integers(0, 1000))
def test_random_operation_sequences_match_plain_pytorch(optimizer, operations, first):
    """Dense, compact and a plain-PyTorch reference stay bit-identical through any sequence of
    training, mask changes (regrowth after a resume or before the first step included),
    resumes into another init and deep copies."""
    make = OPTIMIZERS[optimizer]
    masks = _random_masks(first, 0.5, _build(0))
    runs = [
        Reference(make, {n: m.clone() for n, m in masks.items()}),
        Masked(make, masks, "dense"),
        Masked(make, masks, "compact"),
    ]
    for operation in operations:
        for run in runs:
            if operation[0] == "train":
                for _ in range(operation[1]):
                    run.train()
            elif operation[0] == "update":
                run.update(_random_masks(operation[1], operation[2], _build(0)))
            else:
                getattr(run, operation[0])()
        reference = runs[0].effective()
        for run in runs[1:]:
            for name, expected, got in zip(NAMES, reference, run.effective(), strict=True):
                assert torch.equal(got, expected), (run, name, operation)
                assert not got[~runs[0].masks[name]].any()
