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


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict (HF's Trainer)"])
def test_a_checkpoint_of_the_masks_without_the_count_is_refused_before_loading(strict):
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 12)
    saved = model.state_dict()
    del saved["maskparam_pruning_steps"]  # a checkpoint written without the schedule
    fresh, resumed, _ = _build(1, "dense")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)holds the masks of this model's GradualPruning .* but not its step count"
        r".*nothing was loaded.*checkpoint\['maskparam_pruning_steps'\] = torch.tensor\(steps\)",
    ):
        fresh.load_state_dict(saved, strict=strict)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    saved["maskparam_pruning_steps"] = torch.tensor(12)  # the fix: the count it was saved at
    fresh.load_state_dict(saved, strict=strict)
    assert resumed.steps == 12


def test_masks_tightened_outside_the_schedule_are_not_loosened_by_its_next_step():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 4)  # 0.9 * (1 - 0.8**3) = 44% pruned
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)}, optimizer=optimizer)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)the masks keep 38 of 192 entries \(80.21% pruned\), and this step's sparsity "
        r"would keep 78 \(59.38% pruned\).*tightened outside the schedule",
    ):
        _train(model, pruning, optimizer, 2)
    assert pruning.steps == 5  # step 5 schedules nothing; step 6 was refused and not counted
    masks = {k: v for k, v in model.state_dict().items() if k.endswith(".mask")}
    assert all(torch.equal(v, before[k]) for k, v in masks.items())
    assert pruning.step(14) == pruning.sparsity_at(14)  # the fix: the step of those masks


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


def test_a_second_schedule_on_a_model_is_refused_before_anything_changes():
    model = mlp(8, 16, 4, seed=0)
    first = mp.GradualPruning(
        model, {"0.weight": mp.masks.magnitude}, sparsity=0.5, end=4, optimizer=None
    )
    message = r"is a GradualPruning's that prunes '0.weight'; this one selects '2.weight'"
    with pytest.raises(mp.MaskparamError, match=message):  # an unmasked tensor
        mp.GradualPruning(model, {"2.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
    assert not mp.summary(model).tensors[1:]  # 2.weight was not masked
    mp.apply_mask(model, {"2.weight": mp.Mask(mp.masks.magnitude(0.1))})
    with pytest.raises(mp.MaskparamError, match=message):  # a tensor masked by hand
        mp.GradualPruning(model, {"2.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
    first.step()
    assert first.steps == 1


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


def test_the_count_is_read_again_whenever_the_buffer_is_replaced_or_written():
    model, pruning, _ = _build(0, "dense")
    for steps in (10, 20, 30):  # each load replaces the buffer (assign) or writes it in place
        state = {**model.state_dict(), "maskparam_pruning_steps": torch.tensor(steps)}
        model.load_state_dict(state, assign=steps == 20)
        assert pruning.steps == steps
    model.maskparam_pruning_steps.data = torch.tensor(11)  # no version bump: another storage
    assert pruning.steps == 11


def test_a_count_cast_by_module_type_is_refused_and_can_be_given_back():
    model, pruning, _ = _build(0, "dense")
    pruning.step(299)
    model.type(torch.bfloat16)  # casts integer buffers too: 299 becomes 300
    with pytest.raises(mp.MaskparamError, match=r"was cast to torch.bfloat16"):
        pruning.step()
    pruning.load_state_dict({"steps": 299, "sparsity": 0.9})
    assert model.maskparam_pruning_steps.dtype == torch.int64
    assert pruning.steps == 299


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # inside dynamo
def test_odd_models_and_counters_are_refused_before_anything_changes():
    with pytest.raises(mp.MaskparamError, match=r"torch.compile's wrapper"):
        mp.GradualPruning(torch.compile(mlp(8, 16, 4, seed=0)), RULES, sparsity=0.9, end=20)
    model, pruning, _ = _build(0, "dense")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"global_step=9223372036854775808: a count"):
        pruning.step(2**63)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_schedule_on_a_submodule_and_one_on_its_model_are_refused_either_way():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = mlp(8, 16, 8, seed=0)
            self.out = nn.Linear(8, 4)

    for outer_first in (True, False):
        net = Net()
        if outer_first:
            mp.GradualPruning(net, {"enc.*.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
            with pytest.raises(mp.MaskparamError, match=r"'0.weight' is pruned already by"):
                mp.GradualPruning(net.enc, {"*.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
        else:
            mp.GradualPruning(net.enc, {"*.weight": mp.masks.magnitude}, sparsity=0.5, end=4)
            with pytest.raises(mp.MaskparamError, match=r"'enc.0.weight' is pruned already by"):
                mp.GradualPruning(net, {"*.weight": mp.masks.magnitude}, sparsity=0.5, end=4)


def test_a_schedule_whose_tensor_was_baked_is_refused_at_its_next_update():
    model, pruning, optimizer = _build(0, "dense")
    _train(model, pruning, optimizer, 3)
    mp.remove_parametrizations(model[2])
    with pytest.raises(mp.MaskparamError, match=r"'2.weight': the schedule's rules select it"):
        _train(model, pruning, optimizer, 2)


def test_a_pretrained_checkpoint_with_torchs_own_parametrizations_loads_into_a_pruned_model():
    torch.manual_seed(0)
    base = mlp(8, 16, 4, seed=0)
    torch.nn.utils.parametrizations.weight_norm(base[0])  # as wav2vec2's positional conv
    pretrained = copy.deepcopy(base.state_dict())
    mp.GradualPruning(base, {"2.weight": mp.masks.magnitude}, sparsity=0.5, end=4, optimizer=None)
    mp.load_state_dict(base, pretrained)  # plain for maskparam: no step count needed
    assert torch.equal(
        base[0].parametrizations.weight.original0, pretrained["0.parametrizations.weight.original0"]
    )
