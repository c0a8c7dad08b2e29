"""remove_parametrizations (_remove.py): bake exactly, remove only ours, give back a plain,
exportable model (a compact tensor with a gradient too, with a new or the old optimizer)."""

from __future__ import annotations

import pytest
import torch
from helpers import refusal_of, square_sum_steps
from torch import nn
from torch.nn.utils import parametrize

import maskparam as mp

RULES: mp.Rules = {
    "conv.weight": mp.Freeze(dim=0, index=[1, 2]),
    "fc1.weight": mp.Mask(mp.masks.random(0.5)),
    "fc2.weight": [mp.Triangular(), mp.Freeze(mp.masks.random(0.2, seed=1))],
    "head.bias": mp.Mask(torch.tensor([1.0, 0.0])),
}


def test_bake_restores_class_keys_parameter_identity_and_values(tiny, tiny_input, train):
    untouched_keys = list(tiny.state_dict().keys())
    params_before = dict(tiny.named_parameters())
    classes_before = {name: type(m) for name, m in tiny.named_modules()}
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=0.1, weight_decay=0.1)  # before apply

    # the optimizer is passed: maskparam moves state only in optimizers it is given
    mp.apply_mask(tiny, RULES, optimizer=optimizer)
    train(tiny, tiny_input, optimizer=optimizer)
    tiny.eval()
    with torch.no_grad():
        effective = {
            name: getattr(
                tiny.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            ).clone()
            for name in ("conv.weight", "fc1.weight", "fc2.weight", "head.bias")
        }
        outputs = tiny(tiny_input)

    assert mp.remove_parametrizations(tiny, optimizer=optimizer) is tiny
    assert list(tiny.state_dict().keys()) == untouched_keys
    assert {name: type(m) for name, m in tiny.named_modules()} == classes_before
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())
    for name, param in tiny.named_parameters():
        assert param is params_before[name]  # same objects: the optimizer still holds them
    for name, value in effective.items():
        module, attr = name.rsplit(".", 1)
        assert torch.equal(getattr(tiny.get_submodule(module), attr), value)
    with torch.no_grad():
        assert torch.equal(tiny(tiny_input), outputs)
    # The old optimizer still trains the baked model (now without constraints).
    before = tiny.fc1.weight.detach().clone()
    train(tiny, tiny_input, steps=1, optimizer=optimizer)
    assert not torch.equal(tiny.fc1.weight, before)
    assert int((tiny.fc1.weight == 0).sum()) < int((before == 0).sum())


def test_leave_parametrized_false_gives_back_the_raw_originals():
    layer = nn.Linear(3, 3)
    raw = layer.weight.detach().clone()
    mp.apply_mask(layer, {"weight": mp.Triangular()})
    mp.remove_parametrizations(layer, leave_parametrized=False)
    assert torch.equal(layer.weight, raw)


def test_a_users_weight_norm_survives():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    mask = torch.rand(4, 4) < 0.5
    mp.apply_mask(layer, {"weight": mp.Mask(mask)})
    with torch.no_grad():
        effective = layer.weight.clone()
    mp.remove_parametrizations(layer)
    assert parametrize.is_parametrized(layer, "weight")
    assert [type(p).__name__ for p in layer.parametrizations.weight] == ["_WeightNorm"]
    assert "parametrizations.weight.original0" in layer.state_dict()
    # weight_norm re-fits g and v to the constrained value: exact zeros, the rest up to rounding.
    assert torch.equal(layer.weight.detach()[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(layer.weight.detach(), effective)


def test_user_parametrization_without_right_inverse_is_refused_before_any_change():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    mp.apply_mask(model, {"*.weight": mp.Triangular()})
    parametrize.register_parametrization(model[1], "weight", Double())
    with pytest.raises(
        mp.MaskparamError, match="(?s)Double.*no right_inverse.*leave_parametrized=False"
    ):
        mp.remove_parametrizations(model)
    assert parametrize.is_parametrized(model[0], "weight")  # nothing was removed anywhere


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_baked_model_scripts_and_exports(tiny, tiny_input):
    mp.apply_mask(tiny, RULES)
    tiny.eval()
    with torch.no_grad():
        expected = tiny(tiny_input)
    mp.remove_parametrizations(tiny)
    scripted = torch.jit.script(tiny)
    exported = torch.export.export(tiny, (tiny_input,))
    with torch.no_grad():
        assert torch.equal(scripted(tiny_input), expected)
        assert torch.equal(exported.module()(tiny_input), expected)


def _compact_trained() -> tuple[nn.Linear, torch.optim.Optimizer]:
    layer = mp.apply_mask(
        nn.Linear(4, 3), {"weight": mp.Mask(mp.masks.random(0.5), layout="compact")}
    )
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    square_sum_steps(layer, optimizer, torch.randn(2, 4), steps=1)  # leaves a compact-shaped .grad
    return layer, optimizer


# from the no-silent-failure attack on 0.1 (crashes: a compact layout baked while a compact-shaped .grad exists)
def test_compact_bake_with_grad_then_new_optimizer_steps():
    layer, _ = _compact_trained()
    mp.remove_parametrizations(layer)
    assert layer.weight.grad is None or layer.weight.grad.shape == layer.weight.shape
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4)).square().sum().backward()  # accumulates into .grad
    optimizer.step()


# from the no-silent-failure attack on 0.1 (crashes: a compact layout baked while a compact-shaped .grad exists)
def test_compact_bake_then_old_optimizer_steps_or_refuses():
    layer, optimizer = _compact_trained()
    # the optimizer is passed: maskparam moves state only in optimizers it is given
    mp.remove_parametrizations(layer, optimizer=optimizer)
    optimizer.zero_grad()
    layer(torch.randn(2, 4)).square().sum().backward()
    refusal = refusal_of(optimizer.step)
    assert refusal is None or "'weight'" in str(refusal)


@pytest.mark.parametrize(
    "spec",
    [
        mp.Freeze(dim=0, index=[5, 6, 7, 8, 9]),
        mp.Mask(mp.masks.random(0.5, seed=0), layout="dense"),
        mp.Mask(mp.masks.random(0.3, seed=0), layout="compact"),
        mp.Freeze(mp.masks.random(0.7, seed=0), layout="compact"),
    ],
    ids=["freeze-slices", "mask-dense", "mask-compact", "freeze-compact"],
)
@pytest.mark.parametrize("with_optimizer", [False, True])
def test_bake_keeps_a_channels_last_weight_channels_last(spec, with_optimizer):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, 3).to(memory_format=torch.channels_last)
    weight = conv.weight
    mp.apply_mask(conv, {"weight": spec})
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.01)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    conv(x).square().mean().backward()
    optimizer.step()
    effective = conv.weight.detach().clone()
    mp.remove_parametrizations(conv, optimizer=optimizer if with_optimizer else None)
    assert conv.weight is weight
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, effective)
    if with_optimizer:
        conv(x).square().mean().backward()
        optimizer.step()  # its state fits the baked tensor
