"""The pruning toolkit against torch's own: global magnitude (= prune.global_unstructured), the
cubic schedule (= torch.ao's CubicSL formula) driving update_masks, lottery-ticket rewinding."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import train_steps
from torch import Tensor, nn
from torch.ao.pruning import CubicSL
from torch.nn.utils import prune

import maskparam as mp

# --- the schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "final", "begin", "end", "every"),
    [(0.0, 0.9, 0, 100, 10), (0.2, 0.95, 30, 90, 3), (0.5, 0.5, 0, 4, 1)],
)
def test_cubic_sparsity_is_torchs_cubic_formula(initial, final, begin, end, every):
    n = (end - begin) // every
    for step in range(end + 20):
        expected = CubicSL.sparsity_compute_fn(initial, final, step, begin, every, n)
        got = mp.cubic_sparsity(
            step, initial=initial, final=final, begin=begin, end=end, every=every
        )
        assert got == pytest.approx(expected, abs=1e-12)


def test_gradual_pruning_reaches_each_scheduled_sparsity_with_one_line_in_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, begin=10, end=50, every=10
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    params = list(model.parameters())
    x = torch.randn(32, 16)
    seen = []
    for step in range(1, 61):
        train_steps(model, x, steps=1, optimizer=optimizer)
        sparsity = pruning.step()
        zeros = sum(int((w == 0).sum()) for w in (model[0].weight, model[2].weight))
        seen.append((step, sparsity, zeros))
        assert mp.verify(model) == []
    total = 16 * 32 + 32 * 4
    for step, sparsity, zeros in seen:
        scheduled = pruning.sparsity_at(max(10, min(50, step - step % 10)))
        assert sparsity == scheduled
        assert zeros == round(scheduled * total)  # exact zeros, even under weight decay
    assert seen[-1][1] == 0.9
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert [type(m) for m in mp.remove_parametrizations(model)] == [nn.Linear, nn.ReLU, nn.Linear]


def test_gradual_pruning_stores_compact_from_the_start_when_the_final_density_pays():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    mp.GradualPruning(model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=10)
    assert "compact" in mp.summary(model).tensors[0].constraint
    dense = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    mp.GradualPruning(dense, {"*.weight": mp.masks.global_magnitude}, sparsity=0.3, end=10)
    assert "compact" not in mp.summary(dense).tensors[0].constraint


@pytest.mark.parametrize("layout", ["dense", "auto"])  # auto: compact, resized by the load
def test_gradual_pruning_resumes_from_a_checkpoint_bit_identically(layout):
    rules = {"*.weight": mp.masks.global_magnitude}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def start(seed: int) -> tuple[nn.Module, mp.GradualPruning, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        pruning = mp.GradualPruning(model, rules, sparsity=0.8, end=20, every=5, layout=layout)
        return model, pruning, torch.optim.AdamW(model.parameters(), lr=0.01)

    def run(model: nn.Module, pruning: mp.GradualPruning, optimizer, steps: int) -> None:
        for _ in range(steps):
            train_steps(model, x, steps=1, optimizer=optimizer)
            pruning.step()

    model, pruning, optimizer = start(0)
    run(model, pruning, optimizer, 10)
    saved = copy.deepcopy((model.state_dict(), pruning.state_dict(), optimizer.state_dict()))
    resumed, again, optimizer_again = start(1)  # other weights, the initial (dense) masks
    resumed.load_state_dict(saved[0])
    again.load_state_dict(saved[1])
    optimizer_again.load_state_dict(saved[2])
    assert again.sparsity == pruning.sparsity == pytest.approx(0.7)
    run(model, pruning, optimizer, 12)
    run(resumed, again, optimizer_again, 12)
    for a, b in zip(model, resumed, strict=True):
        assert torch.equal(a.weight, b.weight)
    assert mp.verify(resumed) == []
    assert ("compact" in mp.summary(resumed).tensors[0].constraint) == (layout == "auto")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.5, "end": 10}, "sparsity"),
        ({"sparsity": 0.5, "end": 10, "initial_sparsity": 0.6}, "exceeds"),
        ({"sparsity": 0.5, "end": 10, "every": 3}, "divides"),
        ({"sparsity": 0.5, "end": 0}, "begin < end"),
        ({"sparsity": 0.5, "end": 10, "layout": "sparse"}, "unknown layout"),
    ],
)
def test_gradual_pruning_refuses_bad_schedules_before_touching_the_model(kwargs, message):
    model = nn.Linear(4, 4)
    with pytest.raises(mp.MaskparamError, match=message):
        mp.GradualPruning(model, {"weight": mp.masks.magnitude}, **kwargs)
    assert type(model) is nn.Linear


def test_gradual_pruning_refuses_a_rule_that_is_not_a_function_of_the_sparsity():
    with pytest.raises(mp.MaskparamError, match="not a function of the sparsity"):
        mp.GradualPruning(nn.Linear(4, 4), {"weight": 0.5}, sparsity=0.5, end=10)  # type: ignore[dict-item]


# --- rewinding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("early_kind", ["plain state_dict", "constrained copy"])
def test_lottery_ticket_rewind_resets_survivors_and_keeps_the_mask(layout, early_kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    if early_kind == "constrained copy":
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.2), layout=layout)})
    train_steps(model, x, steps=2)
    early: object = (
        copy.deepcopy(model)
        if early_kind == "constrained copy"
        else copy.deepcopy(model.state_dict())
    )
    reference = (
        mp.remove_parametrizations(copy.deepcopy(model))
        if early_kind != "plain state_dict"
        else None
    )
    early_weights = [
        (reference if reference is not None else model)[i].weight.detach().clone() for i in (0, 2)
    ]
    train_steps(model, x, steps=5)
    if early_kind == "plain state_dict":
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.8), layout=layout)})
    else:
        mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)})
    kept = [model[i].weight != 0 for i in (0, 2)]
    mp.rewind(model, early)  # type: ignore[arg-type]
    for i, k, w in zip((0, 2), kept, early_weights, strict=True):
        assert torch.equal(model[i].weight[k], w[k])  # survivors rewound, bit for bit
        assert bool((model[i].weight[~k] == 0).all())  # the mask holds
    assert mp.verify(model) == []
    train_steps(model, x, steps=2)
    assert mp.verify(model) == []


def test_rewind_refuses_what_it_cannot_rewind_and_changes_nothing():
    model = mp.apply_mask(nn.Linear(4, 4), {"weight": mp.Subspace(3)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="Subspace"):
        mp.rewind(model, {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)})
    with pytest.raises(mp.MaskparamError, match="not in `to`"):
        mp.rewind(nn.Linear(4, 4), {"weight": torch.zeros(4, 4)})
    with pytest.raises(mp.MaskparamError, match="shape"):
        mp.rewind(nn.Linear(4, 4), {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.lstm(self.emb(x))[0][-1])


def test_global_rules_prune_a_model_with_an_lstm_like_torch_and_bake_it_plain():
    torch.manual_seed(0)
    model = _Tagger()
    reference = copy.deepcopy(model)
    names = [n for n, _ in reference.named_parameters() if "weight" in n]
    slots = [(reference.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in names]
    prune.global_unstructured(slots, pruning_method=prune.L1Unstructured, amount=0.7)
    ours = mp.apply_mask(
        copy.deepcopy(model), {"*weight*": mp.Mask(mp.masks.global_magnitude(0.7))}
    )
    for (module, local), name in zip(slots, names, strict=True):
        mine = ours.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(getattr(mine, local), getattr(module, local)), name

    pruning = mp.GradualPruning(
        model, {"*weight*": mp.masks.global_magnitude}, sparsity=0.9, end=30, every=10
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randint(0, 20, (5, 7)), torch.randint(0, 3, (7,))
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruning.step()
    assert mp.verify(model) == []
    out = model(x)
    mp.remove_parametrizations(model)
    assert type(model.lstm) is nn.LSTM
    assert torch.equal(model(x), out)
    weights = [p for n, p in model.named_parameters() if "weight" in n]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))


def test_gradual_pruning_refuses_tensors_with_another_constraint_instead_of_passing_over():
    model = mp.apply_mask(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), {"0.weight": mp.Triangular()}
    )
    with pytest.raises(mp.MaskparamError, match="has another constraint"):
        mp.GradualPruning(model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.5, end=10)
    assert not mp.summary(model).tensors[1:]  # 1.weight untouched


def test_gradual_pruning_updates_a_stack_the_user_applied():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    stack = [mp.Triangular(), mp.Mask(mp.masks.global_magnitude(0.0))]
    mp.apply_mask(model, {"*.weight": stack})
    pruning = mp.GradualPruning(model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.8, end=4)
    for _ in range(4):
        pruning.step()
    assert mp.verify(model) == []
    zeros = sum(int((layer.weight == 0).sum()) for layer in model)
    assert zeros == round(0.8 * 128)  # the triangle's zeros rank lowest: pruned first


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_an_average_follows_updated_masks_when_given_them(layout):
    """The README's recipe: after update_masks(model), give the AveragedModel the same masks."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)})
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for update in range(3):
        train_steps(model, torch.randn(4, 8), steps=2, optimizer=optimizer)
        ema.update_parameters(model)
        mp.update_masks(model, {"*.weight": mp.masks.random(0.4, seed=10 + update)})
        names = [t.name for t in mp.summary(model).tensors]
        mp.update_masks(ema.module, {n: mp.kept_entries(model, n) for n in names})
        for n in names:
            assert torch.equal(mp.kept_entries(ema.module, n), mp.kept_entries(model, n))
        assert mp.verify(ema.module) == []
