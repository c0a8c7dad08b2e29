"""Optimizer checkpoints keyed by tensor names (``mp.optimizer_state_dict`` /
``mp.load_optimizer_state_dict``): they survive apply and bake (torch's positional state would go
to another parameter), are laid out for the layout they meet (compact <-> dense, a model built on
the meta device), and a state of another mask is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import keep_31_of_64, mlp, square_sum_steps, steps_on_x_16x8
from torch import Tensor, nn

import maskparam as mp


class TwoMatrices(nn.Module):
    """Two parameters of one shape in one module: a swapped optimizer state goes unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.a @ self.b


def _model_and_tensor_name(kind: str) -> tuple[nn.Module, str]:
    """The model and the name of the tensor to constrain (it is registered first)."""
    return (nn.Linear(4, 3), "weight") if kind == "linear" else (TwoMatrices(), "a")


def _adam_state_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    return {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}


def _load_then_step_matches_or_refuses(
    model: nn.Module, saved: dict[str, object], expected: dict[int, Tensor]
) -> None:
    # The safe path (torch's optimizer.load_state_dict maps by position, which apply and bake
    # change: documented in the README): optimizer states keyed by tensor name.
    optimizer = torch.optim.Adam(model.parameters())
    try:
        mp.load_optimizer_state_dict(optimizer, model, saved)
        matches = all(
            id(p) in expected and torch.equal(optimizer.state[p]["exp_avg"], expected[id(p)])
            for p in model.parameters()
        )
        square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    except mp.MaskparamError:
        return  # a clear refusal
    assert matches, "a parameter received another parameter's optimizer state"


# from the no-silent-failure attack on 0.1 (item 11: optimizer state order)
@pytest.mark.parametrize("kind", ["linear", "two_matrices"])
def test_optimizer_state_saved_constrained_loaded_after_bake(kind):
    model, name = _model_and_tensor_name(kind)
    mp.apply_mask(model, {name: mp.Triangular(layout="dense")})
    optimizer = torch.optim.Adam(model.parameters())
    square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    saved, expected = mp.optimizer_state_dict(optimizer, model), _adam_state_by_parameter(optimizer)
    mp.remove_parametrizations(model)  # the baked tensor is the same Parameter object
    _load_then_step_matches_or_refuses(model, saved, expected)


# from the no-silent-failure attack on 0.1 (item 11: optimizer state order)
@pytest.mark.parametrize("kind", ["linear", "two_matrices"])
def test_optimizer_state_saved_plain_loaded_after_apply(kind):
    model, name = _model_and_tensor_name(kind)
    optimizer = torch.optim.Adam(model.parameters())
    square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    saved, expected = mp.optimizer_state_dict(optimizer, model), _adam_state_by_parameter(optimizer)
    # dense: state of the same shape, mapped by name (the compact layout's relayout of the
    # state is tested below, test_optimizer_state_without_names_or_of_another_mask_is_refused)
    mp.apply_mask(model, {name: mp.Triangular(layout="dense")})  # keeps the Parameter object
    _load_then_step_matches_or_refuses(model, saved, expected)


@pytest.mark.parametrize("direction", ["plain-to-constrained", "constrained-to-baked"])
def test_optimizer_state_by_name_survives_apply_and_bake(direction, train):
    torch.manual_seed(0)
    model = TwoMatrices()
    if direction == "constrained-to-baked":
        mp.apply_mask(model, {"a": mp.Triangular()})
    optimizer = torch.optim.Adam(model.parameters())
    train(model, torch.randn(2, 4), steps=1, optimizer=optimizer)
    a = model.parametrizations.a.original if direction == "constrained-to-baked" else model.a
    expected = {
        "a": optimizer.state[a]["exp_avg"].clone(),
        "b": optimizer.state[model.b]["exp_avg"].clone(),
    }
    saved = mp.optimizer_state_dict(optimizer, model)
    if direction == "constrained-to-baked":
        mp.remove_parametrizations(model)
    else:
        mp.apply_mask(model, {"a": mp.Triangular()})
    # torch's positional load would give `a` the state of `b` here (same shapes: no error).
    new = torch.optim.Adam(model.parameters())
    mp.load_optimizer_state_dict(new, model, saved)
    a = model.a if direction == "constrained-to-baked" else model.parametrizations.a.original
    assert torch.equal(new.state[a]["exp_avg"], expected["a"])
    assert torch.equal(new.state[model.b]["exp_avg"], expected["b"])
    train(model, torch.randn(2, 4), steps=1, optimizer=new)


