"""``GradualPruning``: the cubic schedule (= torch.ao's CubicSL formula) driving update_masks
from the training loop, to exactly round(s * n) zeros; structured, n:m and global rules, tied
weights, LSTMs, half precision; resuming from checkpoints; refusals before the model changes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    TiedEmbeddingLM,
    linear_weights,
    mlp,
    prune_run,
    pruning_inputs,
    pruning_loss,
    pruning_steps,
    same_snapshot_with_summary,
    snapshot_with_summary,
    train_steps,
    zeros_in_linears,
)
from torch import Tensor, nn
from torch.ao.pruning import CubicSL
from torch.nn.utils import prune

import maskparam as mp


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
    pruning.optimizer = optimizer  # its state follows the masks
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
    assert [type(m) for m in mp.remove_parametrizations(model, optimizer=optimizer)] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]


def test_gradual_pruning_stores_compact_from_the_start_when_the_final_density_pays():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=10, optimizer=None
    )
    assert "compact" in mp.summary(model).tensors[0].constraint
    dense = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    mp.GradualPruning(
        dense, {"*.weight": mp.masks.global_magnitude}, sparsity=0.3, end=10, optimizer=None
    )
    assert "compact" not in mp.summary(dense).tensors[0].constraint


@pytest.mark.parametrize("layout", ["dense", "auto"])  # auto: compact, resized by the load
def test_gradual_pruning_resumes_from_a_checkpoint_bit_identically(layout):
    rules = {"*.weight": mp.masks.global_magnitude}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def start(seed: int) -> tuple[nn.Module, mp.GradualPruning, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        pruning = mp.GradualPruning(model, rules, sparsity=0.8, end=20, every=5, layout=layout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        pruning.optimizer = optimizer  # its state follows the masks
        return model, pruning, optimizer

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
        mp.GradualPruning(model, {"weight": mp.masks.magnitude}, **kwargs, optimizer=None)
    assert type(model) is nn.Linear


def test_gradual_pruning_refuses_a_rule_that_is_not_a_function_of_the_sparsity():
    with pytest.raises(mp.MaskparamError, match="not a function of the sparsity"):
        mp.GradualPruning(nn.Linear(4, 4), {"weight": 0.5}, sparsity=0.5, end=10, optimizer=None)  # type: ignore[dict-item]


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
    pruning.optimizer = optimizer  # its state follows the masks
    x, y = torch.randint(0, 20, (5, 7)), torch.randint(0, 3, (7,))
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruning.step()
    assert mp.verify(model) == []
    out = model(x)
    mp.remove_parametrizations(model, optimizer=optimizer)
    assert type(model.lstm) is nn.LSTM
    assert torch.equal(model(x), out)
    weights = [p for n, p in model.named_parameters() if "weight" in n]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))


def test_gradual_pruning_refuses_tensors_with_another_constraint_instead_of_passing_over():
    model = mp.apply_mask(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), {"0.weight": mp.Triangular()}
    )
    with pytest.raises(mp.MaskparamError, match="has another constraint"):
        mp.GradualPruning(
            model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.5, end=10, optimizer=None
        )
    assert not mp.summary(model).tensors[1:]  # 1.weight untouched


def test_gradual_pruning_updates_a_stack_the_user_applied():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    stack = [mp.Triangular(), mp.Mask(mp.masks.global_magnitude(0.0))]
    mp.apply_mask(model, {"*.weight": stack})
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.8, end=4, optimizer=None
    )
    for _ in range(4):
        pruning.step()
    assert mp.verify(model) == []
    zeros = sum(int((layer.weight == 0).sum()) for layer in model)
    assert zeros == round(0.8 * 128)  # the triangle's zeros rank lowest: pruned first


# from the attack on the pruning toolkit
def test_gradual_pruning_reaches_exactly_the_target_and_stays_there_past_end():
    """Calling step() past `end` keeps exactly round(s * n) zero weights."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model,
        {"*.weight": mp.masks.global_magnitude},
        sparsity=0.9,
        end=10,
        every=5,
        optimizer=None,
    )
    prune_run(model, pruning, 10)
    assert zeros_in_linears(model) == round(0.9 * 192)
    prune_run(model, pruning, 7)
    assert zeros_in_linears(model) == round(0.9 * 192)
    assert pruning.sparsity == 0.9


