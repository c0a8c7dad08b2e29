"""Optimizer state (core/optimizer.py): an optimizer created before apply_mask, or kept across
a bake, a new apply, a load, a deepcopy or a stale gradient, trains on exactly as with the dense
layout (its state laid out by position) when it is passed to those calls, or is refused with a
clear error; never a silent or cryptic failure, and no false refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import keep_31_of_64, loss_on_x_16x8, square_sum_steps, steps_on_x_16x8
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import _global_optimizer_pre_hooks
from torch_optimizers import PRUNING_LOOP_OPTIMIZERS

import maskparam as mp


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
    ids=["Adam", "AdamW", "SGD(momentum)"],
)
def test_an_optimizer_from_before_apply_keeps_going_in_either_layout(make_optimizer):
    # Prune after some training, with the optimizer the run already has: the compact layout
    # (the default at 50%) trains exactly as the dense one, and keeps going after baking, when
    # the pruned entries start again from zero state (the dense layout kept stale state there).
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    start = {k: v.clone() for k, v in nn.Linear(5, 4).state_dict().items()}
    kept = mp.masks.random(0.5, seed=1)(torch.empty(4, 5))
    effective, baked, state = {}, {}, {}
    for layout in ("dense", "compact"):
        layer = nn.Linear(5, 4)
        layer.load_state_dict(start)
        optimizer = make_optimizer(layer.parameters())
        for step in range(4):
            if step == 2:
                mp.apply_mask(layer, {"weight": mp.Mask(kept, layout=layout)}, optimizer=optimizer)
            optimizer.zero_grad()
            layer(x).square().sum().backward()
            optimizer.step()
        effective[layout] = layer.weight.detach().clone()
        mp.remove_parametrizations(layer, optimizer=optimizer)
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
        baked[layout] = layer.weight.detach().clone()
        state[layout] = optimizer.state[layer.weight]
    assert torch.equal(effective["compact"], effective["dense"])
    assert torch.equal(baked["compact"][kept], baked["dense"][kept])
    for key, value in state["compact"].items():
        if value.dim():
            assert value.shape == (4, 5), key
            assert torch.equal(state["compact"][key][kept], state["dense"][key][kept]), key


def test_subspace_refuses_an_optimizer_created_before_apply_not_silently_idle():
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    optimizer = torch.optim.Adam(model.parameters())
    rules = {"*": mp.Subspace(5, projection="fastfood", group="all")}
    # maskparam sees the optimizer where it is passed: there it refuses, nothing applied.
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)'0.weight': this Adam holds the tensor's original.*would train nothing",
    ):
        mp.apply_mask(model, rules, optimizer=optimizer)
    assert mp.summary(model).tensors == ()
    mp.apply_mask(model, rules)
    theta = model[0].parametrizations.weight[0].coordinates.theta
    optimizer.add_param_group({"params": [theta]})  # the fix the message names
    model(torch.randn(2, 12)).sum().backward()
    before = theta.detach().clone()
    optimizer.step()
    assert not torch.equal(theta, before)


@pytest.mark.parametrize("name", list(PRUNING_LOOP_OPTIMIZERS))
def test_iterative_pruning_with_one_optimizer_trains_as_the_dense_layout(name):
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    start = {k: v.clone() for k, v in nn.Linear(8, 8).state_dict().items()}
    first = mp.masks.random(0.5, seed=1)(torch.empty(8, 8))
    second = mp.masks.random(0.5, seed=2)(torch.empty(8, 8))  # as many entries, elsewhere
    trained = {}
    for layout in ("dense", "compact"):
        layer = nn.Linear(8, 8)
        layer.load_state_dict(start)
        optimizer = PRUNING_LOOP_OPTIMIZERS[name](layer.parameters())
        for mask in (first, second):
            mp.apply_mask(layer, {"weight": mp.Mask(mask, layout=layout)}, optimizer=optimizer)
            for _ in range(3):
                optimizer.zero_grad()
                layer(x).square().mean().backward()
                optimizer.step()
            mp.remove_parametrizations(layer, optimizer=optimizer)
            # Laid out in full at once: a checkpoint saved now loads into the plain model.
            shapes = {v.shape for v in optimizer.state[layer.weight].values() if v.dim()}
            assert shapes == {torch.Size([8, 8])}
        trained[layout] = layer.weight.detach().clone()
    assert torch.equal(trained["compact"], trained["dense"])


def _other_keep_same_count(keep: torch.Tensor) -> torch.Tensor:
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    other = torch.zeros(64, dtype=torch.bool)
    other[perm[: int(keep.sum())]] = True
    return other.view(8, 8)


def _reapply_after_bake(layout: str, second: torch.Tensor) -> torch.Tensor:
    """Iterative pruning: apply, train, bake, apply a new mask, keep the same optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64(), layout=layout)}, optimizer=opt)
    steps_on_x_16x8(model, opt, 3)
    mp.remove_parametrizations(model, optimizer=opt)
    mp.apply_mask(
        model, {"weight": mp.Mask(second, layout=layout)}, optimizer=opt
    )  # no step in between
    steps_on_x_16x8(model, opt, 2)
    return model.weight.detach().clone()


