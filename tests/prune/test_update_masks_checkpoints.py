"""Checkpoints across ``update_masks``: a checkpoint from before an update restores the old
masks (torch's loader, mp.load_state_dict, with the optimizer: training resumes bit-identically);
a checkpoint after an update loads into a model built with the initial rules; trainable_state_dict
saves the changed positions and a fresh model takes them."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import (
    X_6x7,
    X_8x16,
    adamw_steps_to_one,
    linear_weights,
    mlp,
    pruning_inputs,
    pruning_steps,
    same_snapshot_with_summary,
    sgd_wd_steps,
    snapshot_with_summary,
    through_file,
    through_file_with_size,
    trained_base,
)
from torch import nn

import maskparam as mp


# from the attack on the pruning toolkit
@pytest.mark.parametrize("layout", ["dense", "compact", "auto"])
def test_loading_a_checkpoint_from_before_an_update_restores_old_masks(layout):
    """state_dict -> update_masks -> load the old state_dict: old masks, sizes and outputs."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    before = snapshot_with_summary(model)
    with torch.no_grad():
        out = model(pruning_inputs())
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)}, optimizer=optimizer)
    pruning_steps(model, optimizer, 2)
    buffer.seek(0)
    # the optimizer is passed: maskparam moves state only in optimizers it is given
    mp.load_state_dict(model, torch.load(buffer, weights_only=True), optimizer=optimizer)
    assert same_snapshot_with_summary(before, snapshot_with_summary(model), summary=False)
    with torch.no_grad():
        assert torch.equal(model(pruning_inputs()), out)
    assert mp.verify(model) == []
    pruning_steps(model, optimizer, 1)  # and the optimizer goes on
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_mp_load_state_dict_of_a_checkpoint_from_before_an_update(layout):
    """mp.load_state_dict (all or nothing) of the pre-update checkpoint restores it exactly."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)})
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        out = model(pruning_inputs())
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)}, optimizer=None)
    mp.load_state_dict(model, state)
    with torch.no_grad():
        assert torch.equal(model(pruning_inputs()), out)
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
def test_summary_after_loading_a_checkpoint_from_before_an_update_describes_the_loaded_mask():
    """After update_masks then loading the older checkpoint, mp.summary describes the mask the
    model now has (not the generator of the update the load undid)."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    state = copy.deepcopy(model.state_dict())
    before = mp.summary(model).tensors
    mp.update_masks(model, {"*.weight": mp.masks.global_magnitude(0.8)}, optimizer=None)
    model.load_state_dict(state)
    assert "largest |w|" not in str(mp.summary(model))
    # The generator of a loaded mask is not known: the summary says where the mask came from.
    after = mp.summary(model).tensors
    assert [t.free for t in after] == [t.free for t in before]
    assert {t.constraint for t in after} == {"Mask(keeps the checkpoint's entries, compact)"}


def _resume_reference(layout: str, same_density: bool):
    """(weights after: train 2, save, train 2 more) and the saved checkpoint."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 2)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(mp.optimizer_state_dict(optimizer, model)),
    )
    pruning_steps(model, optimizer, 2)
    return linear_weights(model), saved, model, optimizer


# from the attack on the pruning toolkit
@pytest.mark.parametrize("loader", ["torch", "maskparam"])
@pytest.mark.parametrize("same_density", [True, False])
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_resume_model_and_optimizer_from_before_an_update(layout, same_density, loader):
    """Save (model, optimizer); update_masks and train; load both back: training resumes as if
    the detour never happened (bit-identical to continuing from the checkpoint)."""
    expected, saved, model, optimizer = _resume_reference(layout, same_density)
    model_state, torch_opt_state, named_opt_state = saved
    source = mp.masks.random(0.5, seed=9) if same_density else mp.masks.random(0.25, seed=9)
    mp.update_masks(model, {"*.weight": source}, optimizer=optimizer)
    pruning_steps(model, optimizer, 2)
    model.load_state_dict(model_state)
    if loader == "torch":
        optimizer.load_state_dict(torch_opt_state)
    else:
        mp.load_optimizer_state_dict(optimizer, model, named_opt_state)
    pruning_steps(model, optimizer, 2)
    assert mp.verify(model) == []
    for e, g in zip(expected, linear_weights(model), strict=True):
        assert torch.equal(e, g)


# from the attack on the pruning toolkit
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_named_optimizer_state_from_before_an_update_is_refused_or_fits(layout):
    """mp.load_optimizer_state_dict of state saved before an update that resized the tensor is
    refused with a MaskparamError (not a cryptic error at the next step)."""
    model = mlp(8, 16, 4, seed=0)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruning_steps(model, optimizer, 1)
    saved = mp.optimizer_state_dict(optimizer, model)
    mp.update_masks(model, {"*.weight": mp.masks.random(0.25, seed=9)}, optimizer=optimizer)
    try:
        mp.load_optimizer_state_dict(optimizer, model, saved)
    except mp.MaskparamError:
        return
    pruning_steps(model, optimizer, 1)  # if accepted, it must train (and stay exact)
    assert mp.verify(model) == []


# from the attack on the pruning toolkit
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_checkpoint_after_updating_a_row_mask_to_an_entry_mask_loads_into_the_initial_rules(
    layout,
):
    """apply Mask(rows([...])) (a (rows, 1) mask), update_masks to magnitude (full shape), save:
    the checkpoint loads into a model built with the initial rules (README: 'A checkpoint of a
    run whose masks changed loads into a model built with the initial rules')."""

    def build() -> nn.Sequential:
        model = mlp(8, 16, 4, seed=0)
        rules = {"0.weight": mp.Mask(mp.masks.rows(list(range(6))), layout=layout)}
        return mp.apply_mask(model, rules)

    model = build()
    mp.update_masks(model, {"0.weight": mp.masks.magnitude(0.8)}, optimizer=None)
    with torch.no_grad():
        out = model(pruning_inputs())
    state = copy.deepcopy(model.state_dict())
    fresh = build()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(pruning_inputs()), out)
    assert mp.verify(fresh) == []


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_after_update_masks_positions_are_saved_and_taken(layout):
    rules = {"*.weight": mp.Mask(mp.masks.magnitude(0.5), layout=layout)}
    trained = trained_base(rules)
    mp.update_masks(
        trained, {"*.weight": mp.masks.magnitude(0.75)}, optimizer=None
    )  # from the trained weights
    adamw_steps_to_one(trained)
    state, _ = through_file_with_size(mp.trainable_state_dict(trained))
    positions = state["2.weight.free_positions"]
    assert positions.dtype == torch.int32
    assert positions.numel() == state["2.weight.free_values"].numel() == 256
    fresh = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    assert not torch.equal(mp.kept_entries(fresh, "2.weight"), mp.kept_entries(trained, "2.weight"))
    mp.load_trainable_state_dict(fresh, state, optimizer=None)
    with torch.no_grad():
        assert torch.equal(fresh(X_8x16), trained(X_8x16))
    for name in ("0.weight", "2.weight", "4.weight"):
        assert torch.equal(mp.kept_entries(fresh, name), mp.kept_entries(trained, name))
    assert mp.verify(fresh) == []
    adamw_steps_to_one(fresh)  # the optimizer state follows the new layout; the mask holds
    assert mp.verify(fresh) == []