def test_optimizer_state_without_names_or_of_another_mask_is_refused(train):
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    train(model, torch.randn(2, 4), steps=1, optimizer=optimizer)
    with pytest.raises(mp.MaskparamError, match="no parameter names"):
        mp.load_optimizer_state_dict(optimizer, model, optimizer.state_dict())
    saved = mp.optimizer_state_dict(optimizer, model)
    # A plain (full-shape) state fits the compact layout: the free entries' state is kept.
    mp.apply_mask(model, {"weight": mp.Mask(mp.masks.random(0.5), layout="compact")})
    kept = mp.kept_entries(model, "weight")
    new = torch.optim.Adam(model.parameters())
    mp.load_optimizer_state_dict(new, model, saved)
    loaded = new.state[model.parametrizations.weight.original]["exp_avg"]
    assert torch.equal(loaded, optimizer.state[model.parametrizations.weight.original]
                       ["exp_avg"][kept])  # fmt: skip
    # State saved under a mask of another density fits neither layout: refused, nothing loaded.
    compact_saved = mp.optimizer_state_dict(new, model)
    other = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Mask(mp.masks.random(0.25))})
    fresh = torch.optim.Adam(other.parameters())
    with pytest.raises(mp.MaskparamError, match=r"(?s)'weight'.*exp_avg.*shape \(6,\)"):
        mp.load_optimizer_state_dict(fresh, other, compact_saved)
    assert fresh.state_dict()["state"] == {}  # nothing was loaded