# from the attack on layout='auto' (SILENT: momentum scrambled)
def test_reapply_at_the_same_density_after_bake_trains_as_dense() -> None:
    """SILENT. Bake, then apply another mask with the same number of kept entries (regrow /
    re-select at constant sparsity) and keep the optimizer: the compact momentum of mask 1 is
    never relaid (the hook is lazy and the watch is replaced by mask 2's), so mask 1's i-th
    entry's momentum drives mask 2's i-th entry. Expected: as dense (state stays per position)."""
    second = _other_keep_same_count(keep_31_of_64())
    dense = _reapply_after_bake("dense", second)
    auto = _reapply_after_bake("auto", second)
    torch.testing.assert_close(auto, dense)


# from the attack on layout='auto' (SILENT: momentum followed the index order)
def test_loading_another_mask_of_the_same_density_keeps_momentum_by_position() -> None:
    """SILENT. model.load_state_dict of a checkpoint with another mask of the same density while
    the optimizer holds momentum: compact state follows the index order, not the position.
    Expected: as dense (momentum stays with its entry)."""

    def run(layout: str) -> torch.Tensor:
        torch.manual_seed(0)
        source = nn.Linear(8, 8, bias=False)
        mp.apply_mask(
            source, {"weight": mp.Mask(_other_keep_same_count(keep_31_of_64()), layout=layout)}
        )
        saved = copy.deepcopy(source.state_dict())
        model = nn.Linear(8, 8, bias=False)
        mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64(), layout=layout)})
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        steps_on_x_16x8(model, opt, 3)
        # the optimizer is passed: maskparam moves state only in optimizers it is given
        mp.load_state_dict(model, saved, optimizer=opt)
        steps_on_x_16x8(model, opt, 2)
        return model.weight.detach().clone()

    torch.testing.assert_close(run("auto"), run("dense"))


def _train_bake_train(layout: str, opt_cls: type, **kwargs: object) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    opt = opt_cls(model.parameters(), **kwargs)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64(), layout=layout)}, optimizer=opt)
    steps_on_x_16x8(model, opt, 3)
    mp.remove_parametrizations(model, optimizer=opt)
    steps_on_x_16x8(model, opt, 5)
    return model.weight.detach().clone()


# from the attack on layout='auto' (SILENT: previously masked entries stopped training)
def test_rprop_after_bake_trains_previously_masked_entries_as_dense() -> None:
    """SILENT. Rprop's per-entry `step_size` is relaid with ZEROS at the fixed entries after
    baking (clamped to step_size_min=1e-6), so the previously masked entries barely move
    (mean |move| ~7e-6 vs ~5e-2 dense). Expected: the dense state (step_size = lr there)."""
    keep = keep_31_of_64()
    dense = _train_bake_train("dense", torch.optim.Rprop, lr=0.01)
    auto = _train_bake_train("auto", torch.optim.Rprop, lr=0.01)
    torch.testing.assert_close(auto[~keep], dense[~keep])