def test_changed_freeze_mask_is_refused_with_the_fix(snapshot):
    rules = {"2.weight": mp.Freeze(mp.masks.magnitude(0.5), layout="dense")}
    trained = trained_base(rules)
    mp.update_masks(trained, {"2.weight": mp.masks.magnitude(0.75)}, optimizer=None)
    state = mp.trainable_state_dict(trained)
    assert "2.weight.free_positions" in state
    fresh = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    before = snapshot(fresh)
    with pytest.raises(mp.MaskparamError, match=r"'2\.weight'.*changed after apply"):
        mp.load_trainable_state_dict(fresh, state, optimizer=None)
    before.assert_same(fresh)
    # With the trained model's full checkpoint first, the masks agree and the state loads.
    fresh.load_state_dict(trained.state_dict())
    mp.load_trainable_state_dict(fresh, state, optimizer=None)
    with torch.no_grad():
        assert torch.equal(fresh(X_8x16), trained(X_8x16))


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_after_update_masks_loads_onto_fresh_model(layout):
    """After update_masks the saved positions are taken by the fresh model's Mask."""

    def rules():
        return {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout=layout)}

    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules())
    sgd_wd_steps(trained)
    mp.update_masks(trained, {"*.weight": mp.Mask(mp.masks.magnitude(0.7))}, optimizer=None)
    sgd_wd_steps(trained)
    state = through_file(mp.trainable_state_dict(trained))
    restored = mp.load_trainable_state_dict(
        mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules()), state, optimizer=None
    )
    with torch.no_grad():
        assert torch.equal(restored(X_6x7), trained(X_6x7))
    assert mp.verify(restored) == []


# from the attack on to_sparse and trainable_state_dict
def test_layer_pruned_to_nothing_round_trips():
    """A layer that update_masks pruned entirely still round-trips onto a fresh model."""

    def rules():
        return {"2.weight": mp.Mask(mp.masks.magnitude(0.5), layout="dense")}

    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules())
    mp.update_masks(
        trained, {"2.weight": mp.Mask(torch.zeros(5, 9, dtype=torch.bool))}, optimizer=None
    )
    sgd_wd_steps(trained)
    state = through_file(mp.trainable_state_dict(trained))
    restored = mp.load_trainable_state_dict(
        mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules()), state, optimizer=None
    )
    with torch.no_grad():
        assert torch.equal(restored(X_6x7), trained(X_6x7))


# from the attack on to_sparse and trainable_state_dict
def test_positions_taken_by_a_mask_that_was_empty():
    """A saved mask that differs from the model's (here: empty) Mask is taken, as documented."""

    def rules():
        return {"2.weight": mp.Mask(torch.zeros(5, 9, dtype=torch.bool), layout="dense")}

    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules())
    mp.update_masks(trained, {"2.weight": mp.Mask(mp.masks.random(0.5, seed=1))}, optimizer=None)
    sgd_wd_steps(trained)
    state = mp.trainable_state_dict(trained)
    restored = mp.load_trainable_state_dict(
        mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules()), state, optimizer=None
    )
    with torch.no_grad():
        assert torch.equal(restored(X_6x7), trained(X_6x7))