# from the attack on the pruning toolkit
def test_gradual_pruning_with_begin_after_zero():
    """begin=4, end=10, every=3: masks change only at 4, 7, 10 and reach the target."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.6, begin=4, end=10, every=3
    )
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    pruning.optimizer = optimizer  # its state follows the masks
    for _ in range(12):
        optimizer.zero_grad()
        pruning_loss(model).backward()
        optimizer.step()
        seen.append(pruning.step())
    changes = [i + 1 for i in range(1, 12) if seen[i] != seen[i - 1]]
    assert set(changes) <= {7, 10}
    assert zeros_in_linears(model) == round(0.6 * 192)


# from the attack on the pruning toolkit
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradual_pruning_in_half_precision_reaches_exactly_the_target(dtype):
    """An fp16/bf16 model pruned gradually has exactly round(s * n) zero weights at the end."""
    model = mlp(8, 16, 4, dtype=dtype, seed=0)
    pruning = mp.GradualPruning(
        model,
        {"*.weight": mp.masks.global_magnitude},
        sparsity=0.75,
        end=6,
        every=2,
        optimizer=None,
    )
    prune_run(model, pruning, 8, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    assert zeros_in_linears(model) == round(0.75 * 192)
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
def test_gradual_pruning_with_structured_rule():
    """lambda s: structured(s, dim=0): whole rows pruned, round(s * rows) of each layer at end."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model,
        {"*.weight": lambda s: mp.masks.structured(s, dim=0)},
        sparsity=0.5,
        end=4,
        every=2,
        optimizer=None,
    )
    prune_run(model, pruning, 5)
    assert mp.verify(model) == []
    for layer, rows in ((model[0], 16), (model[2], 4)):
        dead = (layer.weight == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * rows)


# from the attack on the pruning toolkit
def test_gradual_pruning_with_n_m_rule_is_2_4_throughout():
    """lambda s: n_m(2, 4): every group of 4 keeps at most 2 throughout training."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model,
        {"*.weight": lambda s: mp.masks.n_m(2, 4)},
        sparsity=0.5,
        end=4,
        every=2,
        optimizer=None,
    )
    prune_run(model, pruning, 5)
    for layer in (model[0], model[2]):
        groups = (layer.weight != 0).reshape(-1, 4).sum(dim=1)
        assert int(groups.max()) <= 2
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
def test_gradual_pruning_of_a_tied_model_reaches_the_target():
    """GradualPruning over a model with tied embedding/head prunes to exactly the target."""
    model = TiedEmbeddingLM()
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.5, end=4, every=2
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning.optimizer = optimizer  # its state follows the masks
    ids = torch.arange(10).reshape(2, 5)
    for _ in range(6):
        optimizer.zero_grad()
        model(ids).square().mean().backward()
        optimizer.step()
        pruning.step()
    zeros = int((model.emb.weight == 0).sum()) + int((model.mid.weight == 0).sum())
    assert zeros == round(0.5 * 96)
    assert torch.equal(model.head.weight, model.emb.weight)
    assert mp.verify(model) == []


class _RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


# from the attack on the pruning toolkit
@pytest.mark.parametrize("selector", ["*", "*weight*"])
def test_gradual_pruning_with_a_wildcard_on_a_model_with_an_lstm(selector):
    """A wildcard over a model with an LSTM: the LSTM's weights really pruned in what the LSTM
    computes (they were refused, with the reason, before RNN support)."""
    model = _RNNNet()
    pruning = mp.GradualPruning(
        model, {selector: mp.masks.global_magnitude}, sparsity=0.5, end=2, every=1, optimizer=None
    )
    pruning.step()
    pruning.step()
    # Accepted: what the LSTM computes must use the pruned weights.
    x = torch.randn(2, 3, 4)
    baked = copy.deepcopy(model)
    mp.remove_parametrizations(baked)
    with torch.no_grad():
        assert torch.equal(model(x), baked(x))
    total = sum(t.total for t in mp.summary(model).tensors)
    free = sum(t.free for t in mp.summary(model).tensors)
    assert free == total - round(0.5 * total)


# from the attack on the pruning toolkit
def test_gradual_pruning_resumed_after_end_from_a_loaded_checkpoint_stays_pruned():
    """Load a pruned checkpoint into a fresh model, build GradualPruning, load its state: the
    model stays at the final sparsity (the checkpoint's masks are not thrown away)."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=4, every=2, optimizer=None
    )
    prune_run(model, pruning, 6)
    state, progress = copy.deepcopy(model.state_dict()), pruning.state_dict()
    with torch.no_grad():
        out = model(pruning_inputs())
    # Resume: the user builds the model, applies the same GradualPruning, loads both.
    fresh = mlp(8, 16, 4, seed=1)
    resumed = mp.GradualPruning(
        fresh, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=4, every=2, optimizer=None
    )
    fresh.load_state_dict(state)
    resumed.load_state_dict(progress)
    with torch.no_grad():
        assert torch.equal(fresh(pruning_inputs()), out)
    prune_run(fresh, resumed, 2)
    assert zeros_in_linears(fresh) == round(0.9 * 192)