# from the attack on layout='auto' (SILENT: the initial accumulator was lost)
def test_adagrad_after_bake_keeps_the_initial_accumulator_as_dense() -> None:
    """SILENT. Adagrad(initial_accumulator_value=1): after baking, `sum` is relaid with 0 at the
    fixed entries instead of the initial value dense keeps there, so those entries take ~lr
    sized first steps. Expected: as dense."""
    dense = _train_bake_train("dense", torch.optim.Adagrad, lr=0.1, initial_accumulator_value=1.0)
    auto = _train_bake_train("auto", torch.optim.Adagrad, lr=0.1, initial_accumulator_value=1.0)
    torch.testing.assert_close(auto, dense)


# from the attack on layout='auto' (CRYPTIC: a size mismatch inside torch)
def test_reapply_at_another_density_after_bake_trains_as_dense() -> None:
    """CRYPTIC. Iterative magnitude pruning (apply 50%, train, bake, apply 75% sparsity, same
    optimizer): RuntimeError 'The size of tensor a (31) must match the size of tensor b (..)'
    inside torch's SGD. Expected: works as dense."""
    torch.manual_seed(0)
    second = torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) < 0.25
    dense = _reapply_after_bake("dense", second)
    auto = _reapply_after_bake("auto", second)
    torch.testing.assert_close(auto, dense)


# from the attack on layout='auto' (CRYPTIC: a size mismatch inside torch)
def test_deepcopy_then_bake_keeps_the_optimizer_working() -> None:
    """CRYPTIC. A deepcopy (likewise torch.save/torch.load of the model) of a compact model is not
    watched: an optimizer on the copy breaks after baking the copy (torch size mismatch).
    Expected: keeps going, as with the original model and as dense."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64())})
    clone = copy.deepcopy(model)
    opt = torch.optim.Adam(clone.parameters(), lr=0.1)
    steps_on_x_16x8(clone, opt, 1)
    mp.remove_parametrizations(clone, optimizer=opt)
    steps_on_x_16x8(clone, opt, 1)


# from the attack on layout='auto' (CRYPTIC: a size mismatch inside torch)
def test_load_state_dict_with_assign_then_bake_keeps_the_optimizer_working() -> None:
    """CRYPTIC. load_state_dict(assign=True) puts a new (unwatched) Parameter in place; an
    optimizer created after the load breaks once the model is baked. Expected: as dense."""
    torch.manual_seed(0)
    source = nn.Linear(8, 8, bias=False)
    mp.apply_mask(source, {"weight": mp.Mask(keep_31_of_64())})
    saved = copy.deepcopy(source.state_dict())
    model = nn.Linear(8, 8, bias=False)
    mp.apply_mask(model, {"weight": mp.Mask(keep_31_of_64())})
    model.load_state_dict(saved, assign=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    steps_on_x_16x8(model, opt, 1)
    mp.remove_parametrizations(model, optimizer=opt)
    steps_on_x_16x8(model, opt, 1)


# from the attack on layout='auto' (CRYPTIC: a size mismatch inside torch)
def test_a_gradient_present_at_apply_with_zero_grad_set_to_none_false_keeps_training() -> None:
    """CRYPTIC. A loop using optimizer.zero_grad(set_to_none=False) (or accumulating gradients
    across apply_mask): the full-shape .grad survives on the shrunken Parameter and the next
    backward fails ('The size of tensor a (8) must match the size of tensor b (31)').
    Expected: apply_mask drops or reduces the stale gradient (dense just works)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps_on_x_16x8(model, opt, 1)
    mp.apply_mask(
        model, {"weight": mp.Mask(keep_31_of_64())}, optimizer=opt
    )  # pruning at an epoch boundary
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        loss_on_x_16x8(model).backward()
        opt.step()


# from the no-silent-failure attack on 0.1 (crashes: optimizer guard false positives)
def test_new_optimizer_after_baking_subspace_steps():
    model = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2)})
    old = torch.optim.Adam(model.parameters())
    square_sum_steps(model, old, torch.randn(2, 4), steps=1)
    mp.remove_parametrizations(model)
    new = torch.optim.Adam(model.parameters())  # `old` is still alive
    before = model.weight.detach().clone()
    square_sum_steps(model, new, torch.randn(2, 4), steps=1)
    assert not torch.equal(model.weight, before)


