"""``GradualPruning`` keeps its step count in the model's state_dict
(``maskparam_pruning_steps``): a checkpoint of the model alone resumes the schedule,
``step(global_step)`` follows a trainer's counter, and a schedule that lost its progress is
refused rather than regrowing pruned weights."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import TiedEmbeddingLM, mlp, pruning_loss
from torch import nn

import maskparam as mp

RULES = {"*.weight": mp.masks.global_magnitude}


def _build(
    seed: int, layout: str = "auto"
) -> tuple[nn.Module, mp.GradualPruning, torch.optim.Optimizer]:
    model = mlp(8, 16, 4, seed=seed)
    pruning = mp.GradualPruning(model, RULES, sparsity=0.9, end=20, every=2, layout=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruning.optimizer = optimizer
    return model, pruning, optimizer


def _train(model, pruning, optimizer, steps: int, *, follow: bool = False) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        pruning_loss(model).backward()
        optimizer.step()
        if follow:  # a trainer's counter: optimizer steps so far
            pruning.step(optimizer.state[next(iter(optimizer.state))]["step"].int().item())
        else:
            pruning.step()


@pytest.mark.parametrize("layout", ["dense", "auto"])
@pytest.mark.parametrize("follow", [False, True], ids=["step()", "step(global_step)"])
def test_a_model_checkpoint_alone_resumes_the_schedule_bit_identically(layout, follow):
    model, pruning, optimizer = _build(0, layout)
    _train(model, pruning, optimizer, 9, follow=follow)  # stopped mid-schedule (0.9 at step 20)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    assert saved[0]["maskparam_pruning_steps"].item() == 9
    _train(model, pruning, optimizer, 21, follow=follow)

    fresh, resumed, fresh_optimizer = _build(1, layout)  # another init, the same rules
    fresh.load_state_dict(saved[0])  # torch's own loads, nothing of the schedule's
    fresh_optimizer.load_state_dict(saved[1])
    assert resumed.steps == 9
    assert resumed.sparsity == pruning.sparsity_at(8)
    _train(fresh, resumed, fresh_optimizer, 21, follow=follow)

    assert resumed.steps == pruning.steps == 30
    assert resumed.sparsity == 0.9
    assert mp.sparsity(fresh) == mp.sparsity(model) == round(0.9 * 192) / 192
    for name, kept in mp.kept_masks(model).items():
        assert torch.equal(mp.kept_entries(fresh, name), kept)
    ours, theirs = model.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_step_with_the_trainers_counter_jumps_repeats_and_refuses_going_back():
    model, pruning, _ = _build(0, "dense")
    assert pruning.step(5) == pruning.sparsity_at(4)  # the last scheduled step passed: 4
    assert pruning.step(5) == pruning.sparsity_at(4)
    assert pruning.steps == 5
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"global_step=3 is behind the 5 steps"):
        pruning.step(3)
    assert pruning.steps == 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert pruning.step(40) == 0.9
    assert mp.sparsity(model) == round(0.9 * 192) / 192
    with pytest.raises(mp.MaskparamError, match=r"global_step must be an int"):
        pruning.step(2.0)  # type: ignore[arg-type]


def test_a_schedule_that_lost_its_progress_is_refused_instead_of_regrowing_weights():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 12)  # 0.9 * (1 - 0.4**3) = 84.2% pruned
    saved = model.state_dict()
    del saved["maskparam_pruning_steps"]  # a checkpoint written without it
    fresh, resumed, fresh_optimizer = _build(1, "dense")
    missing = fresh.load_state_dict(saved, strict=False).missing_keys  # as HF's Trainer loads
    assert missing == ["maskparam_pruning_steps"]
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)the masks keep 30 of 192 entries \(84.38% pruned\), and this step's sparsity "
        r"would keep 145 \(24.48% pruned\).*pruned entries would grow back",
    ):
        _train(fresh, resumed, fresh_optimizer, 2)
    kept_now = {k: v for k, v in fresh.state_dict().items() if k.endswith(".mask")}
    assert all(torch.equal(v, before[k]) for k, v in kept_now.items())  # no mask changed
    assert resumed.steps == 1  # step 1 schedules nothing; step 2 was refused and not counted


def test_the_count_is_a_buffer_of_the_model_and_baking_removes_it():
    model, pruning, optimizer = _build(0)
    assert isinstance(model, nn.Sequential)  # a buffer, not a submodule: Sequential still runs
    _train(model, pruning, optimizer, 3)
    assert dict(model.named_buffers())["maskparam_pruning_steps"].dtype == torch.int64
    twin = copy.deepcopy(model)  # the copy has its own count
    mp.remove_parametrizations(model)
    assert "maskparam_pruning_steps" not in model.state_dict()
    assert "maskparam" not in str(pickle.dumps(model))  # plain torch again
    torch.save(model, io.BytesIO())
    with pytest.raises(mp.MaskparamError, match=r"no longer holds its 'maskparam_pruning_steps'"):
        pruning.step()
    assert twin.state_dict()["maskparam_pruning_steps"].item() == 3


def test_a_schedule_built_again_on_its_model_goes_on_from_the_models_count():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 7)
    again = mp.GradualPruning(model, RULES, sparsity=0.9, end=20, every=2, optimizer=optimizer)
    assert again.steps == 7
    assert again.sparsity == pruning.sparsity
    _train(model, again, optimizer, 1)
    assert pruning.steps == again.steps == 8  # one count, the model's


def test_the_count_of_a_schedule_cannot_be_taken_by_a_schedule_of_other_tensors():
    model = mlp(8, 16, 4, seed=0)
    mp.GradualPruning(model, {"0.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
    with pytest.raises(mp.MaskparamError, match=r"(?s)'2.weight'.*holds a schedule's step count"):
        mp.GradualPruning(model, {"2.weight": mp.masks.magnitude}, sparsity=0.5, end=4)


def test_a_tied_model_pruned_on_a_schedule_saves_the_tie_once_and_resumes():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = TiedEmbeddingLM()
    pruning = mp.GradualPruning(model, {"emb.weight": mp.masks.magnitude}, sparsity=0.5, end=2)
    pruning.step()
    state = model.state_dict()
    assert not any(k.startswith("head.") for k in state)  # the tie is saved under emb only
    buffer = io.BytesIO(safetensors_torch.save(state))
    torch.manual_seed(1)
    fresh = TiedEmbeddingLM()
    again = mp.GradualPruning(fresh, {"emb.weight": mp.masks.magnitude}, sparsity=0.5, end=2)
    assert str(fresh.load_state_dict(safetensors_torch.load(buffer.getvalue()))) == (
        "<All keys matched successfully>"
    )
    assert again.steps == 1
    ids = torch.arange(10)
    assert torch.equal(fresh(ids), model(ids))
    assert torch.equal(fresh.head.weight, fresh.emb.weight)


def test_a_trainable_state_dict_carries_the_count_too():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 5)
    state = mp.trainable_state_dict(model)
    assert state["maskparam_pruning_steps"].item() == 5
    base = mlp(8, 16, 4, seed=0)  # the same base weights, as the trainable state needs
    resumed = mp.GradualPruning(base, RULES, sparsity=0.9, end=20, every=2, optimizer=None)
    mp.load_trainable_state_dict(base, state, optimizer=None)
    assert resumed.steps == 5
    assert resumed.sparsity == pruning.sparsity
    for name, kept in mp.kept_masks(model).items():
        assert torch.equal(mp.kept_entries(base, name), kept)


def test_pretrained_plain_weights_load_into_a_pruned_model_and_keep_its_count():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 4)
    pretrained = mlp(8, 16, 4, seed=5).state_dict()  # plain: no masks, no count
    mp.load_state_dict(model, pretrained)  # through the masks, which stay
    assert pruning.steps == 4
    with torch.no_grad():
        assert torch.equal(
            model[0].weight, pretrained["0.weight"] * mp.kept_entries(model, "0.weight")
        )