def test_meta_model_takes_the_compact_layout_of_the_checkpoint_so_torch_optimizer_state_fits() -> (
    None
):
    """Resume on a model built on the meta device (auto -> dense) from a checkpoint of a
    real-weight model (auto -> compact): the model takes the checkpoint's compact layout, so
    torch's own optimizer.load_state_dict (positional) fits, and the run goes on bit for bit."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64())})
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    steps_on_x_16x8(model, opt, 1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    with torch.device("meta"):
        resumed = nn.Linear(8, 8, bias=False)
    mp.apply_mask(resumed, {"weight": mp.Mask(keep_31_of_64())})
    resumed.to_empty(device="cpu")
    stored = resumed.parametrizations.weight.original
    assert stored.shape == (8, 8)  # dense
    resumed.load_state_dict(saved_model)
    assert resumed.parametrizations.weight.original is stored  # the same Parameter, now compact
    assert stored.shape == (31,)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.1)
    opt2.load_state_dict(saved_opt)
    steps_on_x_16x8(model, opt, 2)
    steps_on_x_16x8(resumed, opt2, 2)
    assert torch.equal(resumed.weight, model.weight)


# from the attack on layout='auto' (its fix)
def test_meta_model_resumes_optimizer_state_of_a_compact_run_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64())})
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    steps_on_x_16x8(model, opt, 1)
    saved = copy.deepcopy(mp.optimizer_state_dict(opt, model))  # as torch.save would
    with torch.device("meta"):
        resumed = nn.Linear(8, 8, bias=False)
    mp.apply_mask(resumed, {"weight": mp.Mask(keep_31_of_64())})  # meta: dense
    resumed.to_empty(device="cpu")
    resumed.load_state_dict(model.state_dict())  # compact now, as the checkpoint
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.1)
    mp.load_optimizer_state_dict(opt2, resumed, saved)
    state = opt2.state[resumed.parametrizations.weight.original]["exp_avg"]
    compact = opt.state[model.parametrizations.weight.original]["exp_avg"]
    assert torch.equal(state, compact)  # the model took the checkpoint's compact layout
    torch.manual_seed(5)
    steps_on_x_16x8(model, opt, 1)
    torch.manual_seed(5)
    steps_on_x_16x8(resumed, opt2, 1)
    assert torch.equal(resumed.weight, model.weight)  # the same next step as the compact run


def _closure_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)


NOT_ELEMENTWISE = {
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=0.01),
    "lbfgs": lambda params: torch.optim.LBFGS(params, lr=0.1, max_iter=3),
}


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("kind", list(NOT_ELEMENTWISE))
def test_states_of_optimizers_that_are_not_elementwise_load_by_name_and_resume_exactly(
    kind, constrained
):
    # Adafactor factors a matrix's second moment (row and column vectors), LBFGS keeps flat
    # vectors over all its parameters: loaded as torch loads them, where they fit.
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        if constrained:
            mp.apply_mask(
                model, {"0.weight": mp.Mask(mp.masks.random(0.5, seed=0), layout="dense")}
            )
        return model

    x = torch.randn(4, 6)
    model = make()
    optimizer = NOT_ELEMENTWISE[kind](model.parameters())
    _closure_step(model, optimizer, x)
    saved = copy.deepcopy(mp.optimizer_state_dict(optimizer, model))
    resumed = make()
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = NOT_ELEMENTWISE[kind](resumed.parameters())
    mp.load_optimizer_state_dict(resumed_optimizer, resumed, saved)
    _closure_step(model, optimizer, x)
    _closure_step(resumed, resumed_optimizer, x)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_an_lbfgs_history_of_another_layout_is_refused_and_nothing_loads() -> None:
    def make(layout: str) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        return mp.apply_mask(
            model, {"0.weight": mp.Mask(mp.masks.random(0.5, seed=0), layout=layout)}
        )

    x = torch.randn(4, 6)
    model = make("compact")
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    _closure_step(model, optimizer, x)
    saved = copy.deepcopy(mp.optimizer_state_dict(optimizer, model))
    dense = make("dense")
    fresh = torch.optim.LBFGS(dense.parameters(), lr=0.1, max_iter=3)
    with pytest.raises(mp.MaskparamError, match=r"LBFGS's saved history holds flat vectors"):
        mp.load_optimizer_state_dict(fresh, dense, saved)
    assert fresh.state_dict()["state"] == {}


def _doubled_groups(state: dict) -> None:
    state["param_groups"].append(copy.deepcopy(state["param_groups"][0]))


def _doubled_groups_and_names(state: dict) -> None:
    _doubled_groups(state)
    state["maskparam_param_names"].append(list(state["maskparam_param_names"][0]))


DAMAGED = {
    "doubled groups": (_doubled_groups, "it has 2 parameter groups but 1 lists of names"),
    "doubled groups and names": (_doubled_groups_and_names, "a parameter is listed twice"),
    "no state": (lambda s: s.pop("state"), "it has no 'state' mapping"),
    "state a list": (lambda s: s.__setitem__("state", [1]), "it has no 'state' mapping"),
    "no param_groups": (lambda s: s.pop("param_groups"), "its 'param_groups' is not a list"),
    "a group without params": (
        lambda s: s["param_groups"][0].pop("params"),
        "its 'param_groups' is not a list",
    ),
    "names not lists": (
        lambda s: s.__setitem__("maskparam_param_names", "0.weight"),
        "its 'maskparam_param_names' is not a list of lists of names",
    ),
    "a parameter missing": (
        lambda s: s["param_groups"][0]["params"].pop(),
        "group 0 holds 3 parameters but 4 names",
    ),
    "an entry not a mapping": (
        lambda s: s["state"].__setitem__(0, 5),
        r"the state of \[0\] is not a mapping",
    ),
    "state for no parameter": (
        lambda s: s["state"].__setitem__(99, {}),
        r"it holds state for \[99\], which no group lists",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_state_is_refused_naming_the_damage_and_nothing_loads(case) -> None:
    damage, message = DAMAGED[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    state = copy.deepcopy(mp.optimizer_state_dict(optimizer, model))
    damage(state)
    target = torch.optim.Adam(model.parameters(), lr=0.5)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(mp.MaskparamError, match=f"the state is damaged: {message}"):
        mp.load_optimizer_state_dict(target, model, state)
    assert target.state_dict() == before


def test_a_state_of_another_optimizer_class_is_refused_before_loading():
    model = mp.apply_mask(mlp(4, 4, 2, seed=0), {"0.weight": mp.Mask(mp.masks.magnitude(0.3))})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters())
    for optimizer in (sgd, adam):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    saved = mp.optimizer_state_dict(sgd, model)
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(mp.MaskparamError, match="saved by another kind of optimizer"):
        mp.load_optimizer_state_dict(adam, model, saved)
    after = adam.state_dict()
    assert before["param_groups"] == after["param_groups"]
    assert all(
        torch.equal(before["state"][i][k], after["state"][i][k])
        for i in before["state"]
        for k in before["state"][i]
    )