# from the attack on the pruning toolkit
def test_gradual_pruning_constructed_on_a_model_already_loaded_keeps_its_masks():
    """Order swapped: apply+load the pruned checkpoint, then build GradualPruning and load its
    progress: the masks must not be reset to initial_sparsity (silently dense again)."""
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=4, every=2, optimizer=None
    )
    prune_run(model, pruning, 6)
    assert zeros_in_linears(model) == round(0.9 * 192)
    progress = pruning.state_dict()
    # The resumed run builds its GradualPruning on the model that already holds the masks.
    resumed = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=4, every=2, optimizer=None
    )
    resumed.load_state_dict(progress)
    prune_run(model, resumed, 2)
    assert zeros_in_linears(model) == round(0.9 * 192)


# from the attack on the pruning toolkit
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_gradual_pruning_resumed_mid_schedule_with_its_optimizer(layout):
    """Stop at step 5 of 10, build a fresh model + GradualPruning + optimizer, load the three
    checkpoints, finish: bit-identical to the uninterrupted run."""

    def build(seed: int):
        model = mlp(8, 16, 4, seed=seed)
        pruning = mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude},
            sparsity=0.9,
            end=8,
            every=2,
            layout=layout,
            optimizer=None,
        )
        return model, pruning, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, pruning, optimizer = build(0)
    prune_run(model, pruning, 5, optimizer)
    saved = copy.deepcopy((model.state_dict(), pruning.state_dict(), optimizer.state_dict()))
    prune_run(model, pruning, 6, optimizer)
    fresh, fresh_pruning, fresh_opt = build(1)
    fresh.load_state_dict(saved[0])
    fresh_pruning.load_state_dict(saved[1])
    fresh_opt.load_state_dict(saved[2])
    prune_run(fresh, fresh_pruning, 6, fresh_opt)
    for a, b in zip(linear_weights(model), linear_weights(fresh), strict=True):
        assert torch.equal(a, b)
    assert zeros_in_linears(fresh) == round(0.9 * 192)


# from the attack on the pruning toolkit
def test_gradual_pruning_refuses_every_that_does_not_divide():
    """every=3 with end=10 is refused with a MaskparamError before the model changes."""
    model = mlp(8, 16, 4, seed=0)
    before = snapshot_with_summary(model)
    with pytest.raises(mp.MaskparamError, match="every"):
        mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude},
            sparsity=0.5,
            end=10,
            every=3,
            optimizer=None,
        )
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))


# from the attack on the pruning toolkit
def test_gradual_pruning_over_tensors_partly_constrained_prunes_all_or_refuses():
    """A rule over every weight where one layer is already Triangular: every selected weight is
    pruned to the target, or a clear MaskparamError with the model unchanged (never silently
    leaving a layer dense)."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"0.weight": mp.Triangular()})
    before = snapshot_with_summary(model)
    try:
        pruning = mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude},
            sparsity=0.5,
            end=2,
            every=1,
            optimizer=None,
        )
    except mp.MaskparamError:
        assert same_snapshot_with_summary(before, snapshot_with_summary(model))
        return
    prune_run(model, pruning, 3)
    assert int((model[2].weight == 0).sum()) > 0


# from the attack on the pruning toolkit
def test_gradual_pruning_with_one_layer_already_masked_prunes_the_others_too():
    """One layer masked by the user, then GradualPruning over all weights: the unmasked layer is
    pruned too, or the call is refused; never silently left dense."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.5))})
    before = snapshot_with_summary(model)
    try:
        pruning = mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude},
            sparsity=0.8,
            end=2,
            every=1,
            optimizer=None,
        )
    except mp.MaskparamError:
        assert same_snapshot_with_summary(before, snapshot_with_summary(model))
        return
    prune_run(model, pruning, 3)
    assert zeros_in_linears(model) == round(0.8 * 192)