# from the no-silent-failure attack on 0.1 (crashes: optimizer guard false positives)
def test_theta_and_the_rest_in_separate_optimizers_step():
    model = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2)})
    theta = model.parametrizations.weight[0].coordinates.theta
    rest = [p for p in model.parameters() if p is not theta]  # the frozen θ₀ and the bias
    theta_optimizer = torch.optim.Adam([theta], lr=0.1)
    rest_optimizer = torch.optim.SGD(rest, lr=0.1)
    bias = model.bias.detach().clone()
    for optimizer in (theta_optimizer, rest_optimizer):
        square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    assert theta.detach().abs().sum() > 0
    assert not torch.equal(model.bias, bias)


class _Flatten(nn.Module):
    compact = False

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1)

    def right_inverse(self, x: Tensor) -> Tensor:
        return x


class _RefusedByTorch(mp.Spec):
    """Passes maskparam's checks; torch refuses it at registration, so apply_mask rolls back."""

    def build(self, name: str, tensor: Tensor) -> nn.Module:  # type: ignore[override]
        return _Flatten()


# from the no-silent-failure attack on 0.1 (crashes: optimizer guard false positives)
def test_optimizer_after_rolled_back_apply_steps():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="shape|not a maskparam Constraint") as failed:
        mp.apply_mask(model, {"0.weight": mp.Subspace(2), "1.weight": _RefusedByTorch()})
    assert failed.value is not None  # the exception (and its traceback) is still alive
    assert not parametrize.is_parametrized(model[0])  # rolled back
    optimizer = torch.optim.Adam(model.parameters())
    square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)


def test_adafactor_is_refused_on_a_compact_tensor_with_the_fix():
    layer = nn.Linear(4, 4, bias=False)
    optimizer = torch.optim.Adafactor(layer.parameters())
    with pytest.raises(mp.MaskparamError, match=r"(?s)'weight'.*layout='dense'"):
        mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.random(0.5))}, optimizer=optimizer)
    dense = mp.apply_mask(
        layer, {"weight": mp.Mask(mp.masks.random(0.5), layout="dense")}, optimizer=optimizer
    )
    dense(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert mp.verify(dense) == []


# Optimizer state has one owner, the optimizer: maskparam moves it only in the optimizers a
# call is given (optimizer=), and registers no hook.
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 2) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_no_optimizer_hook_is_ever_registered():
    model = mp.apply_mask(_mlp(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, optimizer)
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)
    mp.remove_parametrizations(model, optimizer=optimizer)
    _train(model, optimizer)
    assert len(_global_optimizer_pre_hooks) == 0
    assert len(optimizer._optimizer_step_pre_hooks) == 0


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_an_update_that_changes_what_is_stored_needs_the_optimizer(layout):
    model = mp.apply_mask(
        _mlp(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1), layout=layout)}
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer)
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(mp.MaskparamError, match=r"no optimizer was passed(?s:.*)optimizer=None"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)})  # regrows entries
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert str(optimizer.state_dict()) == str(state)
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)
    _train(model, optimizer)
    assert mp.verify(model) == []


def test_pruning_a_dense_layout_changes_nothing_stored_and_needs_no_optimizer():
    model = mp.apply_mask(
        _mlp(), {"*.weight": mp.Mask(mp.masks.global_magnitude(0.5), layout="dense")}
    )
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)})  # only prunes
    assert sum(int((model[i].weight == 0).sum()) for i in (0, 2)) == round(0.8 * 96)


def test_optimizer_none_says_that_none_holds_state():
    model = mp.apply_mask(_mlp(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=None)
    optimizer = torch.optim.Adam(model.parameters())  # created afterwards
    _train(model, optimizer)
    assert mp.verify(model) == []


def test_state_laid_out_for_other_entries_is_refused_before_anything_changes():
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, optimizer)  # full-shape state
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})  # not passed
    with pytest.raises(mp.MaskparamError, match=r"laid out for other entries"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=optimizer)


