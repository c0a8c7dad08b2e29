"""mp.masks.channels: each layer's weakest channel groups masked in every tensor they touch, kept
exact through training and checkpoints like every other mask."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import maskparam as mp


class _Block(nn.Module):
    """conv -> BN -> relu -> conv -> BN, a residual stream, pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _model(seed: int = 0) -> _Block:
    torch.manual_seed(seed)
    return _Block()


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _removed(model: nn.Module) -> dict[str, list[int]]:
    """Per family's first tensor: which of its groups the masks remove (all entries masked)."""
    kept = mp.kept_masks(model)
    groups = mp.masks.channel_groups(model, X)
    found: dict[str, list[int]] = {}
    for family in groups.families():
        states = []
        for group in family:
            masked = [
                not bool(kept[name].expand_as(mp.kept_masks(model)[name]).index_select(
                    dim, torch.tensor(indices)).any())
                for name, dim, indices in group.slices
                if name in kept
            ]  # fmt: skip
            assert all(masked) or not any(masked), "a group masked in part"
            states.append(bool(masked) and all(masked))
        found[family[0].slices[0][0] + f"[{family[0].slices[0][1]}]"] = [
            i for i, s in enumerate(states) if s
        ]
    return found


def test_each_layer_loses_the_fraction_of_its_weakest_groups_in_every_tensor():
    model = _model()
    with torch.no_grad():  # known norms: channel k of conv1's family is k times stronger
        for k in range(6):
            model.conv1.weight[k] = 0.1 * (k + 1)
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=X))})
    removed = _removed(model)
    assert removed["conv1.weight[0]"] == [0, 1, 2]
    assert len(removed["stem.weight[0]"]) == 4  # the residual stream: 4 of its 8 channels
    assert removed["stem.weight[1]"] == []
    assert removed["fc.weight[0]"] == []  # input, classes
    assert mp.verify(model) == []


def test_the_ranking_sums_each_tensor_norm_of_the_group():
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.5]]))
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, 0.1]]))
    x = torch.randn(4, 2)
    # L2: 3 + 0 = 3, sqrt(2) + 1 = 2.41, 2.5 + 0.1 = 2.6; L1: 3, 3, 2.6; inf: 3, 1, 2.5.
    for norm, expected in [(2, 1), (1, 2), (float("inf"), 1)]:
        found = mp.masks.ChannelMask(1 / 3, x, norm).build_in_model(
            model, [("0.weight", model[0].weight), ("2.weight", model[2].weight)], None
        )
        assert found[0].all(dim=1).tolist().index(False) == expected, norm
        assert not found[1][0, expected]


def test_every_layer_keeps_a_channel():
    model = _model()
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(1.0, example_inputs=X))})
    removed = _removed(model)
    assert len(removed["conv1.weight[0]"]) == 5
    assert len(removed["stem.weight[0]"]) == 7


def test_a_group_that_reaches_a_tensor_outside_the_rule_is_left_whole():
    model = _model()
    chosen = {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "stem.weight"}
    mp.apply_mask(
        model,
        {lambda name, module, tensor: name in chosen: mp.Mask(
            mp.masks.channels(0.5, example_inputs=X))},
    )  # fmt: skip
    assert len(_removed(model)["conv1.weight[0]"]) == 3  # wholly in the rule: masked
    assert _removed(model)["stem.weight[0]"] == []  # the stream also reaches bn0, bn2, fc


def test_a_rule_that_holds_no_whole_group_is_refused_with_the_fix():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"(?s)no channel group lies wholly.*rule '\*'"):
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.channels(0.5, example_inputs=X))})
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values(), strict=True)
    )


def test_update_masks_keeps_pruned_groups_pruned_and_adds_the_weakest():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mp.apply_mask(
        model, {"*": mp.Mask(mp.masks.channels(0.25, example_inputs=X))}, optimizer=optimizer
    )
    before = _removed(model)
    model(X).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no regrowth warning: nothing regrows
        mp.update_masks(model, {"*": mp.masks.channels(0.5, example_inputs=X)}, optimizer=optimizer)
    after = _removed(model)
    for family, groups in before.items():
        assert set(groups) <= set(after[family])
    assert len(after["conv1.weight[0]"]) == 3
    assert len(after["stem.weight[0]"]) == 4
    assert mp.verify(model) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop"],
)
def test_masked_channels_stay_exactly_zero_through_gradual_pruning(make):
    model = _model()
    optimizer = make(model.parameters())
    schedule = mp.GradualPruning(
        model, {"*": lambda s: mp.masks.channels(s, example_inputs=X)}, sparsity=0.5, end=3,
        optimizer=optimizer,
    )  # fmt: skip
    for _ in range(5):
        optimizer.zero_grad()
        model(X).square().mean().backward()
        optimizer.step()
        schedule.step()
    assert mp.verify(model) == []
    removed = _removed(model)
    assert len(removed["conv1.weight[0]"]) == 3
    with torch.no_grad():
        assert bool((model.conv1.weight[removed["conv1.weight[0]"]] == 0).all())
        assert bool((model.conv2.weight[:, removed["conv1.weight[0]"]] == 0).all())


def test_channel_masks_come_back_from_a_checkpoint_into_another_init():
    model = _model(0)
    rules = {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=X))}
    mp.apply_mask(model, rules)
    state = copy.deepcopy(model.state_dict())
    fresh = _model(1)
    mp.apply_mask(fresh, rules)  # other weights: other channels chosen, until the load
    mp.load_state_dict(fresh, state)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(X), model(X))
    assert all(
        torch.equal(a, b)
        for a, b in zip(mp.kept_masks(fresh).values(), mp.kept_masks(model).values(), strict=True)
    )


def test_the_generator_refuses_what_it_cannot_do():
    with pytest.raises(mp.MaskparamError, match="without their model"):
        mp.masks.channels(0.5, example_inputs=X)(torch.randn(3, 3))
    with pytest.raises(mp.MaskparamError, match="sparsity"):
        mp.masks.channels(1.5, example_inputs=X)
    with pytest.raises(mp.MaskparamError, match="norm"):
        mp.masks.channels(0.5, example_inputs=X, norm=0)
    with pytest.raises(mp.MaskparamError, match="norm"):
        mp.masks.channels(0.5, example_inputs=X, norm="fro")  # type: ignore[arg-type]
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="example_inputs"):
        mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs="x"))})  # type: ignore[arg-type]
    assert not any(name.endswith("original") for name in model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values(), strict=True)
    )