# from the attack on the pruning toolkit
def test_gradual_pruning_error_over_a_triangular_tensor_names_the_tensor():
    """GradualPruning over weights one of which is Triangular: the error names '0.weight' and
    says why (it is constrained already), not 'apply_mask the tensors first'."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"0.weight": mp.Triangular()})
    with pytest.raises(mp.MaskparamError) as refusal:
        mp.GradualPruning(
            model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.5, end=2, optimizer=None
        )
    assert "0.weight" in str(refusal.value)


def test_a_refused_scheduled_update_counts_no_step_and_is_retried():
    model = mlp(8, 16, 4, seed=0)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.8, end=4, every=2
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 1)
    pruning.step()  # step 1: nothing scheduled
    pruning_steps(model, optimizer, 1)
    with pytest.raises(mp.MaskparamError, match="no optimizer was passed"):
        pruning.step()  # step 2 changes the compact layout: the optimizer is needed
    assert pruning.steps == 1
    pruning.optimizer = optimizer
    assert pruning.step() == pruning.sparsity_at(2)  # retried, on schedule
    assert pruning.steps == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"begin": 10, "end": 0, "every": 1}, r"begin=10, end=0, every=1"),
        ({"begin": 0, "end": 10, "every": 0}, r"every=0"),
        ({"begin": 3, "end": 3, "every": 1}, r"begin=3, end=3"),
        ({"begin": 0, "end": 10, "every": 3}, r"divides end - begin"),
        ({"begin": 0, "end": 10, "every": 1, "initial": 0.95}, r"initial=0.95 exceeds final=0.9"),
        ({"begin": 0, "end": 10, "every": 1, "final": 1.5}, r"final must be a number"),
        ({"begin": 0.5, "end": 10, "every": 1}, r"begin must be an int"),
    ],
)
def test_cubic_sparsity_refuses_a_schedule_that_does_not_run_forward(kwargs, message):
    schedule = {"initial": 0.0, "final": 0.9, **kwargs}
    with pytest.raises(mp.MaskparamError, match=message):
        mp.cubic_sparsity(5, **schedule)


def test_cubic_sparsity_refuses_a_step_that_is_not_an_int():
    with pytest.raises(mp.MaskparamError, match=r"step must be an int"):
        mp.cubic_sparsity(2.5, initial=0.0, final=0.9, begin=0, end=10, every=1)  # type: ignore[arg-type]


def _schedule() -> mp.GradualPruning:
    model = nn.Sequential(nn.Linear(4, 4))
    pruning = mp.GradualPruning(
        model,
        {"*.weight": mp.masks.magnitude},
        sparsity=0.5,
        initial_sparsity=0.1,
        end=10,
        optimizer=None,
    )
    pruning.load_state_dict({"steps": 3, "sparsity": pruning.sparsity_at(3)})
    return pruning


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"steps": 5, "sparsity": 1.7}, r"'sparsity' must be a number between .*got 1.7"),
        ({"steps": 5, "sparsity": float("nan")}, r"'sparsity' must be a number .*got nan"),
        ({"steps": 5, "sparsity": 0.05}, r"initial_sparsity=0.1 and sparsity=0.5; got 0.05"),
        ({"steps": 5, "sparsity": True}, r"got True"),
        ({"steps": 5, "sparsity": "0.3"}, r"got '0.3'"),
        ({"steps": -1, "sparsity": 0.3}, r"'steps' must be an int >= 0; got -1"),
        ({"steps": 2.0, "sparsity": 0.3}, r"'steps' must be an int >= 0; got 2.0"),
        ({"steps": "a", "sparsity": 0.3}, r"'steps' must be an int >= 0; got 'a'"),
        ({"steps": 5}, r"exactly 'steps' and 'sparsity'.\n  missing: \['sparsity'\]"),
        ({}, r"missing: \['sparsity', 'steps'\]"),
        ({"steps": 5, "sparsity": 0.3, "every": 2}, r"unexpected: \[\"'every'\"\]"),
        ({"steps": 5, "sparsity": 0.3}, r"'sparsity'=0.3 is not this schedule's sparsity after 5"),
        (None, r"the state must be a dict; got a NoneType"),
        ([("steps", 5)], r"the state must be a dict; got a list"),
    ],
)
def test_gradual_pruning_load_state_dict_checks_the_whole_state_before_changing_anything(
    state, message
):
    pruning = _schedule()
    with pytest.raises(mp.MaskparamError, match=message):
        pruning.load_state_dict(state)
    assert pruning.state_dict() == {"steps": 3, "sparsity": pruning.sparsity_at(3)}


def test_gradual_pruning_refuses_a_generator_in_place_of_a_function_of_the_sparsity():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)maps to a mask .*not to a function of the sparsity"
        r".*lambda s: mp.masks.global_magnitude\(s\)",
    ):
        mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude(0.9)},  # type: ignore[dict-item]
            sparsity=0.9,
            end=10,
            optimizer=None,
        )
    assert type(model[0]) is nn.Linear


def test_gradual_pruning_names_the_rule_whose_function_fails():
    model = nn.Sequential(nn.Linear(4, 4))

    def rule(sparsity: float) -> Tensor:
        raise RuntimeError("no mask today")

    with pytest.raises(
        mp.MaskparamError,
        match=r"rule '\*.weight': calling it with the sparsity 0.0 raised Runtime",
    ):
        mp.GradualPruning(model, {"*.weight": rule}, sparsity=0.9, end=10, optimizer=None)
    with pytest.raises(mp.MaskparamError, match=r"returned a float for the sparsity 0.0"):
        mp.GradualPruning(model, {"*.weight": lambda s: s}, sparsity=0.9, end=10, optimizer=None)
    assert type(model[0]) is nn.Linear