def test_apply_and_bake_lay_out_the_state_of_the_optimizers_they_are_given():
    dense = _mlp()
    compact = copy.deepcopy(dense)
    results, optimizers = [], []
    for model, layout in ((dense, "dense"), (compact, "compact")):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        _train(model, optimizer)  # state from before apply_mask
        rules = {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1), layout=layout)}
        mp.apply_mask(model, rules, optimizer=optimizer)
        _train(model, optimizer)
        results.append(torch.cat([model[i].weight.detach().reshape(-1) for i in (0, 2)]))
        optimizers.append(optimizer)
    torch.testing.assert_close(results[1], results[0])  # the kept entries trained alike
    kept = mp.kept_entries(compact, "0.weight")
    stored = compact[0].parametrizations.weight.original
    compact_state = dict(optimizers[1].state[stored])
    mp.remove_parametrizations(compact, optimizer=optimizers[1])
    for key in ("exp_avg", "exp_avg_sq"):
        full = optimizers[1].state[compact[0].weight][key]
        assert full.shape == (8, 8)
        assert torch.equal(full[kept], compact_state[key])
        assert torch.equal(full[~kept], torch.zeros(int((~kept).sum())))  # fresh
    _train(compact, optimizers[1])


def test_a_load_with_other_masks_moves_the_state_of_the_optimizer_it_is_given():
    def run(layout: str) -> torch.Tensor:
        model = mp.apply_mask(
            _mlp(), {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)}
        )
        other = mp.apply_mask(
            _mlp(), {"*.weight": mp.Mask(mp.masks.random(0.5, seed=2), layout=layout)}
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _train(model, optimizer)
        mp.load_state_dict(model, other.state_dict(), optimizer=optimizer)
        _train(model, optimizer)
        return torch.cat(
            [model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)]
        )

    torch.testing.assert_close(run("compact"), run("dense"))


def test_adafactor_on_a_compact_tensor_is_refused_where_it_is_passed():
    model = _mlp()
    optimizer = torch.optim.Adafactor(model.parameters())
    with pytest.raises(mp.MaskparamError, match="layout='dense'"):
        mp.apply_mask(
            model, {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))}, optimizer=optimizer
        )
    assert not mp.summary(model).tensors  # nothing applied


def test_an_optimizer_holding_a_frozen_original_without_theta_is_refused():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(mp.MaskparamError, match="would train nothing"):
        mp.apply_mask(model, {"0.weight": mp.Subspace(3)}, optimizer=optimizer)
    assert not mp.summary(model).tensors
    assert model[0].weight.requires_grad


def test_the_optimizer_argument_is_checked():
    model = mp.apply_mask(_mlp(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    with pytest.raises(mp.MaskparamError, match="optimizer must be a torch.optim.Optimizer"):
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer="adam")


def test_baking_a_dense_layout_gives_the_fixed_entries_fresh_state_as_compact_does():
    states = {}
    for layout in ("dense", "compact"):
        torch.manual_seed(0)
        layer = nn.Linear(8, 8)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        _train(nn.Sequential(layer), optimizer)
        rules = {"weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)}
        mp.apply_mask(layer, rules, optimizer=optimizer)
        _train(nn.Sequential(layer), optimizer)
        kept = mp.kept_entries(layer, "weight")
        mp.remove_parametrizations(layer, optimizer=optimizer)
        states[layout] = optimizer.state[layer.weight]["momentum_buffer"].clone()
        assert torch.equal(states[layout][~kept], torch.zeros(int((~kept).sum())))
    assert torch.equal(states["dense"], states["compact"])


def test_the_same_optimizer_twice_moves_its_state_once():
    results = []
    for optimizers in ("once", "twice"):
        model = mp.apply_mask(_mlp(), {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
        optimizer = torch.optim.Adam(model.parameters())
        _train(model, optimizer)
        given = optimizer if optimizers == "once" else [optimizer, optimizer]
        mp.update_masks(model, {"*.weight": mp.masks.random(0.3, seed=2)}, optimizer=given)
        stored = model[0].parametrizations.weight.original
        results.append(optimizer.state[stored]["exp_avg"].clone())
    assert torch.equal(results[0], results[1])
